"""Decode speed of a shape on this machine, for `prune --target-params N --target-speedup X`.

The speed of a quantised model depends on its shape, not on how well its weights were chosen, so each candidate
shape of the search is measured right after pruning: saved as an HF directory, converted and quantised to Q4_K_M with
the export stage's own converter and quantiser, and timed by the bench harness (tg128 decode tok/s after a warm-up,
in its own child process) exactly as `edgesmith bench --latency` would time the final export. The teacher's Q4_K_M is
timed the same way, so the ratio compares like with like on the CPU the user will run.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

QUANT = "Q4_K_M"  # the quantisation the speed budget refers to (the demo's and Ollama's default)


def q4km_decode(hf_dir: Path, work: Path, threads: int = 0, repeat: int = 2) -> dict:
    """HF directory -> {decode_tok_s, decode_tok_s_std, file_mb} of its Q4_K_M on this machine (work is scratch)."""
    from edgesmith.bench.harness import BenchSettings, resolve_settings, run_artifact
    from edgesmith.export.gguf_convert import convert
    from edgesmith.export.quantize import quantize
    from edgesmith.native import run_isolated

    work.mkdir(parents=True, exist_ok=True)
    f16, q = work / "model-F16.gguf", work / f"model-{QUANT}.gguf"
    convert(Path(hf_dir), f16, "F16")
    quantize(f16, q, QUANT)
    f16.unlink()
    s = resolve_settings(BenchSettings(artifacts=[str(q)], ppl=False, latency=True, repeat=repeat, threads=threads))
    r = run_isolated(run_artifact, str(q), dataclasses.asdict(s), what="decode timing")
    lat = r.get("latency") or {}
    out = {"decode_tok_s": lat.get("decode_tok_s"), "decode_tok_s_std": lat.get("decode_tok_s_std"), "file_mb": r.get("file_mb")}
    q.unlink(missing_ok=True)
    return out


def candidate_decode(model, tok, work: Path, threads: int = 0) -> dict:
    """q4km_decode of an in-memory (pruned) model: saved to work/hf first, removed afterwards."""
    hf = work / "hf"
    model.save_pretrained(hf, safe_serialization=True)
    tok.save_pretrained(hf)
    try:
        return q4km_decode(hf, work, threads)
    finally:
        shutil.rmtree(hf, ignore_errors=True)
