"""`edgesmith run RECIPE.yaml`: run the stages a recipe lists, in order
prune -> distill -> finetune -> merge -> export -> bench -> report, each into OUT/<stage>/ with a
`manifest.json` (inputs, settings, hashes, versions, timings).

A re-run skips every stage whose manifest matches (same settings, same input, outputs intact) and
re-runs from the first stage whose input or settings changed. `--from STAGE` forces a re-run from
that stage on; `--only STAGE` runs just that one (its input must exist).

Recipe layout (YAML):
    name: smollm2-edge-cpu          # used for output names
    model: default                  # the starting model (HF dir, .gguf or default); also the teacher
    out: out/demo                   # every stage writes OUT/<stage>/
    stages:                         # any subset, always run in the fixed order above
      prune:    {...}               # PruneConfig fields (model/out are set by the runner)
      distill:  {...}               # DistillConfig fields (teacher/student/out set by the runner)
      finetune: {...}               # FinetuneConfig fields (model/out set by the runner)
      export:   {...}               # ExportConfig fields (model/out/name set by the runner)
      bench:    {...}               # bench settings (artifacts/json set by the runner)
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from .errors import EdgesmithError
from .fsutil import ensure_writable_dir, quick_fingerprint, write_json

ORDER = ("prune", "distill", "finetune", "merge", "export", "bench", "report")


@dataclass
class Recipe:
    """A pipeline recipe: the starting model, where outputs go, and the settings of each stage."""

    name: str = "model"
    """Short name used for exported files (NAME-Q4_K_M.gguf, Ollama model name)."""
    model: str = "default"
    """Starting model (HF directory, .gguf or 'default'); also the teacher for distillation."""
    out: str = "out/run"
    """Output root: each stage writes OUT/<stage>/."""
    description: str = ""
    """What this recipe is for (shown in the report)."""
    stages: dict = field(default_factory=dict)
    """Stage name -> that stage's settings (see the module docstring)."""

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in ORDER]
        if unknown:
            raise ConfigError(f"stages.{unknown[0]}", f"unknown stage (expected some of {', '.join(ORDER)})")
        for s, v in self.stages.items():
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"stages.{s}", f"expected a mapping of settings, got {v!r}")
        if "merge" in self.stages and "finetune" not in self.stages:
            raise ConfigError("stages.merge", "merge needs a finetune stage before it")


