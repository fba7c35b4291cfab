"""Shared fixtures: tiny random Llama models built from a config in milliseconds (with the real
SmolLM2 tokenizer, so GGUF/ONNX tooling sees a realistic vocabulary), the embedded default model,
and the real data in ../shared/data."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EDGESMITH_DATA", REPO.parent / "shared" / "data"))


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or EDGESMITH_DATA). CI always has it: there a missing folder fails the test; elsewhere it skips."""
    if not SHARED_DATA.is_dir():
        msg = f"real data folder {SHARED_DATA} not present (tests that need ../shared/data)"
        if _in_ci():
            pytest.fail(msg + " under CI=true: CI must have it")
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="session")
def ollama(tmp_path_factory):
    """Ollama's Modelfile parser and prompt rendering on Go's own text/template (tests/gotemplate, built once).
    Needs a Go toolchain (scripts/setup.sh installs golang-1.19-go): under CI a missing one fails the tests
    that use this; elsewhere they skip."""
    from ollama_go import Ollama, build, find_go

    go = find_go()
    if go is None:
        msg = "no Go toolchain (needed to run Ollama's template engine): `make setup` installs golang-1.19-go, or set EDGESMITH_GO"
        if _in_ci():
            pytest.fail(msg + "; under CI=true it must be there")
        pytest.skip(msg)
    return Ollama(build(go, tmp_path_factory.mktemp("ollama-go")))


@pytest.fixture(scope="session")
def default_hf() -> Path:
    """The embedded SmolLM2-135M-Instruct, materialised once as an HF directory (cached)."""
    from edgesmith.modelio import resolve

    return resolve("default")


@pytest.fixture(scope="session")
def tokenizer_dir(default_hf, tmp_path_factory) -> Path:
    """Just the tokenizer files of the default model (for building tiny models around them)."""
    d = tmp_path_factory.mktemp("tok")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (default_hf / f).exists():
            shutil.copy(default_hf / f, d / f)
    return d


def make_tiny_llama(dest: Path, tokenizer_dir: Path, *, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2,
                    head_dim=None, tie=True, seed=0, dtype="float32") -> Path:
    """Save a random Llama with the given shapes plus the real tokenizer at `dest`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads,
        max_position_embeddings=2048, tie_word_embeddings=tie, rms_norm_eps=1e-5, rope_theta=100000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(dest, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dest / f.name)
    return dest


@pytest.fixture
def tiny_llama(tmp_path, tokenizer_dir) -> Path:
    """A 2-layer random Llama (hidden 64, 4 heads / 2 kv heads) with the real SmolLM2 tokenizer."""
    return make_tiny_llama(tmp_path / "tiny", tokenizer_dir)


@pytest.fixture
def tiny_factory(tmp_path, tokenizer_dir):
    """Build tiny random Llamas with custom shapes: tiny_factory(name, hidden=..., layers=...)."""
    def build(name="tiny", **kw):
        return make_tiny_llama(tmp_path / name, tokenizer_dir, **kw)
    return build


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is present (a lent GPU machine) and are skipped, saying so, everywhere else."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (runs on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
