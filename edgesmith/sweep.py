"""`edgesmith sweep SWEEP.yaml`: students at several sizes from one recipe, the same recovery budget each, and the
trade-off they make: quality (WikiText perplexity, accuracy ± standard error) against Q4_K_M decode speed and file
size, the teacher marked and the Pareto front highlighted.

A sweep file names a pipeline recipe and the fractions of the teacher's non-embedding parameters to keep:

    recipe: recipes/smollm2-edge-cpu.yaml
    out: out/sweep
    fractions: [0.85, 0.75, 0.65, 0.5]
    set: [stages.distill.train.time_budget=4m]     # --set overrides applied to every point

Each point is an ordinary pipeline run of the recipe under OUT/pNN with `stages.prune.target_params` = the teacher's
embedding parameters + the fraction of its non-embedding ones (the recipe's fixed sizes are cleared, so prune's
search picks the shape). So an interrupted sweep resumes (finished stages are skipped) and any point can be rerun
alone with `edgesmith run`. The teacher is measured once, in the first point. Results: OUT/sweep.json, sweep.md,
sweep.png.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import from_dict, load_yaml
from .errors import ConfigError, EdgesmithError

# prune settings that fix a size: cleared at every point so target_params alone decides the shape
SIZE_KEYS = ("intermediate_size", "num_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
             "mlp_ratio", "head_ratio", "hidden_ratio", "layer_ratio")


@dataclass
class SweepConfig:
    """A sweep file's keys."""

    recipe: str = "recipes/smollm2-edge-cpu.yaml"
    """Pipeline recipe every point runs (it needs prune, export with the quant below, and bench stages)."""
    out: str = "out/sweep"
    """Output root: one pipeline output per point (pNN) plus sweep.json / sweep.md / sweep.png."""
    fractions: list[float] = field(default_factory=lambda: [0.85, 0.75, 0.65, 0.5])
    """Fractions of the teacher's non-embedding parameters to keep, one student each."""
    set: list[str] = field(default_factory=list)
    """KEY=VALUE overrides applied to the recipe at every point (like `edgesmith run --set`)."""
    quant: str = "Q4_K_M"
    """The GGUF type whose decode speed and file size the trade-off is plotted against."""

    def __post_init__(self):
        if not self.fractions:
            raise ConfigError("fractions", "expected at least one fraction")
        for i, f in enumerate(self.fractions):
            if not isinstance(f, (int, float)) or not 0.1 <= f < 1:
                raise ConfigError(f"fractions[{i}]", f"expected a fraction of the parameters to keep in [0.1, 1), got {f!r}")
        for i, s in enumerate(self.set):
            if "=" not in str(s):
                raise ConfigError(f"set[{i}]", f"expected KEY=VALUE, got {s!r}")


