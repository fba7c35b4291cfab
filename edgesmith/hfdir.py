"""Hugging Face model directories: config.json, a supported llama-family architecture, weights whose
shapes agree with the config (read from the safetensors header, no weights loaded)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import EdgesmithError

# Llama-family decoders: same block structure (RMSNorm, RoPE attention with GQA, gated MLP); Qwen3 adds per-head
# q/k norms, Gemma 3 (text) those plus post-attention/post-MLP norms, sliding-window layers and GELU-tanh.
SUPPORTED_MODEL_TYPES = {"llama": "Llama / SmolLM", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                         "gemma3_text": "Gemma 3 (text)"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def supported_list() -> str:
    return ", ".join(f"{v} ({k})" for k, v in SUPPORTED_MODEL_TYPES.items())


def read_hf_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise EdgesmithError(f"{path}: not a Hugging Face model directory (config.json missing)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgesmithError(f"{cfg}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EdgesmithError(f"{cfg}: expected a JSON object")
    return data


def check_hf_dir(path: Path) -> dict:
    """Validate an HF directory: config.json present, a supported architecture, weights present."""
    data = read_hf_config(path)
    mt = data.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise EdgesmithError(
            f"{path / 'config.json'}: model_type {mt!r} is not supported; supported: {supported_list()}"
        )
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise EdgesmithError(f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")
    if (path / "model.safetensors").is_file():
        _check_safetensors_shapes(path / "model.safetensors", data)
    return data


def _check_safetensors_shapes(f: Path, cfg: dict) -> None:
    """The safetensors header is readable and its main shapes agree with config.json (reads no weights):
    a mismatch would otherwise surface deep inside a loader, or not at all in llama.cpp's converter."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="numpy") as st:
            shapes = {k: list(st.get_slice(k).get_shape()) for k in st.keys()}
    except Exception as e:  # noqa: BLE001 - truncated or corrupt header
        raise EdgesmithError(f"{f}: cannot load model: unreadable safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
    h, i = cfg.get("hidden_size"), cfg.get("intermediate_size")
    heads = cfg.get("num_attention_heads")
    hd = cfg.get("head_dim") or (h // heads if isinstance(h, int) and isinstance(heads, int) and heads else None)
    want = {"model.embed_tokens.weight": [cfg.get("vocab_size"), h],
            "model.layers.0.mlp.gate_proj.weight": [i, h],
            "model.layers.0.self_attn.q_proj.weight": [heads * hd if heads and hd else None, h]}
    for k, shape in want.items():
        if k in shapes and None not in shape and shapes[k] != shape:
            raise EdgesmithError(f"{f}: tensor {k} has shape {shapes[k]}, but config.json implies {shape} "
                                 "(weights and config.json do not belong together)")
