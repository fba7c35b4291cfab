"""llama.cpp's file types and its quantiser.

Quantisation is llama.cpp's quantiser (`llama_cpp.llama_model_quantize`), one child process per
file (`edgesmith.native.run_isolated`): calling it repeatedly in one process has crashed, and an
abort there must not kill the CLI. Its log is captured: llama.cpp itself says which tensors fell
back to another type because their row length is not a multiple of the type's block size
(256 for K-quants, 32 for legacy quants) -- SmolLM2's hidden 576 is one of those. An imatrix is passed
the way llama.cpp's quantize tool passes it: an array of {name, data, size} in `params.imatrix`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from edgesmith.errors import EdgesmithError
from edgesmith.fsutil import atomic_path

# Types the converter writes directly; every other name goes through the quantiser.
FLOAT_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
DEFAULT_TYPES = ("F16", "Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0")
# ftypes that exist in the enum but that llama.cpp cannot produce for a dense Llama (or that are guesses)
_NOT_QUANTS = {"GUESSED", "MOSTLY_MXFP4_MOE"}


# ---------------------------------------------------------------- type names


def ftype_table() -> dict[str, int]:
    """Quant/type name -> llama.cpp `llama_ftype` value (from gguf-py's copy of the enum)."""
    import gguf

    out = {}
    for m in gguf.LlamaFileType:
        if m.name in _NOT_QUANTS:
            continue
        out[m.name.replace("MOSTLY_", "").replace("ALL_", "")] = int(m.value)
    return out


def parse_types(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'F16,Q4_K_M' -> ['F16', 'Q4_K_M'] (names kept exactly as given, matched case-insensitively)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    table = ftype_table()
    bad = [s for s in items if s.upper() not in table]
    if bad:
        raise EdgesmithError(f"unknown GGUF type {bad[0]!r}; valid: {', '.join(table)}")
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------- quantiser (child process)


def _quantize_child(src: str, dst: str, ftype: int, nthread: int, imatrix_file: str | None) -> str:
    """Runs in a child: llama_model_quantize(src -> dst); returns llama.cpp's log text."""
    import ctypes

    import llama_cpp

    from edgesmith.llamacpp import capture_logs

    logs = capture_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    keep: list[Any] = []  # buffers the C side points into must outlive the call
    if imatrix_file:
        import numpy as np

        from .imatrix import load_imatrix

        data, info = load_imatrix(Path(imatrix_file))
        arr = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()
        for i, (name, vals) in enumerate(sorted(data.items())):
            v = np.ascontiguousarray(vals, dtype=np.float32)
            b = name.encode()
            keep += [v, b]
            arr[i].name = b
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(data)].name = None  # terminator
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        # the same provenance keys llama.cpp's quantize tool records
        kvs = [("quantize.imatrix.file", Path(imatrix_file).name), ("quantize.imatrix.entries_count", len(data))]
        if info.get("chunk_count"):
            kvs.append(("quantize.imatrix.chunks_count", int(info["chunk_count"])))
        if info.get("datasets"):
            kvs.append(("quantize.imatrix.dataset", str(info["datasets"][0])))
        ov = (llama_cpp.llama_model_kv_override * (len(kvs) + 1))()
        for i, (k, v) in enumerate(kvs):
            ov[i].key = k.encode()
            if isinstance(v, int):
                ov[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                ov[i].value.val_i64 = v
            else:
                ov[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                ov[i].value.val_str = v.encode()[:127]
        ov[len(kvs)].key = b""
        keep.append(ov)
        params.kv_overrides = ctypes.cast(ov, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    text = "".join(logs)
    if rc != 0:
        errs = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        raise EdgesmithError(f"llama.cpp could not quantise {Path(src).name} to {Path(dst).name}: "
                             f"{(errs or ['quantiser returned ' + str(rc)])[-1][:300]}")
    return text


def quantize(src: Path, dst: Path, qtype: str, imatrix: Path | None = None, threads: int | None = None) -> str:
    """One quantisation in a child process, written atomically; returns llama.cpp's log."""
    table = ftype_table()
    if qtype.upper() not in table or qtype.upper() in FLOAT_TYPES:
        raise EdgesmithError(f"unknown quant type {qtype!r}; valid: {', '.join(k for k in table if k not in FLOAT_TYPES)}")
    from edgesmith.native import run_isolated

    nthread = threads or os.cpu_count() or 1
    with atomic_path(dst) as tmp:
        return run_isolated(_quantize_child, str(src), str(tmp), table[qtype.upper()], nthread,
                            str(imatrix) if imatrix else None, what=f"llama.cpp quantising to {qtype}")


_FALLBACK_RE = re.compile(
    r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)\s*"
    r"(?:\(WARNING: must use F16 due to unusual shape\)\s*)?-> falling back to\s+(\S+)")


def parse_fallbacks(log: str) -> list[dict]:
    """llama.cpp's own per-tensor fallback lines -> [{tensor, width, block, wanted, used}]."""
    return [{"tensor": m[0], "width": int(m[1]), "block": int(m[2]), "wanted": m[3], "used": m[4]}
            for m in _FALLBACK_RE.findall(log)]
