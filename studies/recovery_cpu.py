"""Recovery on CPU: prune the default model to <= 70% of its non-embedding parameters (compress stage),
distil it from the unpruned teacher for a CPU time budget on teacher-generated data (`--data teacher:N`,
no dataset needed), and score teacher, pruned and distilled with the same harness code as `edgesmith bench`
(WikiText-2 raw test perplexity, 40 windows of 512, second half of each window scored; ARC-Easy and PIQA
log-likelihood accuracy).

    .venv/bin/python studies/recovery_cpu.py --budget 15m            # writes studies/results/recovery-cpu.json

Stages are cached under --work (pruned model, teacher corpus in the edgesmith cache, distilled model,
per-model scores), so an interrupted run continues.
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


def score(model_dir: Path, cache: Path, args) -> dict:
    from edgesmith.bench.harness import BenchSettings, resolve_settings, run_artifact

    if cache.is_file():
        return json.loads(cache.read_text())
    s = resolve_settings(BenchSettings(artifacts=[str(model_dir)], ppl=True, ctx=512, max_chunks=args.ppl_windows,
                                       tasks=["arc_easy", "piqa"], limit=args.limit, threads=args.threads))
    t0 = time.time()
    r = run_artifact(str(model_dir), dataclasses.asdict(s))
    r["seconds"] = round(time.time() - t0, 1)
    from edgesmith.fsutil import write_json

    write_json(cache, r)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="15m", help="distillation wall-clock budget (default 15m)")
    ap.add_argument("--teacher-n", type=int, default=256, help="teacher answers to generate (default 256)")
    ap.add_argument("--teacher-max-new-tokens", type=int, default=192, help="longest teacher answer (default 192)")
    ap.add_argument("--intermediate-size", type=int, default=896, help="pruned MLP width (default 896 -> ~69%% of non-embedding params)")
    ap.add_argument("--num-layers", type=int, default=None, help="also drop decoder layers (block influence) down to this many")
    ap.add_argument("--importance", default="activation", help="MLP channel ranking (activation hurts far less than magnitude)")
    ap.add_argument("--limit", type=int, default=300, help="items per task (default 300)")
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--lr", default="2e-4")
    ap.add_argument("--batch-size", type=int, default=2, help="512-token blocks per step")
    ap.add_argument("--cache-teacher-topk", type=int, default=64,
                    help="teacher run once, top-k log-probs on disk (0 = teacher forward every step; default 64)")
    ap.add_argument("--precision", default="fp32", help="fp32 (default) or bf16; bf16 autocast is ~4x SLOWER on AVX2-only CPUs")
    ap.add_argument("--work", default=str(REPO / "out" / "bench-recovery"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "recovery-cpu.json"))
    args = ap.parse_args()

    import torch

    from edgesmith.compress.prune import PruneConfig
    from edgesmith.compress.prune import run as prune
    from edgesmith.distill.distill import DistillConfig
    from edgesmith.distill.distill import run as distill
    from edgesmith.fsutil import write_json
    from edgesmith.facts import facts
    from edgesmith.modelio import resolve
    from edgesmith.trainconfig import TrainConfig

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher = resolve("default")
    pruned = work / "pruned"
    if not (pruned / "config.json").is_file():
        prune(PruneConfig(model="default", out=str(pruned), intermediate_size=args.intermediate_size, num_layers=args.num_layers,
                          round_to=128, importance=args.importance, layer_importance="block-influence", eval_windows=0))
    t_ne, p_ne = facts(teacher).params_non_embedding, facts(pruned).params_non_embedding
    assert p_ne <= 0.70 * t_ne, f"pruned model keeps {p_ne / t_ne:.1%} of non-embedding params (> 70%)"

    distilled = work / "distilled"
    dcfg = DistillConfig(teacher="default", student=str(pruned), data=f"teacher:{args.teacher_n}", out=str(distilled),
                         max_length=512, packing=True, val_fraction=0.05, teacher_batch_size=32,
                         teacher_max_new_tokens=args.teacher_max_new_tokens, cache_teacher_topk=args.cache_teacher_topk,
                         train=TrainConfig(lr=float(args.lr), max_steps=100_000, warmup_steps=5, min_lr_ratio=1.0,
                                           time_budget=args.budget, batch_size=args.batch_size, grad_accum=1, precision=args.precision,
                                           eval_every=0, keep_best=False, progress=True))
    t0, load0 = time.time(), os.getloadavg()[0]
    if not (distilled / "distill.json").is_file():
        from edgesmith.distill.teacher_data import generate_corpus

        tg = time.time()
        generate_corpus("default", args.teacher_n, max_new_tokens=dcfg.teacher_max_new_tokens,
                        temperature=dcfg.teacher_temperature, seed=dcfg.train.seed, batch_size=dcfg.teacher_batch_size)
        (work / "teacher_gen_seconds.txt").write_text(f"{time.time() - tg:.1f}\n")
        distill(dcfg)
    man = json.loads((distilled / "distill.json").read_text())

    res_t = score(teacher, work / "score-teacher.json", args)
    res_p = score(pruned, work / "score-pruned.json", args)
    res_s = score(distilled, work / "score-distilled.json", args)
    tp, pp, sp = (r["perplexity"]["value"] for r in (res_t, res_p, res_s))
    recovered = (pp - sp) / (pp - tp) if pp > tp else None
    budget_s = man["result"]["seconds"]
    out = {
        "teacher_ppl": round(tp, 3), "pruned_ppl": round(pp, 3), "student_ppl": round(sp, 3),
        "recovered_fraction_of_ppl_loss": None if recovered is None else round(recovered, 3),
        "target_met": recovered is not None and recovered >= 0.5,
        "teacher_nonembedding_params": t_ne, "student_nonembedding_params": p_ne,
        "student_fraction_of_teacher": round(p_ne / t_ne, 4),
        "tasks": {name: {k: r["tasks"][k] for k in r["tasks"]} for name, r in
                  (("teacher", res_t), ("pruned", res_p), ("student", res_s))},
        "perplexity_setup": {k: res_t["perplexity"][k] for k in ("ctx", "chunks", "tokens_scored", "text")},
        "distill": {"budget": args.budget, "trained_seconds": budget_s, "steps": man["result"]["steps"],
                    "tokens": man["result"]["tokens"], "stopped": man["result"]["stopped"],
                    "teacher_answers": args.teacher_n, "train_examples": man["examples"]["train"],
                    "teacher_generation_seconds": float((work / "teacher_gen_seconds.txt").read_text()) if (work / "teacher_gen_seconds.txt").is_file() else None,
                    "teacher_topk_cache": args.cache_teacher_topk or None,
                    "loss": man["config"]["loss"], "temperature": man["config"]["temperature"], "lr": float(args.lr), "batch_size": args.batch_size,
                    "precision": man["result"]["precision"], "final_train_loss": man["result"]["train_loss"],
                    "validation_kd_loss_before_after": [man["result"]["first_val_loss"], man["result"]["last_val_loss"]]},
        "prune": {"intermediate_size": args.intermediate_size, "num_layers": args.num_layers, "importance": args.importance,
                  "layer_importance": "block-influence", "round_to": 128},
        "command": " ".join(["python studies/recovery_cpu.py"] + sys.argv[1:]) if len(sys.argv) > 1 else "python studies/recovery_cpu.py",
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "load_average_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)]},
        "wall_seconds_this_invocation": round(time.time() - t0, 1),
    }
    write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("teacher_ppl", "pruned_ppl", "student_ppl", "recovered_fraction_of_ppl_loss")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