# ---------------------------------------------------------------- hashing and manifests


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(path: Path) -> str:
    """Identity of an artifact on disk: its manifest's output hash if it has one, else file fingerprints."""
    path = Path(path)
    man = path / "manifest.json" if path.is_dir() else None
    if man is not None and man.is_file():
        try:
            return json.loads(man.read_text())["output_hash"]
        except (KeyError, json.JSONDecodeError):
            pass
    if path.is_file():
        return quick_fingerprint(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")
    return _hash([(str(p.relative_to(path)), p.stat().st_size, quick_fingerprint(p) if p.stat().st_size > 1 << 20 else p.read_bytes().hex()[:64]) for p in files])


def _outputs(path: Path) -> list[dict]:
    if path.is_file():
        return [{"path": path.name, "size": path.stat().st_size}]
    return [{"path": str(p.relative_to(path)), "size": p.stat().st_size}
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "manifest.json" and ".tmp-" not in p.name]


def versions() -> dict:
    out = {"edgesmith": __version__, "python": platform.python_version()}
    for mod in ("torch", "transformers", "peft", "llama_cpp", "onnxruntime", "gguf"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def manifest_ok(stage_dir: Path, settings_hash: str, input_hash: str) -> bool:
    """True when stage_dir holds a complete output made from the same input with the same settings."""
    man = stage_dir / "manifest.json"
    if not man.is_file():
        return False
    try:
        m = json.loads(man.read_text())
    except json.JSONDecodeError:
        return False
    if m.get("settings_hash") != settings_hash or m.get("input_hash") != input_hash:
        return False
    for o in m.get("outputs", []):
        p = stage_dir / o["path"]
        if not p.is_file() or p.stat().st_size != o["size"]:
            return False
    return True


# ---------------------------------------------------------------- stage adapters
# Each adapter turns (recipe section, context) into the stage's own config and runs it. The runner
# owns the wiring keys (input model, output dir); a recipe that sets them is refused.


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


@dataclass
class MergeSettings:
    """Settings of the merge stage (the adapter and its base are wired by the pipeline)."""

    dtype: str = "float32"
    """Precision the adapter is merged in: float32, bfloat16 or float16 (never 4-bit)."""


def _merge_cfg(ctx: Ctx, sec: dict):
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


@dataclass
class BenchStage:
    """Settings of the bench stage: which artifacts, which measurements."""

    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "piqa"])
    """Multiple-choice tasks (run when their data is present: data_dir, EDGESMITH_DATA= or ../shared/data)."""
    limit: int | None = 100
    """First N items of each task."""
    max_chunks: int | None = 10
    """WikiText-2 windows of `ctx` tokens for perplexity."""
    ctx: int = 512
    """Perplexity window in tokens (llama-perplexity -c)."""
    corpus_chunks: int | None = 8
    """Windows of the held-out teacher corpus (distill stage) for a second perplexity."""
    latency: bool = True
    """Measure load time, TTFT, prefill and decode tokens/s, peak memory."""
    repeat: int = 3
    """Timed repetitions (mean ± std) after a warm-up."""
    threads: int = 0
    """Threads (0 = every CPU this process may use)."""
    data_dir: str | None = None
    """Evaluation data folder (mc/, lm/); default EDGESMITH_DATA, else ../shared/data when present."""
    teacher: bool = True
    """Also measure the starting model (HF, and its source GGUF when it came from one) as the reference row."""
    task_kinds: list[str] | None = None
    """Artifact kinds that get the multiple-choice tasks (hf, gguf, onnx; null = all): e.g. [hf] scores teacher and
    student on many items once, while every format still gets perplexity, KL to the teacher and latency."""
    export_formats: list[str] | None = None
    """Exported files to measure, by type (F16, Q4_0, Q4_K_M, Q5_K_M, Q8_0, onnx); null = every exported file."""
    teacher_quants: list[str] = field(default_factory=list)
    """Also export the teacher to these GGUF types (e.g. [Q4_K_M]) so speed and size compare at the same quantisation."""
    teacher_source_gguf: bool = True
    """Also measure the GGUF the teacher came from (the default model's shipped Q4_1, or the .gguf given as model)."""

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit", f"expected >= 1 or null, got {self.limit}")
        if self.repeat < 1:
            raise ConfigError("repeat", f"expected >= 1, got {self.repeat}")
        for i, k in enumerate(self.task_kinds or []):
            if k not in ("hf", "gguf", "onnx"):
                raise ConfigError(f"task_kinds[{i}]", f"expected hf, gguf or onnx, got {k!r}")


def _bench_cfg(ctx: Ctx, sec: dict):
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


def input_fingerprint(spec: str) -> str:
    from . import modelio

    if not spec:
        return ""
    p = Path(spec)
    if spec == "default" or spec.endswith(".gguf") and not p.exists():
        p = modelio.default_gguf() if spec == "default" else p
    if not p.exists():
        raise EdgesmithError(f"{spec}: no such file or directory")
    return fingerprint(p)


# ---------------------------------------------------------------- the runner


