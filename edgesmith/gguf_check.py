"""GGUF validation: is a file a GGUF, and is it a llama-family model llama.cpp can load?

The structure is checked by the reader (`edgesmith.gguf_read`); here the model on top of it: a supported
architecture whose metadata (blocks, widths, heads, vocabulary, special ids) and tensor shapes agree.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from .errors import EdgesmithError

SUPPORTED_GGUF_ARCHS = {"llama", "mistral", "qwen2", "qwen3", "gemma3"}


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# the tensors every llama-family block must have (llama.cpp's llama-model.cpp creates them with fixed shapes)
_BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


@functools.lru_cache(maxsize=64)
def _validate_gguf_cached(path: str, size: int, mtime_ns: int, require_model: bool) -> dict:
    return _validate_gguf(Path(path), require_model)


def validate_gguf(path: str | os.PathLike, require_model: bool = True) -> dict:
    """Check a GGUF file in Python before llama.cpp (or anything else) reads it.

    The structure (header, key/values, tensor table, data inside the file: `edgesmith.gguf_read`) and,
    with require_model, a supported llama-family architecture whose metadata and tensor shapes agree.
    Raises a one-line EdgesmithError naming the file; returns {version, architecture, n_tensors, n_kv,
    data_offset, ...}. The checks mirror llama.cpp's own loader so that a file passing them does not make it abort.
    """
    from .gguf_read import stat_file

    p, st = stat_file(path)
    return dict(_validate_gguf_cached(str(p.resolve()), st.st_size, st.st_mtime_ns, require_model))


def _validate_gguf(p: Path, require_model: bool) -> dict:
    from .gguf_read import INT_TYPES, ARRAY, read

    g = read(p)
    fields, types = g.fields, g.types
    tensors = {t["name"]: t["shape"] for t in g.tensors}

    def bad(msg: str):
        raise EdgesmithError(f"{p}: {msg}")

    info = {"version": g.version, "n_tensors": g.n_tensors, "n_kv": g.n_kv, "alignment": g.alignment,
            "data_offset": g.data_offset, "architecture": fields.get("general.architecture"), "size": g.size,
            "params": sum(t["n_elements"] for t in g.tensors)}
    if not require_model:
        return info

    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        bad("no general.architecture string: not a model GGUF")
    if arch not in SUPPORTED_GGUF_ARCHS:
        bad(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(SUPPORTED_GGUF_ARCHS))}")

    def pos_int(key: str, required: bool = True) -> int | None:
        v = fields.get(key)
        if v is None and not required:
            return None
        if types.get(key) not in INT_TYPES or not isinstance(v, int) or v < 1:
            bad(f"metadata {key} must be a positive integer, got {v!r}")
        return v

    n_layer = pos_int(f"{arch}.block_count")
    hidden = pos_int(f"{arch}.embedding_length")
    ff = pos_int(f"{arch}.feed_forward_length")
    heads = pos_int(f"{arch}.attention.head_count")
    kv = pos_int(f"{arch}.attention.head_count_kv", required=False) or heads
    pos_int(f"{arch}.context_length")
    if heads % kv:
        bad(f"metadata: {heads} attention heads do not split into {kv} kv heads")
    head_dim = pos_int(f"{arch}.attention.key_length", required=False) or hidden // heads
    if not isinstance(fields.get("tokenizer.ggml.model"), str):
        bad("no tokenizer (tokenizer.ggml.model missing): llama.cpp cannot load it")
    toks = fields.get("tokenizer.ggml.tokens")
    if types.get("tokenizer.ggml.tokens") != ARRAY or not isinstance(toks, list) or not toks or not isinstance(toks[0], str):
        bad("no vocabulary (tokenizer.ggml.tokens missing or empty)")
    n_vocab = len(toks)
    for k in ("bos", "eos", "eot", "padding", "unknown"):
        v = fields.get(f"tokenizer.ggml.{k}_token_id")
        if v is not None and (not isinstance(v, int) or not 0 <= v < n_vocab):
            bad(f"metadata tokenizer.ggml.{k}_token_id {v!r} is outside the vocabulary of {n_vocab}")

    def need(name: str, shape: list[int]):
        if name not in tensors:
            bad(f"tensor {name!r} is missing ({arch} with {n_layer} blocks)")
        got = tensors[name]
        if got != shape:
            bad(f"tensor {name!r} has shape {got}, expected {shape} from the metadata")

    need("token_embd.weight", [hidden, n_vocab])
    need("output_norm.weight", [hidden])
    if "output.weight" in tensors:
        need("output.weight", [hidden, n_vocab])
    shapes = {"attn_norm": [hidden], "ffn_norm": [hidden], "attn_q": [hidden, heads * head_dim],
              "attn_k": [hidden, kv * head_dim], "attn_v": [hidden, kv * head_dim], "attn_output": [heads * head_dim, hidden],
              "ffn_gate": [hidden, ff], "ffn_up": [hidden, ff], "ffn_down": [ff, hidden]}
    for b in range(n_layer):
        for t in _BLOCK_TENSORS:
            need(f"blk.{b}.{t}.weight", shapes[t])
    return info
