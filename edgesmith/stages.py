"""The stages a pipeline recipe can list, and how the runner (edgesmith/pipeline.py) calls each one.

Each stage has an adapter pair in STAGES: `cfg(ctx, section)` turns the recipe's section into the stage's own
typed config (the dataclass its command uses), and `run(ctx, cfg, work)` builds the stage's output in `work` and
returns the artifact inside it that the next stage consumes. The runner owns the wiring keys (input model,
output dir); a recipe that sets them is refused. `stage_inputs` names what each stage consumes, hashed to
decide whether a finished output is still valid.
"""
from __future__ import annotations

import dataclasses
import importlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .config import ConfigError, from_dict, to_dict
from .errors import EdgesmithError
from .fsutil import write_json

if TYPE_CHECKING:
    from edgesmith.bench.harness import BenchStage
    from edgesmith.pipeline import Recipe

ORDER = ("prune", "distill", "finetune", "merge", "export", "bench", "report")


@dataclass
class Ctx:
    recipe: Recipe
    root: Path
    current: str          # the artifact the next stage consumes (HF dir or 'default')
    teacher: str          # the starting model
    artifacts: dict = field(default_factory=dict)  # stage -> output path
    recipe_hash: str = ""  # provenance written into exported files


def _stage_cfg(module: str, cls: str, section: dict, wiring: dict, stage: str):
    klass = getattr(importlib.import_module(module), cls)
    taken = [k for k in wiring if k in section]
    if taken:
        raise ConfigError(f"stages.{stage}.{taken[0]}", "is set by the pipeline (the previous stage's output); remove it")
    section = dict(section)
    # a partial `train:` mapping keeps the stage's own loop defaults (e.g. distill's lr) for the keys it omits
    train_field = next((f for f in dataclasses.fields(klass) if f.name == "train"), None)
    if train_field is not None and isinstance(section.get("train"), dict):
        section["train"] = {**to_dict(train_field.default_factory()), **section["train"]}
    try:
        return from_dict(klass, {**section, **wiring})
    except ConfigError as e:
        raise e.prefixed(f"stages.{stage}") from None



# Each stage: (inputs, run). `inputs(ctx, cfg)` names what the stage consumes (hashed to decide
# whether a finished output is still valid); `run(ctx, cfg, work)` builds the output in `work` and
# returns the artifact path inside it that the next stage consumes.


def _prune_cfg(ctx: Ctx, sec: dict):
    return _stage_cfg("edgesmith.compress.prune", "PruneConfig", sec, {"model": ctx.current, "out": "."}, "prune")


def _prune_run(ctx: Ctx, cfg, work: Path) -> Path:
    from edgesmith.compress.prune import run

    return run(dataclasses.replace(cfg, out=str(work)))


def _distill_cfg(ctx: Ctx, sec: dict):
    return _stage_cfg("edgesmith.distill.distill", "DistillConfig", sec,
                      {"teacher": ctx.teacher, "student": ctx.current, "out": "."}, "distill")


def _distill_run(ctx: Ctx, cfg, work: Path) -> Path:
    from edgesmith.distill.distill import heldout_text, run

    cfg = dataclasses.replace(cfg, out=str(work))
    cfg.train.resume = (work / "checkpoint" / "state.pt").is_file()  # an interrupted run continues
    out = run(cfg)
    # the held-out slice of the training corpus, as plain text: the bench stage measures every format's
    # perplexity on it (text the student never trained on, in the distribution it was distilled on)
    text = heldout_text(cfg)
    if text.strip():
        from .fsutil import write_text

        write_text(out / "heldout.txt", text + "\n")
    return out


def _finetune_cfg(ctx: Ctx, sec: dict):
    return _stage_cfg("edgesmith.finetune.lora", "FinetuneConfig", sec, {"model": ctx.current, "out": "."}, "finetune")


def _finetune_run(ctx: Ctx, cfg, work: Path) -> Path:
    from edgesmith.finetune.lora import run

    cfg = dataclasses.replace(cfg, out=str(work))
    cfg.train.resume = (work / "checkpoint" / "state.pt").is_file()
    return run(cfg)


def _merge_cfg(ctx: Ctx, sec: dict):
    from edgesmith.finetune.merge import MergeSettings

    try:
        return from_dict(MergeSettings, sec)
    except ConfigError as e:
        raise e.prefixed("stages.merge") from None