def load_recipe(path: str | Path, model: str | None = None, out: str | None = None, data: str | None = None,
                quants: list[str] | None = None, name: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file and apply the command line (MODEL=, OUT=, DATA=, QUANTS=, --set) on top."""
    raw = load_yaml(path)
    if "stages" not in raw:
        raise EdgesmithError(f"{path}: not a pipeline recipe (no 'stages:' mapping); a single-stage settings file "
                             "goes to that stage's command, e.g. edgesmith prune --recipe FILE")
    raw = json.loads(json.dumps(raw))  # deep copy
    for k, v in (("model", model), ("out", out), ("name", name)):
        if v:
            raw[k] = v
    stages = raw.get("stages") or {}
    if not isinstance(stages, dict):
        raise EdgesmithError(f"{path}: stages: expected a mapping of stage -> settings")
    for k in list(stages):
        if stages[k] is None:
            stages[k] = {}
    if data:
        target = "finetune" if "finetune" in stages else "distill" if "distill" in stages else None
        if target is None:
            raise EdgesmithError(f"{path}: DATA/--data given but the recipe has no finetune or distill stage")
        stages[target]["data"] = data
    if quants:
        if "export" not in stages:
            raise EdgesmithError(f"{path}: QUANTS/--quants given but the recipe has no export stage")
        stages["export"]["gguf"] = quants
    try:
        raw = apply_overrides(raw, overrides or [])
        return from_dict(Recipe, raw)
    except ConfigError as e:
        raise EdgesmithError(f"{path}: {e}") from None


def recipe_hash(recipe: Recipe) -> str:
    """Provenance of the model an export carries: the start model and the stages that changed weights."""
    return _hash({"model": recipe.model, "stages": {s: recipe.stages[s] for s in ("prune", "distill", "finetune", "merge")
                                                     if s in recipe.stages}})


def plan(recipe: Recipe, recipe_file: str = "") -> tuple[Ctx, dict]:
    """Validate every stage's settings up front (a typo in bench must not surface after an hour of training)."""
    ctx = Ctx(recipe=recipe, root=Path(recipe.out), current=recipe.model, teacher=recipe.model)
    ctx.recipe_hash = recipe_hash(recipe)
    cfgs = {}
    for s in ORDER:
        if s in recipe.stages:
            try:
                cfgs[s] = STAGES[s][0](ctx, recipe.stages[s] or {})
            except ConfigError as e:
                raise EdgesmithError(f"{recipe_file or 'recipe'}: {e}") from None
    return ctx, cfgs


def _swap_in(work: Path, final: Path) -> None:
    """Replace `final` by `work` in two renames: a failed stage never touches the finished artifact."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(work, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_pipeline(recipe: Recipe, recipe_file: str = "", from_stage: str | None = None, only: str | None = None,
                 until: str | None = None, dry_run: bool = False, say: Callable[[str], None] = print) -> Path:
    """Run the recipe's stages in order; return the output root."""
    ctx, cfgs = plan(recipe, recipe_file)
    listed = [s for s in ORDER if s in recipe.stages]
    for flag, s in (("--from", from_stage), ("--only", only), ("--until", until)):
        if s is not None and s not in listed:
            raise EdgesmithError(f"{flag} {s}: the recipe has no {s} stage (it has {', '.join(listed)})")
    root = ensure_writable_dir(recipe.out)
    ctx.root = root
    forced = False
    t_all = time.perf_counter()
    for s in listed:
        final = root / s
        cfg = cfgs[s] = STAGES[s][0](ctx, recipe.stages[s] or {})  # rebuilt: wiring now names real outputs
        if only and s != only:
            _advance(ctx, s, final, cfg)
            continue
        forced = forced or s == from_stage  # --from: this stage and every later one re-run
        if dry_run and forced:  # its inputs do not exist yet: an earlier stage would make them
            say(f"[{s}] would run -> {final}")
            _advance(ctx, s, final, cfg)
            continue
        inputs = stage_inputs(ctx, s, cfg)
        input_hash = _hash({k: input_fingerprint(str(v)) for k, v in inputs.items()})
        settings = {"stage": s, "settings": to_dict(cfg) if cfg is not None else {}, "name": recipe.name,
                    "edgesmith": __version__}
        settings_hash = _hash(settings)
        if not forced and s != only and manifest_ok(final, settings_hash, input_hash):
            say(f"[{s}] up to date ({final})")
            _advance(ctx, s, final, cfg)
            if until == s:
                break
            continue
        if dry_run:
            say(f"[{s}] would run -> {final}")
            _advance(ctx, s, final, cfg)
            forced = True  # everything after a stage that would change is stale too
            continue
        say(f"[{s}] running -> {final}")
        work = root / ".work" / s
        pending = {"settings_hash": settings_hash, "input_hash": input_hash}
        marker = work / ".pending.json"
        resumable = s in ("distill", "finetune") and marker.is_file() and json.loads(marker.read_text()) == pending
        if work.exists() and not resumable:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        write_json(marker, pending)
        t0 = time.perf_counter()
        artifact = Path(STAGES[s][1](ctx, cfg, work))
        seconds = time.perf_counter() - t0
        for junk in ("checkpoint", ".pending.json"):  # optimizer state is not part of the artifact
            j = work / junk
            shutil.rmtree(j) if j.is_dir() else j.unlink(missing_ok=True)
        outputs = _outputs(work)
        write_json(work / "manifest.json", {
            "stage": s, "recipe": recipe_file, "recipe_name": recipe.name, "inputs": {k: str(v) for k, v in inputs.items()},
            "input_hash": input_hash, "settings": settings["settings"], "settings_hash": settings_hash,
            "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - seconds)),
            "seconds": round(seconds, 1), "artifact": str(artifact.relative_to(work)) if artifact.is_relative_to(work) else str(artifact),
            "outputs": outputs, "output_hash": _hash(outputs_fingerprint(work, outputs)),
        })
        _swap_in(work, final)
        say(f"[{s}] done in {seconds:.1f} s")
        _advance(ctx, s, final, cfg)
        if until == s:
            break
    say(f"pipeline finished in {time.perf_counter() - t_all:.1f} s -> {root}")
    return root


def outputs_fingerprint(work: Path, outputs: list[dict]) -> list:
    return [(o["path"], o["size"], quick_fingerprint(work / o["path"])) for o in outputs]


def _advance(ctx: Ctx, s: str, final: Path, cfg) -> None:
    """After stage `s` (run or up to date), point the context at its output."""
    ctx.artifacts[s] = str(final)
    if s in ("prune", "distill", "merge"):
        ctx.current = str(final)
        ctx.artifacts["_model"] = str(final)
    elif s == "finetune":
        ctx.artifacts["_finetune_base"] = ctx.current
        ctx.current = str(final)
        if not (final / "adapter_config.json").is_file() and (final / "config.json").is_file():
            ctx.artifacts["_model"] = str(final)  # method: full


# ---------------------------------------------------------------- report


def bench_rows(root: Path) -> list[dict]:
    """report_rows of a finished pipeline output root: the student is the last HF model a stage wrote."""
    ctx_paths = {s: str(root / s) for s in ORDER if (root / s).exists()}
    for s in ("merge", "distill", "prune"):
        if s in ctx_paths and (root / s / "config.json").is_file():
            ctx_paths["_model"] = ctx_paths[s]
            break
    from edgesmith.bench.report import join_runs

    return join_runs(root, ctx_paths)


def stage_times(root: Path) -> list[list[str]]:
    out = [["stage", "seconds", "finished output"]]
    for s in ORDER:
        m = root / s / "manifest.json"
        if m.is_file():
            d = json.loads(m.read_text())
            out.append([s, f"{d.get('seconds', 0):.1f}", f"{s}/ ({d.get('started', '')})"])
    return out


def write_report(root: Path, recipe: Recipe, work: Path) -> Path:
    """OUT/report/{report.md, *.png} and a copy OUT/report.md with links into report/."""
    from edgesmith.bench.report import headline, md_table, pipeline_table, plot

    rows = bench_rows(root)
    md = [f"# {recipe.name}: edgesmith pipeline report", ""]
    if recipe.description:
        md += [recipe.description.strip(), ""]
    md += [f"Start model: `{recipe.model}`; output: `{root}`; edgesmith {__version__}; "
           f"{time.strftime('%Y-%m-%d %H:%M')}", ""]
    if rows:
        bench = root / "bench"
        # the machine and settings of a results document (not the stage's manifest.json, which has neither)
        doc = json.loads(next(p for p in (bench / "wikitext.json", bench / "corpus.json") if p.is_file()).read_text())
        mach = doc.get("machine", {})
        md += [f"Measured on {mach.get('cpu', '?')} ({mach.get('cores', '?')} cores, {doc.get('settings', {}).get('threads')} "
               f"threads). WikiText ppl: WikiText-2 raw test, llama-perplexity method (windows of "
               f"{doc.get('settings', {}).get('ctx')} tokens, second half scored). Corpus ppl: held-out slice of the "
               "teacher-generated distillation corpus. KL/top-1: agreement with the teacher's next-token distribution.", "",
               ]
        top = headline(rows)
        if top:
            md += ["## Teacher vs student", ""] + top + [""]
        md += ["## Every format", "", "Accuracy: % ± standard error.", "", md_table(pipeline_table(rows)), ""]
    md += ["## Stage times", "", md_table(stage_times(root)), ""]
    export = root / "export"
    if (export / "export.json").is_file():
        ex = json.loads((export / "export.json").read_text())
        mfs = sorted(p.name for p in export.glob("Modelfile.*"))
        md += ["## Ollama", "", f"GGUF files and Modelfiles side by side in `{export}`:", "", "```"]
        md += [f"ollama create {ex['name']}:{m.split('.', 1)[1].lower()} -f {export / m}" for m in mfs] + ["```", ""]
    pngs = plot([{**r, "artifact": f"{r['model']} {r['format']}"} for r in rows if "error" not in r], work) if rows else []
    md_body = "\n".join(md)
    write_text_(work / "report.md", md_body + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
    write_text_(root / "report.md", md_body + "\n" + "\n".join(f"![{p.stem}](report/{p.name})" for p in pngs) + "\n")
    return work / "report.md"


def write_text_(path: Path, text: str) -> None:
    from .fsutil import write_text

    write_text(path, text)


def summary(root: Path) -> str:
    """What the user sees at the end: where the Ollama-ready files are, and the table."""
    from edgesmith.bench.report import headline, pipeline_table, text_table

    lines = []
    export = root / "export"
    if (export / "export.json").is_file():
        mfs = sorted(export.glob("Modelfile.*"))
        lines.append(f"Ollama-ready files (GGUF + Modelfile side by side): {export}")
        if mfs:
            name = json.loads((export / "export.json").read_text())["name"]
            pick = next((m for m in mfs if m.name == "Modelfile.Q4_K_M"), mfs[0])
            lines.append(f"  ollama create {name} -f {pick}")
    rows = bench_rows(root) if (root / "bench").is_dir() else []
    if rows:
        lines += ["", text_table(pipeline_table(rows))]
        top = headline(rows)
        if top:
            lines += ["", "Teacher vs student:"] + top
    if (root / "report.md").is_file():
        lines += ["", f"report: {root / 'report.md'}"]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def cmd_run(args) -> int:
    recipe = load_recipe(args.recipe, model=args.model, out=args.out, data=args.data,
                         quants=[q.strip() for q in args.quants.split(",") if q.strip()] if args.quants else None,
                         name=args.name, overrides=args.set)
    root = run_pipeline(recipe, args.recipe, from_stage=args.from_stage, only=args.only, until=args.until,
                        dry_run=args.dry_run)
    if not args.dry_run:
        print(summary(root))
    return 0


def register(sub) -> None:
    import argparse

    p = sub.add_parser("run", help="run a recipe: prune -> distill -> finetune -> merge -> export -> bench -> report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="pipeline recipe YAML (e.g. recipes/smollm2-edge-cpu.yaml)")
    p.add_argument("--model", help="starting model, overrides the recipe's `model` (HF dir, .gguf or default)")
    p.add_argument("--out", help="output root, overrides the recipe's `out`")
    p.add_argument("--data", help="training data for the finetune stage (or distill when there is no finetune)")
    p.add_argument("--quants", help="GGUF types to export, comma-separated (e.g. F16,Q4_K_M)")
    p.add_argument("--name", help="name of the exported files / Ollama model, overrides the recipe's `name`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set stages.prune.intermediate_size=768 (repeatable)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--from", dest="from_stage", choices=ORDER, help="re-run this stage and every later one")
    g.add_argument("--only", choices=ORDER, help="run just this stage (earlier outputs must exist)")
    p.add_argument("--until", choices=ORDER, help="stop after this stage")
    p.add_argument("--dry-run", action="store_true", help="print which stages would run or are up to date")
    p.set_defaults(func=cmd_run)
