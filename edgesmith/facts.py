"""What `edgesmith info` reports about a model, without loading its weights: GGUF metadata and tensor
table, or an HF directory's config.json and safetensors headers."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgesmithError
from .fsutil import dir_size
from .gguf_check import SUPPORTED_GGUF_ARCHS, is_gguf_file, validate_gguf
from .hfdir import check_hf_dir


@dataclass
class Facts:
    """What `edgesmith info` reports; the same keys for HF directories and GGUF files."""

    source: str
    format: str
    architecture: str
    params_total: int
    params_non_embedding: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    dtype: str
    size_bytes: int
    chat_template: bool
    eos_tokens: list
    widths: dict  # row length -> {"tensors": n, "mult32": bool, "mult256": bool}


def _widths(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Row lengths (input widths) of the 2-D weights: what llama.cpp quantises block by block.

    shapes: name -> torch-style [out, in]; quant blocks run along `in`.
    """
    out: dict[int, dict] = {}
    for name, shp in shapes.items():
        if len(shp) != 2:
            continue
        w = int(shp[1])
        d = out.setdefault(w, {"tensors": 0, "mult32": w % 32 == 0, "mult256": w % 256 == 0})
        d["tensors"] += 1
    return {k: out[k] for k in sorted(out)}


def _hf_facts(path: Path) -> Facts:
    from safetensors import safe_open

    cfg = check_hf_dir(path)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes = set()
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                shapes[k] = tuple(sl.get_shape())
                dtypes.add(str(sl.get_dtype()))
    if not files:  # .bin checkpoints: fall back to config arithmetic
        shapes = {}
    hidden = cfg["hidden_size"]
    vocab = cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    tied = bool(cfg.get("tie_word_embeddings", False))
    total = sum(int.__mul__(*s) if len(s) == 2 else (s[0] if s else 1) for s in shapes.values())
    emb = vocab * hidden * (1 if tied else 2)
    tok_cfg = {}
    if (path / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    has_template = bool(tok_cfg.get("chat_template")) or (path / "chat_template.jinja").is_file()
    gen = json.loads((path / "generation_config.json").read_text()) if (path / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos = eos if isinstance(eos, list) else [eos]
    eos_tokens = []
    if (path / "tokenizer.json").is_file():
        added = {t["id"]: t["content"] for t in json.loads((path / "tokenizer.json").read_text()).get("added_tokens", [])}
        eos_tokens = [f"{added.get(i, '?')} ({i})" for i in eos if i is not None]
    return Facts(
        source=str(path), format="hf", architecture=f"{cfg['model_type']} ({(cfg.get('architectures') or ['?'])[0]})",
        params_total=total, params_non_embedding=total - emb, num_layers=cfg["num_hidden_layers"], hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"], num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, vocab_size=vocab, tied_embeddings=tied,
        dtype=",".join(sorted(dtypes)) or str(cfg.get("torch_dtype") or cfg.get("dtype")), size_bytes=dir_size(path),
        chat_template=has_template, eos_tokens=eos_tokens, widths=_widths(shapes),
    )


def _gguf_facts(path: Path) -> Facts:
    from collections import Counter

    import gguf

    from .gguf_read import read

    r = read(path)
    f = r.fields
    val = f.get

    arch = val("general.architecture", "?")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise EdgesmithError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(SUPPORTED_GGUF_ARCHS))}")
    # GGUF stores ne = [in, out]; report torch-style [out, in]
    shapes = {t["name"]: tuple(reversed(t["shape"])) for t in r.tensors}
    total = sum(t["n_elements"] for t in r.tensors)
    hidden = int(val(f"{arch}.embedding_length"))
    heads = int(val(f"{arch}.attention.head_count"))
    tokens = f.get("tokenizer.ggml.tokens", [])
    vocab = int(val(f"{arch}.vocab_size", len(tokens)))
    tied = "output.weight" not in shapes
    emb = vocab * hidden * (1 if tied else 2)
    types = Counter(t["type"] for t in r.tensors)
    eos_tokens = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        i = val(key)
        if i is not None and 0 <= int(i) < len(tokens):
            eos_tokens.append(f"{tokens[int(i)]} ({int(i)})")
    ftype = val("general.file_type")
    try:
        ftype_name = gguf.LlamaFileType(int(ftype)).name.replace("MOSTLY_", "") if ftype is not None else "?"
    except ValueError:
        ftype_name = str(ftype)
    return Facts(
        source=str(path), format="gguf", architecture=arch, params_total=total, params_non_embedding=total - emb,
        num_layers=int(val(f"{arch}.block_count")), hidden_size=hidden,
        intermediate_size=int(val(f"{arch}.feed_forward_length")), num_attention_heads=heads,
        num_key_value_heads=int(val(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(val(f"{arch}.attention.key_length", val(f"{arch}.rope.dimension_count", hidden // heads))),
        vocab_size=vocab, tied_embeddings=tied,
        dtype=f"{ftype_name} (" + ", ".join(f"{k}×{v}" for k, v in types.most_common()) + ")",
        size_bytes=path.stat().st_size, chat_template="tokenizer.chat_template" in f, eos_tokens=list(dict.fromkeys(eos_tokens)),
        widths=_widths(shapes),
    )


def facts(spec: str | os.PathLike) -> Facts:
    """Describe a model without loading its weights (GGUF metadata or safetensors headers)."""
    from .modelio import source_path

    p = source_path(spec)
    if p.is_file():
        if not is_gguf_file(p):
            raise EdgesmithError(f"{p}: not a GGUF file (bad magic) and not an HF model directory")
        validate_gguf(p)
        try:
            return _gguf_facts(p)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise EdgesmithError(f"{p}: unexpected GGUF metadata ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        return _hf_facts(p)
    except EdgesmithError:
        raise
    except Exception as e:  # noqa: BLE001 - config.json without the usual keys, corrupt safetensors headers, ...
        raise EdgesmithError(f"{p}: cannot describe this model ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def width_warnings(fx: Facts) -> list[str]:
    """One line per weight width that K-quants (256) or legacy quants (32) cannot tile."""
    msgs = []
    for w, d in fx.widths.items():
        if not d["mult32"]:
            msgs.append(f"width {w} ({d['tensors']} tensors) is not a multiple of 32: every GGUF quant falls back for them")
        elif not d["mult256"]:
            msgs.append(f"width {w} ({d['tensors']} tensors) is not a multiple of 256: K-quants (Q4_K_M, Q5_K_M) fall back to other types for them")
    return msgs
