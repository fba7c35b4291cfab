"""GGUF export: an HF Llama-family directory -> GGUF F16 (or F32/BF16) -> llama.cpp quants, checked.

The steps, one file each: `gguf_convert` (llama.cpp's converter, patched to add our metadata),
`imatrix` (importance matrix for `--imatrix`), `quantize` (type names and llama.cpp's quantiser),
`gguf_checks` (describing and checking the files). Here: the whole GGUF half of `edgesmith export`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from edgesmith.errors import EdgesmithError
from edgesmith.fsutil import check_free_space

from .gguf_checks import check_tokenizer_metadata, describe, fallback_warning, load_check, tokenizer_samples
from .gguf_convert import convert
from .imatrix import compute_imatrix, is_imatrix_file, load_imatrix
from .quantize import DEFAULT_TYPES, FLOAT_TYPES, parse_types, quantize


def export_gguf(hf_dir: Path, out_dir: Path, name: str, types: list[str] | str = DEFAULT_TYPES, *,
                base: str = "F16", imatrix: Path | None = None, source_model: str | None = None,
                recipe_hash: str | None = None, check: bool = True, threads: int | None = None, jobs: int = 2,
                say: Callable[[str], None] = print) -> list[dict]:
    """Write OUT/NAME-<TYPE>.gguf for every requested type; return their export.json entries.

    Quants are made from the `base` conversion (F16 by default, as llama.cpp's docs do; kept as
    NAME-<base>.gguf when that type is requested too, else a temporary file). `imatrix`: calibration
    text (an imatrix is computed and saved as NAME.imatrix.gguf) or an existing llama.cpp imatrix.
    `jobs`: quantisations run at a time (each in its own child process).
    """
    from edgesmith.facts import facts

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    types = parse_types(types)
    if base.upper() not in FLOAT_TYPES:
        raise EdgesmithError(f"base type {base!r}: expected one of {', '.join(FLOAT_TYPES)}")
    fx = facts(hf_dir)
    floats = [t for t in types if t.upper() in FLOAT_TYPES]
    quants = [t for t in types if t.upper() not in FLOAT_TYPES]
    # every float file + a temporary base + quants at most ~8.5 bits per weight
    bytes_per = {"F32": 4.0, "F16": 2.0, "BF16": 2.0}
    need = fx.params_total * (sum(bytes_per[t.upper()] for t in floats) + 1.1 * len(quants) + bytes_per[base.upper()])
    check_free_space(out_dir, int(need), "the GGUF files")
    samples = tokenizer_samples(hf_dir) if check else None
    entries: list[dict] = []

    def entry(path: Path, qtype: str, t0: float, log: str | None = None) -> dict:
        d = describe(path, qtype, log)
        checks: dict[str, Any] = {"file_type_ok": d["file_type_ok"]}
        if log is None:  # converter output: its tokenizer metadata against the HF tokenizer
            checks["tokenizer_metadata"] = check_tokenizer_metadata(path, hf_dir)
            if not checks["tokenizer_metadata"]["ok"]:
                bad = [k for k, v in checks["tokenizer_metadata"].items() if v is False]
                say(f"warning: {path.name}: tokenizer metadata differs from the HF tokenizer: {', '.join(bad)}")
        if check:
            checks.update(load_check(path, hf_dir, threads, samples))
        checks["seconds"] = round(time.perf_counter() - t0, 1)
        checks["ok"] = all(checks.get(k, True) for k in ("file_type_ok", "loads", "tokenizer_ids_match_hf", "finite_logits")) \
            and checks.get("tokenizer_metadata", {}).get("ok", True)
        warn = fallback_warning(path.name, d)
        if warn:
            say(f"warning: {warn}")
        return {"path": str(path), "type": f"gguf-{qtype}", "size_bytes": d["size_bytes"], "gguf": d, "checks": checks}

    base_req = next((t for t in floats if t.upper() == base.upper()), None)
    src = out_dir / f"{name}-{base_req}.gguf" if base_req else out_dir / f".{name}-{base.upper()}.source.gguf"
    try:
        for t in ([base_req] if base_req else []) + [t for t in floats if t is not base_req]:
            t0 = time.perf_counter()
            p = out_dir / f"{name}-{t}.gguf"
            say(f"converting {hf_dir} -> {p.name} (llama.cpp convert_hf_to_gguf)")
            convert(hf_dir, p, t, name, source_model, recipe_hash)
            entries.append(entry(p, t, t0))
        if quants and not base_req:
            say(f"converting {hf_dir} -> {base.upper()} (quantisation source, not kept)")
            convert(hf_dir, src, base, name, source_model, recipe_hash)
        imx = None
        if quants and imatrix is not None:
            imatrix = Path(imatrix)
            if not imatrix.is_file():
                raise EdgesmithError(f"{imatrix}: no such calibration text or imatrix file")
            if is_imatrix_file(imatrix):
                imx = imatrix
            else:
                imx = compute_imatrix(hf_dir, imatrix, out_dir / f"{name}.imatrix.gguf", say=say)
                entries.append({"path": str(imx), "type": "imatrix", "size_bytes": imx.stat().st_size,
                                "checks": {"entries": load_imatrix(imx)[1]["entries"], "calibration": str(imatrix)}})
        def one_quant(q: str) -> dict:
            t0 = time.perf_counter()
            p = out_dir / f"{name}-{q}.gguf"
            say(f"quantising {src.name if base_req else base.upper()} -> {p.name}" + (" (with imatrix)" if imx else ""))
            log = quantize(src, p, q, imx, threads)
            e = entry(p, q, t0, log)
            e["checks"]["imatrix"] = str(imx) if imx else None
            return e

        # each quantisation (and its check) is its own child process: `jobs` of them at a time overlap one
        # child's start-up, file reading and writing with another's multi-threaded quantising
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(quants) or 1))) as pool:
            entries += list(pool.map(one_quant, quants))
    finally:
        if not base_req:
            src.unlink(missing_ok=True)
    return entries
