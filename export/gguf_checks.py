"""Checks and descriptions of exported GGUF files: size, bits per weight, tensor types, file type and
llama.cpp's fallbacks; tokenizer metadata against the HF tokenizer (and the source GGUF); and a load in
llama.cpp (child process) that must tokenise like HF and give finite logits.
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path

from .gguf_convert import _source_gguf
from .quantize import ftype_table, parse_fallbacks

# token sequences every exported GGUF must tokenise exactly like the HF tokenizer (special tokens in text)
TOKENIZER_SAMPLES = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "In 1999, 3.14159 * 2 = 6.28318; call f(x) -> y.",
    "  leading spaces\tand tabs\nand new lines\n\n",
    "Ünïcödé: café, naïve, 日本語, emoji 🤖.",
    "def add(a, b):\n    return a + b  # sum",
)


def describe(path: Path, qtype: str | None = None, log: str | None = None) -> dict:
    """Size, bits per weight, tensor type counts, file type check and fallbacks of one GGUF file."""
    from edgesmith.gguf_read import read

    path = Path(path)
    g = read(path)
    fields, tensors = g.fields, g.tensors
    types = Counter(t["type"] for t in tensors)
    n_el = sum(t["n_elements"] for t in tensors)
    n_bytes = sum(t["n_bytes"] for t in tensors)
    ft = fields.get("general.file_type")
    table = ftype_table()
    want = table.get(qtype.upper()) if qtype else None
    out = {
        "size_bytes": path.stat().st_size,
        "bits_per_weight": round(8 * n_bytes / max(n_el, 1), 3),
        "params": n_el,
        "tensor_types": dict(types.most_common()),
        "file_type": ft,
        "file_type_name": next((k for k, v in table.items() if v == ft), str(ft)),
    }
    if qtype:
        out["file_type_ok"] = ft == want
    if log is not None:
        fb = parse_fallbacks(log)
        m = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", log)
        n = int(m.group(1)) if m else len(fb)
        widths = sorted({f["width"] for f in fb})
        out["fallbacks"] = {
            "count": n,
            "widths": widths,
            "by_type": dict(Counter(f"{f['wanted']}->{f['used']}" for f in fb).most_common()),
        }
        m = re.search(r"have importance matrix data with (\d+) entries", log)
        if m:  # llama.cpp's own word that it took the imatrix, and for how many tensors it had none
            # (token_embd is a row lookup, not a matmul: llama-imatrix has no data for it either)
            out["imatrix"] = {"entries": int(m.group(1)), "tensors_without_data": re.findall(r"did not find weights for (\S+)", log)}
    return out


def fallback_warning(name: str, d: dict) -> str | None:
    fb = d.get("fallbacks") or {}
    if not fb.get("count"):
        return None
    kinds = ", ".join(f"{k} x{v}" for k, v in fb["by_type"].items())
    ws = ", ".join(str(w) for w in fb["widths"])
    return (f"{name}: {fb['count']} tensors fell back to other types ({kinds}) because their widths ({ws}) "
            "are not multiples of the type's block size (256 for K-quants, 32 for legacy quants)")


def tokenizer_fields(path: Path) -> dict:
    """The tokenizer.* keys of a GGUF, arrays included (for comparing files)."""
    from edgesmith.gguf_read import metadata

    return {k: v for k, v in metadata(path).items() if k.startswith("tokenizer.")}


@functools.lru_cache(maxsize=4)
def hf_tokenizer(hf_dir: Path):
    from edgesmith.modelio import tokenizer_from_dir

    return tokenizer_from_dir(hf_dir)


def check_tokenizer_metadata(gguf_path: Path, hf_dir: Path) -> dict:
    """The GGUF's tokenizer metadata agrees with the HF tokenizer (and with the source GGUF, if any)."""
    f = tokenizer_fields(gguf_path)
    tok = hf_tokenizer(Path(hf_dir))
    vocab = tok.get_vocab()
    tokens = f.get("tokenizer.ggml.tokens") or []
    checks = {
        "tokenizer_model": f.get("tokenizer.ggml.model"),
        "pre_tokenizer": f.get("tokenizer.ggml.pre"),
        "vocab_matches_hf": len(tokens) >= len(vocab) and all(tokens[i] == t for t, i in vocab.items() if i < len(tokens)),
        "bos_matches_hf": tok.bos_token_id is None or f.get("tokenizer.ggml.bos_token_id") == tok.bos_token_id,
        "eos_matches_hf": f.get("tokenizer.ggml.eos_token_id") == tok.eos_token_id,
        "add_bos_matches_hf": bool(f.get("tokenizer.ggml.add_bos_token", False)) == bool(getattr(tok, "add_bos_token", False)),
        "chat_template_matches_hf": (f.get("tokenizer.chat_template") or None) == (tok.chat_template or None),
    }
    if tok.pad_token_id is not None:
        checks["pad_matches_hf"] = f.get("tokenizer.ggml.padding_token_id") == tok.pad_token_id
    src = _source_gguf(hf_dir, same_vocab=True)
    if src is not None:
        s = tokenizer_fields(src)
        same = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                            "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                            "tokenizer.chat_template") if s.get(k) == f.get(k)]
        checks["matches_source_gguf"] = len(same) == 8
    # a byte-level BPE vocabulary needs a named pre-tokenizer; SentencePiece ("llama": Gemma, Llama 2) has none
    named_pre = checks["tokenizer_model"] == "llama" or checks["pre_tokenizer"] not in (None, "default")
    checks["ok"] = bool(named_pre and all(
        v for k, v in checks.items() if k.endswith("_hf") or k == "matches_source_gguf"))
    return checks


def _load_check(path: str, samples: list[str], expected: list[list[int]], threads: int | None) -> dict:
    """Child: loads in llama.cpp, tokenises like HF, produces finite logits on a short prompt."""
    import numpy as np

    from edgesmith.llamacpp import open_llama

    llm = open_llama(path, n_ctx=128, threads=threads)
    try:
        got = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in samples]
        ids = expected[-1][:32]
        llm.eval(ids)
        logits = np.asarray(llm.scores[len(ids) - 1])
        return {"loads": True, "tokenizer_ids_match_hf": got == expected, "finite_logits": bool(np.isfinite(logits).all())}
    finally:
        llm.close()


def tokenizer_samples(hf_dir: Path) -> tuple[list[str], list[list[int]]]:
    """Texts (plain ones + a rendered chat with special tokens) and the HF tokenizer's ids for them."""
    tok = hf_tokenizer(Path(hf_dir))
    texts = list(TOKENIZER_SAMPLES)
    if tok.chat_template:
        texts.append(tok.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}],
            tokenize=False, add_generation_prompt=True))
    return texts, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def load_check(path: Path, hf_dir: Path, threads: int | None = None, samples=None) -> dict:
    from edgesmith.native import run_isolated

    texts, ids = samples or tokenizer_samples(hf_dir)
    return run_isolated(_load_check, str(path), texts, ids, threads, what=f"llama.cpp loading {Path(path).name}")