def _merge_run(ctx: Ctx, cfg, work: Path) -> Path:
    from edgesmith.finetune.merge import merge_adapter

    adapter = Path(ctx.current)
    if not (adapter / "adapter_config.json").is_file():  # method: full already wrote a whole model
        shutil.copytree(adapter, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint*", "manifest.json"))
        return work
    return merge_adapter(adapter, work, base=ctx.artifacts.get("_finetune_base"), dtype=cfg.dtype)


def _export_cfg(ctx: Ctx, sec: dict):
    return _stage_cfg("edgesmith.export.run", "ExportConfig", sec,
                      {"model": ctx.current, "out": ".", "name": ctx.recipe.name, "recipe_hash": ctx.recipe_hash}, "export")


def _export_run(ctx: Ctx, cfg, work: Path) -> Path:
    from edgesmith.export.run import run

    return run(dataclasses.replace(cfg, out=str(work)))


def _bench_cfg(ctx: Ctx, sec: dict):
    from edgesmith.bench.harness import BenchStage

    try:
        return from_dict(BenchStage, sec)
    except ConfigError as e:
        raise e.prefixed("stages.bench") from None


def _bench_artifacts(ctx: Ctx, cfg: BenchStage) -> list[str]:
    from . import modelio

    arts = []
    if cfg.teacher:
        arts.append(str(modelio.resolve(ctx.teacher)))
        src = ctx.teacher if str(ctx.teacher).endswith(".gguf") else (str(modelio.default_gguf()) if ctx.teacher == "default" else None)
        if src and cfg.teacher_source_gguf:
            arts.append(src)
    student = ctx.artifacts.get("_model")  # the last HF model the pipeline produced
    if student and student not in arts:
        arts.append(student)
    if "export" in ctx.artifacts:
        if cfg.export_formats is None:
            arts.append(ctx.artifacts["export"])
        else:
            from edgesmith.bench.harness import expand_artifacts

            want = {f.upper() for f in cfg.export_formats}
            for p in expand_artifacts([ctx.artifacts["export"]]):
                fmt = "ONNX" if p.is_dir() else p.stem.rsplit("-", 1)[-1].upper()  # onnx: every ONNX export
                if fmt in want:
                    arts.append(str(p))
    return arts


def _bench_run(ctx: Ctx, cfg: BenchStage, work: Path) -> Path:
    from edgesmith.bench.harness import BenchSettings, run
    from edgesmith.fsutil import data_dir as find_data_dir

    from . import modelio

    found = find_data_dir()
    data_dir = cfg.data_dir or (str(found) if found else None)
    arts = _bench_artifacts(ctx, cfg)
    ref = str(modelio.resolve(ctx.teacher))
    if cfg.teacher and cfg.teacher_quants:
        # the teacher at the student's quantisation, so "x times faster" compares like with like
        from edgesmith.export.gguf_convert import convert
        from edgesmith.export.quantize import quantize

        f16 = work / "teacher" / f"{modelio.model_name(ref)}-F16.gguf"
        f16.parent.mkdir(parents=True, exist_ok=True)
        dests = [f16.with_name(f16.name.replace("-F16.gguf", f"-{q}.gguf")) for q in cfg.teacher_quants]
        for q, dest in zip(cfg.teacher_quants, dests):
            if not dest.is_file():  # the F16 intermediate only while a quant is missing
                if not f16.is_file():
                    convert(ref, f16, "F16")
                quantize(f16, dest, q)
            arts.insert(1 + arts.index(ref) if ref in arts else 0, str(dest))
        f16.unlink(missing_ok=True)
    common = dict(artifacts=arts, ctx=cfg.ctx, threads=cfg.threads, reference=ref if cfg.teacher else None,
                  task_kinds=cfg.task_kinds)
    runs = []
    heldout = Path(ctx.artifacts["distill"]) / "heldout.txt" if "distill" in ctx.artifacts else None
    heldout = heldout if heldout is not None and heldout.is_file() else None
    if data_dir:  # WikiText-2 + multiple choice + agreement with the teacher + latency (+ the held-out corpus, same load)
        runs.append(("wikitext", BenchSettings(**common, data_dir=data_dir, max_chunks=cfg.max_chunks, tasks=list(cfg.tasks),
                                               limit=cfg.limit, latency=cfg.latency, repeat=cfg.repeat,
                                               extra_texts={"corpus": str(heldout)} if heldout else {},
                                               extra_chunks=cfg.corpus_chunks)))
    elif heldout:  # no evaluation data: the held-out corpus is the perplexity text, and carries latency and agreement
        runs.append(("corpus", BenchSettings(**common, ppl_text=str(heldout), max_chunks=cfg.corpus_chunks,
                                             latency=cfg.latency, repeat=cfg.repeat)))
    if not runs:
        raise EdgesmithError("bench: nothing to measure: no evaluation data (../shared/data or EDGESMITH_DATA=) and no "
                             "held-out teacher corpus (a distill stage with data teacher:N)")
    for name, s in runs:
        print(f"bench ({name}): {len(s.artifacts)} artifact specs")
        doc = run(s, progress=lambda i, n, a, r=None: print(f"  {r['summary']}") if r else None)
        write_json(work / f"{name}.json", doc)
    return work


def _report_cfg(ctx: Ctx, sec: dict):
    if sec:
        raise ConfigError(f"stages.report.{next(iter(sec))}", "the report stage takes no settings")
    return None


def _report_run(ctx: Ctx, cfg, work: Path) -> Path:
    from edgesmith.bench.report import write_report

    write_report(ctx.root, ctx.recipe, work)
    return work


STAGES: dict[str, tuple[Callable, Callable]] = {
    "prune": (_prune_cfg, _prune_run),
    "distill": (_distill_cfg, _distill_run),
    "finetune": (_finetune_cfg, _finetune_run),
    "merge": (_merge_cfg, _merge_run),
    "export": (_export_cfg, _export_run),
    "bench": (_bench_cfg, _bench_run),
    "report": (_report_cfg, _report_run),
}


def stage_inputs(ctx: Ctx, stage: str, cfg) -> dict:
    """Name -> artifact the stage consumes; their fingerprints make the manifest's input hash."""
    if stage == "prune":
        return {"model": ctx.current}
    if stage == "distill":
        ins = {"teacher": ctx.teacher, "student": ctx.current}
        if not cfg.data.startswith("teacher"):
            ins["data"] = cfg.data
        return ins
    if stage == "finetune":
        return {"model": ctx.current, "data": cfg.data}
    if stage == "merge":
        return {"adapter": ctx.current, "base": ctx.artifacts.get("_finetune_base", "")}
    if stage == "export":
        return {"model": ctx.current}
    if stage == "bench":
        heldout = Path(ctx.artifacts.get("distill", "/nonexistent")) / "heldout.txt"
        return {f"artifact{i}": a for i, a in enumerate(_bench_artifacts(ctx, cfg))} | {
            "heldout": str(heldout) if heldout.is_file() else ""}
    if stage == "report":
        return {s: ctx.artifacts[s] for s in ORDER if s in ctx.artifacts}
    raise KeyError(stage)
