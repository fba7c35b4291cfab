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

import hashlib
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
from .stages import ORDER, STAGES, Ctx, stage_inputs



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


# ---------------------------------------------------------------- CLI


def cmd_run(args) -> int:
    recipe = load_recipe(args.recipe, model=args.model, out=args.out, data=args.data,
                         quants=[q.strip() for q in args.quants.split(",") if q.strip()] if args.quants else None,
                         name=args.name, overrides=args.set)
    root = run_pipeline(recipe, args.recipe, from_stage=args.from_stage, only=args.only, until=args.until,
                        dry_run=args.dry_run)
    if not args.dry_run:
        from edgesmith.bench.report import summary

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
