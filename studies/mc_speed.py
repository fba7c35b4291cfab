"""Multiple-choice scoring speed: edgesmith's batched HF scoring vs lm-evaluation-harness on the same items.

The default model (SmolLM2-135M-Instruct, fp32, CPU), the first N items of ARC-Easy and PIQA from ../shared/data,
the same prompts (tests/lm_eval_tasks.py), the same threads. Ours: `edgesmith bench`'s harness (bench/harness.py,
all choices of several items in one forward). lm-eval 0.4: its HF model with batch size 8. Rounds alternate
(ours, lm-eval, ours, ...) so a slower minute of the machine hits both. Accuracy of both is written next to the
times (they are equal: tests/test_bench.py::test_multiple_choice_equals_lm_evaluation_harness).

    .venv/bin/python studies/mc_speed.py --limit 500 --rounds 1

Result: studies/results/mc-speed.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=500, help="items per task (default 500)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lm-eval-batch", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "studies" / "results" / "mc-speed.json"))
    args = ap.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")

    import torch

    torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from edgesmith.bench import harness as H
    from edgesmith.machine import machine_info
    from edgesmith.fsutil import data_dir
    from edgesmith.fsutil import write_json
    from edgesmith.modelio import resolve

    sys.path.insert(0, str(REPO / "tests"))
    from lm_eval_tasks import OURS, write_tasks

    data, model = data_dir(), resolve("default")
    if data is None:
        raise SystemExit("../shared/data not found")
    tmp = Path(tempfile.mkdtemp(prefix="mc-speed-"))
    tasks = write_tasks(data, tmp, args.limit)
    s = H.resolve_settings(H.BenchSettings(ppl=False, tasks=list(OURS), data_dir=str(data), limit=args.limit, threads=args.threads))
    rounds = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        ours = H.run_artifact(str(model), dataclasses.asdict(s))
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = lm_eval.simple_evaluate(model=HFLM(pretrained=str(model), batch_size=args.lm_eval_batch, device="cpu", dtype="float32"),
                                      tasks=list(OURS.values()), num_fewshot=0, limit=args.limit,
                                      task_manager=TaskManager(include_path=str(tasks)))
        t_ref = time.perf_counter() - t0
        rounds.append({"edgesmith_seconds": round(t_ours, 1), "edgesmith_task_seconds": {k: v for k, v in ours["seconds"].items() if k.startswith("task:")},
                       "lm_eval_seconds": round(t_ref, 1),
                       "edgesmith_acc": {k: ours["tasks"][k]["acc"] for k in OURS},
                       "lm_eval_acc": {k: ref["results"][v]["acc,none"] for k, v in OURS.items()}})
        print(json.dumps(rounds[-1]))
    doc = {"model": str(model), "items_per_task": args.limit, "tasks": list(OURS), "threads": args.threads,
           "lm_eval": {"version": lm_eval.__version__, "batch_size": args.lm_eval_batch}, "rounds": rounds,
           "speedup_vs_lm_eval": round(sum(r["lm_eval_seconds"] for r in rounds) / sum(r["edgesmith_seconds"] for r in rounds), 2),
           "machine": machine_info(args.threads),
           "load_average_end": os.getloadavg()[0], "command": " ".join(["python studies/mc_speed.py"] + sys.argv[1:])}
    write_json(args.out, doc)
    print(f"edgesmith {sum(r['edgesmith_seconds'] for r in rounds):.0f} s vs lm-eval {sum(r['lm_eval_seconds'] for r in rounds):.0f} s "
          f"-> {doc['speedup_vs_lm_eval']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