def point_dir(root: Path, fraction: float) -> Path:
    return root / f"p{round(100 * fraction):02d}"


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes. points: (speed: higher is better,
    perplexity: lower is better)."""
    return [i for i, (s, q) in enumerate(points)
            if not any((s2 >= s and q2 <= q) and (s2 > s or q2 < q) for j, (s2, q2) in enumerate(points) if j != i)]


def mean_acc(tasks: dict) -> tuple[float | None, float | None]:
    """Mean accuracy over tasks and its standard error (tasks are independent item sets)."""
    accs = [(v["acc"], v.get("acc_stderr") or 0.0) for v in (tasks or {}).values() if "acc" in v]
    if not accs:
        return None, None
    return sum(a for a, _ in accs) / len(accs), math.sqrt(sum(se * se for _, se in accs)) / len(accs)


def collect(root: Path, quant: str) -> dict:
    """(teacher?, student) numbers of one finished point from its bench results."""
    from edgesmith.bench.report import bench_rows

    by = {(r["model"], r["format"]): r for r in bench_rows(root) if "error" not in r}
    out = {}
    for who in ("teacher", "student"):
        hf, q = by.get((who, "HF fp32")), by.get((who, f"GGUF {quant}"))
        if not hf and not q:
            continue
        acc, acc_se = mean_acc((hf or {}).get("tasks"))
        out[who] = {
            "params_non_embedding": (hf or {}).get("params_non_embedding"), "params": (hf or {}).get("params"),
            "wikitext_ppl": ((hf or {}).get("perplexity") or {}).get("value"),
            "quant_wikitext_ppl": ((q or {}).get("perplexity") or {}).get("value"),
            "tasks": {k: {kk: v.get(kk) for kk in ("acc", "acc_stderr", "n")} for k, v in ((hf or {}).get("tasks") or {}).items()},
            "mean_acc": acc, "mean_acc_stderr": acc_se,
            "decode_tok_s": ((q or {}).get("latency") or {}).get("decode_tok_s"),
            "decode_tok_s_std": ((q or {}).get("latency") or {}).get("decode_tok_s_std"),
            "file_mb": (q or {}).get("file_mb"),
        }
    return out


def run_sweep(cfg: SweepConfig, sweep_file: str = "", say=print) -> Path:
    from . import modelio
    from .facts import facts
    from .fsutil import ensure_writable_dir, write_json, write_text
    from .pipeline import load_recipe, run_pipeline

    root = ensure_writable_dir(cfg.out)
    base = load_recipe(cfg.recipe, overrides=list(cfg.set))
    for need in ("prune", "export", "bench"):
        if need not in base.stages:
            raise EdgesmithError(f"{sweep_file or 'sweep'}: recipe {cfg.recipe} has no {need} stage (a sweep prunes, "
                                 f"exports {cfg.quant} and benchmarks each point)")
    teacher = facts(modelio.resolve(base.model))
    emb = teacher.params_total - teacher.params_non_embedding
    points = []
    t0 = time.time()
    for i, f in enumerate(cfg.fractions):
        target = emb + int(f * teacher.params_non_embedding)
        over = list(cfg.set) + [f"stages.prune.{k}=null" for k in SIZE_KEYS] + [f"stages.prune.target_params={target}"]
        if i > 0:  # the teacher is the same at every point: measured once
            over.append("stages.bench.teacher=false")
        recipe = load_recipe(cfg.recipe, out=str(point_dir(root, f)), overrides=over)
        say(f"sweep: point {i + 1}/{len(cfg.fractions)}: {f:.0%} of {teacher.params_non_embedding / 1e6:.1f}M non-embedding "
            f"parameters (target_params {target / 1e6:.1f}M) -> {point_dir(root, f)}")
        run_pipeline(recipe, cfg.recipe, say=lambda m: say(f"  {m}"))
        got = collect(point_dir(root, f), cfg.quant)
        if "student" not in got:
            raise EdgesmithError(f"sweep: {point_dir(root, f)}: no student HF/{cfg.quant} results in its bench output")
        shape = json.loads((point_dir(root, f) / "prune" / "prune_report.json").read_text())["after"]["dims"]
        # the stages' own times (their manifests): a resumed or re-collected sweep still reports what each point cost
        secs = {st: json.loads((point_dir(root, f) / st / "manifest.json").read_text())["seconds"]
                for st in ("prune", "distill", "export", "bench", "report") if (point_dir(root, f) / st / "manifest.json").is_file()}
        points.append({"fraction": f, "target_params": target, "dims": shape, "seconds": round(sum(secs.values()), 1),
                       "stage_seconds": secs,
                       **got["student"], **({"teacher": got["teacher"]} if "teacher" in got else {})})
    t_row = next((p.pop("teacher") for p in points if "teacher" in p), None)
    front = pareto([(p["decode_tok_s"] or 0.0, p["wikitext_ppl"] or math.inf) for p in points])
    for j, p in enumerate(points):
        p["pareto"] = j in front
        if t_row and t_row.get("params_non_embedding") and p.get("params_non_embedding"):
            p["fraction_measured"] = round(p["params_non_embedding"] / t_row["params_non_embedding"], 4)
        if t_row and t_row.get("wikitext_ppl") and p.get("wikitext_ppl"):
            p["ppl_ratio"] = round(p["wikitext_ppl"] / t_row["wikitext_ppl"], 3)
        if t_row and t_row.get("decode_tok_s") and p.get("decode_tok_s"):
            p["decode_speedup"] = round(p["decode_tok_s"] / t_row["decode_tok_s"], 3)
    doc = {"schema": 1, "sweep": sweep_file, "recipe": cfg.recipe, "set": cfg.set, "quant": cfg.quant, "teacher": t_row,
           "points": points, "seconds": round(sum(p["seconds"] for p in points), 1),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(root / "sweep.json", doc)
    from .bench.report import sweep_plot

    png = sweep_plot(doc, root / "sweep.png")
    write_text(root / "sweep.md", sweep_markdown(doc) + f"\n![trade-off]({png.name})\n")
    say(f"sweep finished in {time.time() - t0:.0f} s ({doc['seconds']:.0f} s of stage time in all) -> {root / 'sweep.md'}")
    return root


def sweep_markdown(doc: dict) -> str:
    q, t = doc["quant"], doc.get("teacher") or {}
    tasks = sorted({k for p in doc["points"] + [t] for k in (p.get("tasks") or {})})
    head = ["student", "shape (layers / hidden / MLP / heads)", "non-emb. params", "WikiText ppl", "× teacher"] + \
           [f"{k} acc %" for k in tasks] + [f"{q} ppl", f"{q} decode tok/s", "× teacher", f"{q} MiB", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    def acc(v):
        return "-" if not v or v.get("acc") is None else f"{100 * v['acc']:.1f} ± {100 * (v.get('acc_stderr') or 0):.1f}"

    if t:
        lines.append("| **teacher** | | " + " | ".join([f((t.get("params_non_embedding") or 0) / 1e6, ".1f") + "M", f(t.get("wikitext_ppl")), "1.00"]
                                                       + [acc(t["tasks"].get(k)) for k in tasks]
                                                       + [f(t.get("quant_wikitext_ppl")), f(t.get("decode_tok_s"), ".1f"), "1.00",
                                                          f(t.get("file_mb"), ".1f"), ""]) + " |")
    for p in doc["points"]:
        d = p["dims"]
        lines.append("| " + " | ".join([f"{p['fraction']:.0%}", f"{d['num_layers']} / {d['hidden_size']} / {d['intermediate_size']} / "
                                        f"{d['num_attention_heads']}:{d['num_key_value_heads']}",
                                        f((p.get("params_non_embedding") or 0) / 1e6, ".1f") + "M", f(p.get("wikitext_ppl")), f(p.get("ppl_ratio"))]
                                       + [acc(p["tasks"].get(k)) for k in tasks]
                                       + [f(p.get("quant_wikitext_ppl")), f(p.get("decode_tok_s"), ".1f"), f(p.get("decode_speedup")),
                                          f(p.get("file_mb"), ".1f"), "yes" if p.get("pareto") else ""]) + " |")
    return (f"# Trade-off sweep: {doc['recipe']}\n\nEvery student: the recipe's recovery with {', '.join(doc['set']) or 'no overrides'}. "
            f"Accuracy: % ± standard error. Pareto: no other student is both faster ({q} decode) and lower in perplexity. "
            f"Stage time of all points together: {doc['seconds'] / 60:.0f} min.\n\n" + "\n".join(lines) + "\n")


# ---------------------------------------------------------------- CLI


def cmd_sweep(args) -> int:
    raw = load_yaml(args.sweep)
    if args.out:
        raw["out"] = args.out
    try:
        cfg = from_dict(SweepConfig, raw)
    except ConfigError as e:
        raise EdgesmithError(f"{args.sweep}: {e}") from None
    run_sweep(cfg, args.sweep)
    return 0


def register(sub) -> None:
    p = sub.add_parser("sweep", help="students at several sizes from one recipe: quality vs speed and size, Pareto front",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep YAML (e.g. recipes/smollm2-sweep.yaml)")
    p.add_argument("--out", help="output root, overrides the sweep file's `out`")
    p.set_defaults(func=cmd_sweep)
