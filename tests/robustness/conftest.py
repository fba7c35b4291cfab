"""Robustness suite: every entry point meets bad input, interruption and untrusted files with a
one-line error (exit 2) and never a traceback, a native abort or lost work. Cases are real files
(tiny GGUFs written with gguf-py, the embedded default GGUF read-only, tiny HF models, real recipes and
datasets); the case counts per kind are printed at the end of the run."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

CASES: Counter = Counter()


def count(kind: str, n: int = 1) -> None:
    CASES[kind] += n


def pytest_terminal_summary(terminalreporter):
    if CASES:
        kinds = ["gguf", "models", "recipes", "datasets", "interrupt", "untrusted"]
        kinds += sorted(k for k in CASES if k not in kinds)
        line = ", ".join(f"{k}={CASES[k]}" for k in kinds if CASES[k])
        terminalreporter.write_line(f"robustness cases: {line}; total={sum(CASES.values())}")


def cli(*args: str) -> tuple[int, str, str]:
    """edgesmith.cli.main in-process: (exit code, stdout, stderr)."""
    from edgesmith.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def assert_clean_error(rc: int, err: str, *, mention: str | None = None, allow_ok: bool = False) -> str:
    """Exit 2 with exactly one `edgesmith CMD: error: ...` line (or 0 when allow_ok); never a traceback."""
    assert "Traceback" not in err, err
    assert "internal error" not in err, err
    if allow_ok and rc == 0:
        return ""
    assert rc == 2, (rc, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and ": error: " in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("edgesmith ") and ": error: " in lines[0], err
    if mention is not None:
        assert mention in lines[0], (mention, lines[0])
    return lines[0]


def run_cli_subprocess(*args: str, timeout: float = 300, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """The installed `edgesmith` console script in a fresh process (what a user runs)."""
    exe = Path(sys.executable).with_name("edgesmith")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgesmith"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A complete tiny llama GGUF (F32, byte-level vocabulary): llama.cpp loads and runs it."""
    from robustness.ggufs import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-F32.gguf")


@pytest.fixture(scope="session")
def tiny_gguf_q8(tmp_path_factory) -> Path:
    from robustness.ggufs import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-Q8_0.gguf", qtype="Q8_0")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tokenizer_dir) -> Path:
    """A session-wide 2-layer random Llama (hidden 64) with the real SmolLM2 tokenizer. Read-only: copy it to modify."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    dest = tmp_path_factory.mktemp("hf") / "tiny"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(dest, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dest / f.name)
    return dest


@pytest.fixture
def hf_copy(tiny_hf, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_hf, d)
    return d


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    from edgesmith.modelio import default_gguf

    return default_gguf()


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def byte_model(tmp_path_factory) -> Path:
    """A tiny Llama with its own 258-token byte-level BPE tokenizer (a different vocabulary from SmolLM2's);
    its tokenizer loads in milliseconds, which keeps the dataset fuzz fast."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from robustness.ggufs import byte_vocab

    dest = tmp_path_factory.mktemp("bytemodel") / "byte-llama"
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(byte_vocab())}, merges=[], fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=512, bos_token_id=256, eos_token_id=257,
                      pad_token_id=257, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest
