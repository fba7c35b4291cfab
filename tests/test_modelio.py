"""Model I/O: resolving specs, describing models, refusing unsupported input, never touching the
network, and a faithful tokenizer for the embedded default (checked against llama.cpp itself)."""
import json
import socket
import subprocess
import sys

import pytest

from edgesmith.errors import EdgesmithError
from edgesmith.facts import facts, width_warnings
from edgesmith.hfdir import check_hf_dir
from edgesmith.modelio import default_gguf, load, load_tokenizer, resolve

WIKI = "lm/wikitext-2-raw/wiki.test.raw"


def test_facts_tiny_hf_matches_torch(tiny_factory):
    d = tiny_factory("odd", hidden=96, intermediate=176, heads=3, kv_heads=1, layers=3, tie=False)
    fx = facts(d)
    model, _ = load(d)
    assert fx.params_total == sum(p.numel() for p in model.parameters())
    assert fx.params_non_embedding == fx.params_total - 2 * 49152 * 96
    assert (fx.num_layers, fx.hidden_size, fx.intermediate_size, fx.num_attention_heads, fx.num_key_value_heads, fx.head_dim) == (3, 96, 176, 3, 1, 32)
    assert not fx.tied_embeddings and fx.chat_template and fx.eos_tokens == ["<|im_end|> (2)"]
    assert fx.widths[96]["mult32"] and not fx.widths[96]["mult256"] and not fx.widths[176]["mult32"]
    assert any("176" in w and "multiple of 32" in w for w in width_warnings(fx))


def test_info_default_facts():
    """The acceptance numbers of `edgesmith info default` (read from the GGUF, no weights loaded)."""
    r = subprocess.run([sys.executable, "-m", "edgesmith", "info", "default", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert round(d["params_total"] / 1e6, 1) == 134.5
    assert (d["num_layers"], d["hidden_size"], d["intermediate_size"], d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"], d["vocab_size"]) == (30, 576, 1536, 9, 3, 64, 49152)
    assert d["tied_embeddings"] and d["chat_template"] and d["eos_tokens"] == ["<|im_end|> (2)"]
    assert d["widths"]["576"]["mult256"] is False and d["widths"]["1536"]["mult256"] is True
    assert any("576" in w and "256" in w for w in d["warnings"])
    text = subprocess.run([sys.executable, "-m", "edgesmith", "info", "default"], capture_output=True, text=True, timeout=300).stdout
    assert "134.5M" in text and "9 / 3" in text and "warning: width 576" in text


def test_unsupported_and_broken_dirs(tmp_path, tiny_llama):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(EdgesmithError, match=r"model_type 'gpt2' is not supported; supported: Llama / SmolLM \(llama\), Mistral"):
        resolve(gpt2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgesmithError, match="config.json missing"):
        resolve(empty)
    (tiny_llama / "model.safetensors").rename(tmp_path / "w.safetensors")
    with pytest.raises(EdgesmithError, match="no weights found"):
        check_hf_dir(tiny_llama)
    with pytest.raises(EdgesmithError, match="no such model"):
        resolve(tmp_path / "missing")


def test_no_false_mistral_regex_warning(tmp_path):
    """transformers 4.57.3+ tells every directory it saved with a > 100k vocabulary (Gemma 3, Qwen) to set
    fix_mistral_regex ("This will lead to incorrect tokenization"), Mistral or not: a Gemma 3 directory loads without
    that warning; a Mistral one still gets it. Records are caught by a handler on transformers' own logger (its
    stream handler may hold an earlier test's captured stderr), at warning level whatever an earlier test set."""
    import logging

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    from edgesmith.modelio import tokenizer_from_dir

    vocab = {f"t{i}": i for i in range(100_002)} | {"<unk>": 100_002}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(tmp_path)

    class Caught(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    caught, root, level = Caught(), logging.getLogger("transformers"), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    root.addHandler(caught)
    try:
        for model_type, warned in (("gemma3_text", False), ("mistral", True)):
            (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "transformers_version": "4.57.6"}))
            caught.messages.clear()
            assert tokenizer_from_dir(tmp_path)("t5 t7")["input_ids"] == [5, 7]
            assert any("fix_mistral_regex" in m for m in caught.messages) is warned, (model_type, caught.messages)
    finally:
        root.removeHandler(caught)
        hf_logging.set_verbosity(level)


def test_corrupt_weights_one_line_error(tiny_llama):
    w = tiny_llama / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(EdgesmithError, match="cannot load model"):
        load(tiny_llama)


def test_no_network_is_attempted(tiny_llama, monkeypatch):
    """Loading never opens a socket: every connect attempt would raise here."""
    calls = []

    def deny(self, *a, **k):
        calls.append(a)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", deny)
    monkeypatch.setattr(socket.socket, "connect_ex", deny)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: deny(None, *a))
    model, tok = load(tiny_llama)
    assert tok("hello").input_ids and model.config.model_type == "llama"
    assert calls == []


@pytest.mark.slow
def test_default_materialised_faithfully(default_hf):
    files = {p.name for p in default_hf.iterdir()}
    assert "tokenizer.model" not in files and {"model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    tj = json.loads((default_hf / "tokenizer.json").read_text())
    assert tj["model"]["type"] == "BPE" and tj["decoder"]["type"] == "ByteLevel"
    assert [p["type"] for p in tj["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    gen = json.loads((default_hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1
    tok = load_tokenizer("default")
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


@pytest.mark.slow
def test_tokenizer_matches_llama_cpp(default_hf, shared_data):
    """HF token ids == llama.cpp's tokenisation of the original GGUF (prose, math, chat with specials)."""
    import llama_cpp

    tok = load_tokenizer("default")
    llm = llama_cpp.Llama(str(default_gguf()), vocab_only=True, verbose=False)
    try:
        lines = [l for l in (shared_data / WIKI).read_text(encoding="utf-8").split("\n") if l.strip()][:200]
        chats = [
            tok.apply_chat_template([{"role": "user", "content": "What is 12*34? Show steps: 12*34 = 408."}], tokenize=False, add_generation_prompt=True),
            tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 🙂  tabs\tand\nnewlines"},
                                     {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "<|im_end|> inside text"}], tokenize=False),
        ]
        mismatches = [t for t in lines + chats if tok(t).input_ids != llm.tokenize(t.encode(), add_bos=False, special=True)]
        assert mismatches == []
        assert tok(chats[0]).input_ids[0] == 1  # <|im_start|> is one special token
    finally:
        llm.close()


@pytest.mark.slow
def test_default_answers_paris(default_hf):
    import torch

    model, tok = load("default")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert "Paris" in tok.decode(new, skip_special_tokens=True)
    assert 2 in new  # stopped on <|im_end|>


@pytest.mark.slow
def test_chat_cli_default(default_hf):
    # greedy: with the Modelfile's sampling and a random seed the answer is sometimes "L'Étoile (The City)..."
    r = subprocess.run([sys.executable, "-m", "edgesmith", "chat", "default", "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "32", "--temperature", "0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # the answer on stdout; the speed line (issue 19: tokens, TTFT, tok/s, finish reason) on stderr only
    assert "Paris" in r.stdout and "finish reason" in r.stderr and "finish reason" not in r.stdout
