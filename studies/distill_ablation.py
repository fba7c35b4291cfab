"""Distillation ablation on the demo shape (issue: a student worth shipping).

The earlier demo student (SmolLM2-135M-Instruct, MLP 1536 -> 1024, 30 -> 26 layers, activation / block-influence
ranking: 65% of the non-embedding parameters; the demo now uses the `search` row's shape) is recovered by each row's method for the same training time
(--train-budget); the teacher's corpus generation is timed and reported next to it (what a user pays on top).
Each row changes one thing against the row it names as its base. Scored with the bench harness (the code `edgesmith bench`
runs): WikiText-2 perplexity (40 windows of 512, second half scored), KL and top-1 agreement with the teacher on
the first 4 of those windows, and, with --tasks, multiple-choice accuracy with standard errors.

    .venv/bin/python studies/distill_ablation.py                       # every row, ppl + KL
    .venv/bin/python studies/distill_ablation.py --rows pruned,v0,best --tasks arc_easy,piqa,winogrande --limit 500

Results: studies/results/distill-ablation.json (+ .md). Work (models, scores) under out/study-ablation, reused
when present, so an interrupted study continues.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# one change per row, each on top of the row named in "base"
ROWS = {
    "pruned": {"about": "pruned only, no recovery"},
    "v0": {"about": "the previous demo: 64 teacher chat answers (<= 128 tokens) packed in 512-token blocks, top-64 cache, "
                    "fp32, lr 2e-4 constant, 2 x 512 tokens per step",
           "distill": {"data": "teacher:64", "teacher_max_new_tokens": 128, "teacher_batch_size": 16, "cache_teacher_topk": 64,
                       "packing": True, "max_length": 512, "val_fraction": 0.15,
                       "train": {"precision": "fp32", "lr": 2e-4, "min_lr_ratio": 1.0, "batch_size": 2}}},
    "corpus": {"about": "v0 with the teacher corpus: 100k tokens, half free-running text, half chat answers, top-64 "
                        "targets kept while sampling (batched, bf16 sampling); fp32 training, 8 sequences per step",
               "distill": {"data": "teacher", "max_length": 512, "val_fraction": 0.05,
                           "corpus": {"tokens": 100_000, "text_fraction": 0.5, "max_new_tokens": 192, "batch_size": 128},
                           "train": {"precision": "fp32", "lr": 2e-4, "min_lr_ratio": 1.0, "batch_size": 8}}},
    "bf16": {"base": "corpus", "about": "corpus + bf16 autocast training (this CPU reports AVX512-BF16)",
             "distill": {"train": {"precision": "bf16"}}},
    "schedule": {"base": "bf16", "about": "bf16 + lr 5e-4 with cosine decay over the time budget to 10%",
                 "distill": {"train": {"lr": 5e-4, "min_lr_ratio": 0.1, "schedule": "time"}}},
    "ls-pruned": {"shape": "demo-ls", "about": "the demo shape with prune --reconstruct ls (down_proj refit on calibration "
                                             "activations, ridge 0.01), pruned only"},
    "ls": {"base": "schedule", "shape": "demo-ls", "about": "schedule's recovery from the ls-reconstructed student"},
    "block-phase": {"base": "schedule", "about": "schedule, the first 20% of the budget on block-wise training (every block on "
                                                "the teacher's input learns the teacher's stream before the next kept layer)",
                    "distill": {"block_phase": 0.2}},
    "block-mix": {"base": "schedule", "about": "schedule + the block-wise loss mixed into KD (weight 1, student-side inputs)",
                  "distill": {"block_weight": 1.0}},
    "schedule-rerun": {"base": "schedule", "about": "schedule again, on the day of the top-k rows (the machine's speed "
                                                  "varies between days: compare steps and tok/s)"},
    "topk16": {"base": "schedule", "about": "schedule with 16 instead of 64 teacher log-probs kept per position (a new corpus, "
                                          "same seed and size)", "distill": {"corpus": {"topk": 16}}},
    "topk256": {"base": "schedule", "about": "schedule with 256 teacher log-probs kept per position (a new corpus, same seed "
                                            "and size)", "distill": {"corpus": {"topk": 256}}},
    "full-logits": {"base": "schedule", "live_teacher": True,
                    "about": "schedule's corpus text, the teacher run at every step: KL over the full 49k vocabulary "
                             "instead of the cached top-64 (its forward comes out of the same budget)"},
    "depth-pruned": {"shape": "depth", "about": "another shape at the same size: 30 -> 19 layers (block influence), "
                                                "MLP kept at 1536 (63% of non-embedding parameters), pruned only"},
    "depth": {"base": "schedule", "shape": "depth", "about": "schedule's recovery on the 19-layer shape"},
    "schedule-rerun2": {"base": "schedule", "about": "schedule again, on the day of the search rows (a fresh machine at full "
                                                    "speed: compare steps and tok/s)"},
    "search-pruned": {"shape": "search", "about": "the shape `prune --target-params` picks at this size (the sweep's 65% "
                                                  "student: 22 layers, MLP 1280; 64% of non-embedding parameters), pruned only"},
    "search": {"base": "schedule", "shape": "search", "about": "schedule's recovery on the searched 22-layer / MLP 1280 shape"},
}
# the student shapes the rows start from (demo: MLP 1536 -> 1024 and 30 -> 26 layers)
SHAPES = {"demo": {"intermediate_size": 1024, "num_layers": 26}, "depth": {"intermediate_size": 1536, "num_layers": 19},
          "demo-ls": {"intermediate_size": 1024, "num_layers": 26, "reconstruct": "ls"},
          "search": {"intermediate_size": 1280, "num_layers": 22}}


def live_teacher(row: str) -> bool:
    return bool(ROWS[row].get("live_teacher"))


def merged(row: str) -> dict:
    """The row's distill overrides, resolved through its base rows."""
    spec = ROWS[row]
    base = merged(spec["base"]) if "base" in spec else {}

    def deep(a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = deep(out.get(k, {}), v) if isinstance(v, dict) else v
        return out

    return deep(base, spec.get("distill", {}))


def score(model_dir: Path, cache: Path, args, reference: Path | None) -> dict:
    from edgesmith.bench.harness import BenchSettings, resolve_settings, run_artifact
    from edgesmith.fsutil import write_json

    want = {"tasks": sorted(args.tasks), "limit": args.limit, "windows": args.ppl_windows}
    if cache.is_file():
        r = json.loads(cache.read_text())
        if r.get("_want") == want:
            return r
    s = resolve_settings(BenchSettings(artifacts=[str(model_dir)], ppl=True, ctx=512, max_chunks=args.ppl_windows,
                                       tasks=list(args.tasks), limit=args.limit, threads=args.threads,
                                       reference=str(reference) if reference else None, agree_chunks=4))
    t0 = time.time()
    ref_file = None
    if reference:  # the teacher's log-probs on the agreement windows, kept on disk (as the bench does)
        ref_file = cache.parent / "reference-teacher.npz"
        if not ref_file.is_file():
            run_artifact(str(reference), dataclasses.asdict(s), ref_file=str(ref_file), ref_only=True)
    r = run_artifact(str(model_dir), dataclasses.asdict(s), ref_file=str(ref_file) if ref_file else None)
    r["seconds"] = round(time.time() - t0, 1)
    r["_want"] = want
    write_json(cache, r)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"rows to run (default: all of {', '.join(ROWS)})")
    ap.add_argument("--train-budget", default="6m", help="training wall-clock budget per row (default 6m)")
    ap.add_argument("--tasks", default="", help="multiple-choice tasks to score as well, e.g. arc_easy,piqa,winogrande")
    ap.add_argument("--limit", type=int, default=500, help="items per task (default 500)")
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--work", default=str(REPO / "out" / "study-ablation"))
    ap.add_argument("--out", default=str(REPO / "studies" / "results" / "distill-ablation.json"))
    args = ap.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]

    import torch

    from edgesmith.compress.prune import PruneConfig
    from edgesmith.compress.prune import run as prune
    from edgesmith.config import from_dict
    from edgesmith.distill.distill import DistillConfig
    from edgesmith.distill.distill import run as distill
    from edgesmith.fsutil import write_json, write_text
    from edgesmith.facts import facts
    from edgesmith.modelio import resolve
    from edgesmith.trainconfig import parse_duration

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher = resolve("default")
    def pruned_dir(shape: str) -> Path:
        d = work / ("pruned" if shape == "demo" else f"pruned-{shape}")
        if not (d / "config.json").is_file():
            prune(PruneConfig(model="default", out=str(d), **SHAPES[shape], round_to=256,
                              importance="activation", layer_importance="block-influence", calib_windows=16, eval_windows=0))
        return d

    pruned = pruned_dir("demo")
    budget = parse_duration(args.train_budget)
    prev = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    results = {r["row"]: r for r in prev.get("rows", [])}
    prev_teacher_tasks = (prev.get("teacher") or {}).get("tasks") or {}  # a run without --tasks keeps them
    t_score = score(teacher, work / "score-teacher.json", args, None)
    for row in [r for r in args.rows.split(",") if r]:
        if row not in ROWS:
            raise SystemExit(f"--rows: unknown row {row!r} (known: {', '.join(ROWS)})")
        t0 = time.time()
        load0 = os.getloadavg()[0]
        shape = ROWS[row].get("shape") or (ROWS[ROWS[row]["base"]].get("shape") if "base" in ROWS[row] else None) or "demo"
        start = pruned_dir(shape)
        model, info = start, {"shape": SHAPES[shape], "nonembedding_params": facts(start).params_non_embedding}
        if "distill" in ROWS[row] or "base" in ROWS[row]:
            over = merged(row)
            out = work / row
            gen_s = 0.0
            if not (out / "distill.json").is_file():
                # the corpus first, timed: its cost comes out of the row's budget
                tg = time.time()
                if over["data"] == "teacher":
                    from edgesmith.distill.teacher_data import CorpusSpec, build_teacher_corpus

                    d = build_teacher_corpus("default", from_dict(CorpusSpec, over.get("corpus", {})))
                    gen_s = json.loads((d / "meta.json").read_text()).get("build_seconds", time.time() - tg)
                    if live_teacher(row):  # the same sequences as plain text records; the teacher scores them live
                        text_file = work / f"corpus-text-{d.name}.jsonl"
                        rows = [json.loads(x) for x in (d / "examples.jsonl").read_text(encoding="utf-8").splitlines() if x]
                        write_text(text_file, "".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n" for r in rows))
                        over = {**{k: v for k, v in over.items() if k != "corpus"}, "data": str(text_file), "format": "text",
                                "packing": False, "cache_teacher_topk": 0}
                else:
                    from edgesmith.distill.teacher_data import generate_corpus

                    n = int(over["data"].split(":")[1])
                    marker = work / f"gen-seconds-{n}-{over.get('teacher_max_new_tokens')}.txt"
                    generate_corpus("default", n, max_new_tokens=over.get("teacher_max_new_tokens", 128),
                                    batch_size=over.get("teacher_batch_size", 16))
                    if not marker.is_file():
                        write_text(marker, f"{time.time() - tg:.1f}\n")
                    gen_s = float(marker.read_text())
                train_s = budget
                base = {"teacher": "default", "student": str(start), "out": str(out), "loss": "forward_kl", "temperature": 1.0}
                tr = {"max_steps": 100_000, "warmup_steps": 5, "time_budget": f"{train_s:.0f}s", "eval_every": 0,
                      "keep_best": False, "progress": True, **over.get("train", {})}
                cfg = from_dict(DistillConfig, {**base, **{k: v for k, v in over.items() if k != "train"}, "train": tr})
                distill(cfg)
                write_text(out / "generation_seconds.txt", f"{gen_s:.1f}\n")
            man = json.loads((out / "distill.json").read_text())
            gen_s = float((out / "generation_seconds.txt").read_text()) if (out / "generation_seconds.txt").is_file() else None
            model = out
            info = {**info, "generation_seconds": gen_s, "train_seconds": man["result"]["seconds"], "steps": man["result"]["steps"],
                    "train_tokens_seen": man["result"]["tokens"], "precision": man["result"]["precision"],
                    "distinct_train_tokens": man["examples"]["train_counts"].get("tokens"),
                    "epochs": man.get("epochs") or round(man["result"]["tokens"] / max(1, man["examples"]["train_counts"].get("tokens", 1)), 2),
                    "tokens_per_s": round(man["result"]["tokens"] / max(1e-9, man["result"]["seconds"]), 1),
                    "data": man["data"].get("kind"), "mix": man["data"].get("mix"), "config": man["config"]}
        r = score(model, work / f"score-{row}.json", args, teacher)
        ppl = r["perplexity"]["value"]
        agree = r.get("agreement") or {}
        results[row] = {"row": row, "about": ROWS[row]["about"], "wikitext_ppl": round(ppl, 3),
                        "ppl_ratio_to_teacher": round(ppl / t_score["perplexity"]["value"], 3),
                        "kl_vs_teacher": agree.get("kl"), "top1_vs_teacher": agree.get("top1"),
                        "tasks": {k: {kk: v[kk] for kk in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n") if kk in v}
                                  for k, v in (r.get("tasks") or {}).items()},
                        **info, "load_average_start": round(load0, 2), "wall_seconds": round(time.time() - t0, 1)}
        print(json.dumps({k: results[row][k] for k in ("row", "wikitext_ppl", "ppl_ratio_to_teacher", "kl_vs_teacher", "top1_vs_teacher")}))
        write_json(args.out, document(results, t_score, args, budget, facts(teacher), facts(pruned), torch, prev_teacher_tasks))
    write_text(Path(args.out).with_suffix(".md"), table(json.loads(Path(args.out).read_text())))
    return 0


def kept_above_chance(student: dict, teacher: dict) -> float | None:
    from edgesmith.bench.report import kept_above_chance as kept

    f = kept(student, teacher)
    return None if f is None else round(f, 3)


def document(results: dict, t_score: dict, args, budget: float, ft, fp, torch, prev_teacher_tasks: dict | None = None) -> dict:
    t_tasks = {**(prev_teacher_tasks or {}),
               **{k: {kk: v[kk] for kk in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n") if kk in v}
                  for k, v in (t_score.get("tasks") or {}).items()}}
    for r in results.values():
        r["kept_above_chance"] = kept_above_chance(r["tasks"], t_tasks) if r["tasks"] else None
    return {
        "teacher": {"wikitext_ppl": round(t_score["perplexity"]["value"], 3), "tasks": t_tasks,
                    "nonembedding_params": ft.params_non_embedding},
        "student_nonembedding_params": fp.params_non_embedding,
        "student_fraction_of_teacher": round(fp.params_non_embedding / ft.params_non_embedding, 4),
        "budget_seconds_per_row": budget,
        "rows": [results[k] for k in ROWS if k in results],
        "perplexity_setup": {k: t_score["perplexity"][k] for k in ("ctx", "chunks", "tokens_scored")},
        "command": " ".join(["python studies/distill_ablation.py"] + sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "bf16_autocast_fast": __import__("edgesmith.machine", fromlist=["x"]).cpu_has_fast_bf16()},
    }


def table(doc: dict) -> str:
    tasks = sorted({t for r in doc["rows"] for t in r["tasks"]} | set(doc["teacher"]["tasks"]))
    head = ["row", "WikiText ppl", "× teacher", "KL", "top-1 %"] + [f"{t} acc % (±se)" for t in tasks] + \
           ["kept above chance (tasks where the teacher is > 2σ above it)", "gen s", "train s", "steps", "distinct tokens", "epochs", "tok/s", "precision"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def acc(v):
        return f"{100 * v['acc']:.1f} ± {100 * (v.get('acc_stderr') or 0):.1f}" if v else ""

    t = doc["teacher"]
    lines.append("| teacher | " + " | ".join([f"{t['wikitext_ppl']:.2f}", "1.00", "0", "100"] + [acc(t["tasks"].get(x)) for x in tasks]
                                            + ["1.00"] + [""] * 7) + " |")
    for r in doc["rows"]:
        def f(x, fmt="{:.2f}"):
            return "" if x is None else fmt.format(x)
        lines.append("| " + " | ".join([r["row"], f(r["wikitext_ppl"]), f(r["ppl_ratio_to_teacher"]), f(r["kl_vs_teacher"], "{:.3f}"),
                                        f(None if r["top1_vs_teacher"] is None else 100 * r["top1_vs_teacher"], "{:.1f}")]
                                       + [acc(r["tasks"].get(x)) for x in tasks]
                                       + [f(r.get("kept_above_chance")), f(r.get("generation_seconds"), "{:.0f}"), f(r.get("train_seconds"), "{:.0f}"),
                                          f(r.get("steps"), "{}"), f(r.get("distinct_train_tokens"), "{}"), f(r.get("epochs")),
                                          f(r.get("tokens_per_s"), "{:.0f}"), r.get("precision") or ""]) + " |")
    lines += ["", "Rows:"] + [f"- **{r['row']}**: {r['about']}" for r in doc["rows"]]
    lines += ["", f"Student: {doc['student_fraction_of_teacher']:.1%} of the teacher's non-embedding parameters; "
              f"training budget per row {doc['budget_seconds_per_row']:.0f} s (corpus generation timed separately: gen s); command: `{doc['command']}`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
