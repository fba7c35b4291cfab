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
from typing import TYPE_CHECKING

from edgesmith.errors import EdgesmithError

from .importance import Dims
from .shape import dims_dict
from .surgery import plan_keep

if TYPE_CHECKING:
    from .prune import PruneConfig

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


def candidate_decode(model, tok, keep, d: Dims, work: Path, rescale_norms: bool = True, threads: int = 0) -> dict:
    """q4km_decode of the shape `keep` cuts from `model`: the pruned checkpoint is written to work/hf layer by layer,
    as the prune stage writes its output (no pruned copy of the model in memory), and removed afterwards."""
    import copy

    from .checkpoint import write_pruned
    from .surgery import new_config

    hf = work / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    src = Dims.of(model.config)
    try:
        write_pruned(dict(model.state_dict()), src, keep, new_config(model.config, src, d, keep), type(model),
                     copy.deepcopy(model.generation_config), hf, next(model.parameters()).dtype, rescale_norms)
        tok.save_pretrained(hf)
        return q4km_decode(hf, work, threads)
    finally:
        shutil.rmtree(hf, ignore_errors=True)


def speed_filter(cfg: PruneConfig, model, tok, src_dir: Path, cands: list, search: list[dict], scores, layer_scores,
                 out: Path, say) -> list[int]:
    """Time each candidate's Q4_K_M against the teacher's (compress/speed.py); record it in its search row and return
    the candidates at or above cfg.target_speedup. None reaching it is an error naming the fastest."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".speed-", dir=out.parent if str(out.parent) else ".") as tmp:
        base = q4km_decode(src_dir, Path(tmp) / "teacher")
        say(f"  speed: teacher Q4_K_M decodes {base['decode_tok_s']:.1f} tok/s")
        for j, d in enumerate(cands):
            keep = plan_keep(scores, layer_scores, Dims.of(model.config), d)
            sp = candidate_decode(model, tok, keep, d, Path(tmp) / f"c{j}", cfg.rescale_norms)
            search[j].update(decode_tok_s=sp["decode_tok_s"], file_mb=sp["file_mb"],
                             speedup=round(sp["decode_tok_s"] / base["decode_tok_s"], 3))
            say(f"  speed: {dims_dict(d)} -> {sp['decode_tok_s']:.1f} tok/s ({search[j]['speedup']:.2f}x the teacher)")
    for row in search:
        row["teacher_decode_tok_s"] = base["decode_tok_s"]
    ok = [j for j, row in enumerate(search) if row["speedup"] >= cfg.target_speedup]
    if not ok:
        best = max(search, key=lambda r: r["speedup"])
        raise EdgesmithError(f"--target-speedup {cfg.target_speedup}: no shape of {cfg.target_params} parameters reaches it on this "
                             f"machine (fastest {best['speedup']:.2f}x: {best['dims']}); lower --target-params or the speedup")
    return ok
