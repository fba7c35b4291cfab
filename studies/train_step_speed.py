"""What one distillation step of the demo student costs on this CPU: fp32, bf16 autocast, and each with torch.compile
(issue: more learning per CPU-minute).

The step is the earlier demo's: the pruned SmolLM2 student (MLP 1536 -> 1024, 30 -> 26 layers), 8 sequences of 200 tokens,
forward, the loss over the full vocabulary's log-softmax (the demo's KL on cached top-64 targets costs the same
log-softmax), backward, gradient clipping and AdamW, as `edgesmith.trainloop` runs them (accelerate's autocast on
CPU). Each variant runs in its own process (a compiled graph or a thread pool never leaks into the next), warms up
(compilation included there, and reported), then times --steps steps; the median and spread are reported.

    .venv/bin/python studies/train_step_speed.py [--steps 8] [--variants fp32,bf16,fp32-compile,bf16-compile]

Results: studies/results/train-step-speed.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"fp32": ("no", False), "bf16": ("bf16", False), "fp32-compile": ("no", True), "bf16-compile": ("bf16", True)}
BATCH, SEQ = 8, 200  # the demo's 8 sequences of <= 200 tokens


def student_dir(work: Path) -> Path:
    """The demo's pruned student (made once, as the demo recipe's prune stage makes it)."""
    from edgesmith.compress.prune import PruneConfig, run

    d = work / "pruned"
    if not (d / "config.json").is_file():
        run(PruneConfig(model="default", out=str(d), intermediate_size=1024, num_layers=26, round_to=256,
                        importance="activation", layer_importance="block-influence", calib_windows=16, eval_windows=0))
    return d


def measure(model_dir: str, variant: str, steps: int, warmup: int, q) -> None:
    """One variant, in a child process: warm-up seconds (compilation included) and every timed step's seconds."""
    import torch
    from accelerate import Accelerator

    from edgesmith.modelio import load_model

    precision, compiled = VARIANTS[variant]
    acc = Accelerator(cpu=True, mixed_precision=precision)
    model = load_model(model_dir, dtype="float32").train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    model, opt = acc.prepare(model, opt)
    fwd = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=g) for _ in range(warmup + steps)]

    def step(ids) -> None:
        with acc.autocast():
            logits = fwd(input_ids=ids, use_cache=False).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    for ids in batches[:warmup]:
        step(ids)
    warm = time.perf_counter() - t
    times = []
    for ids in batches[warmup:]:
        t = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - t)
    q.put({"variant": variant, "warmup_seconds": round(warm, 2), "step_seconds": [round(x, 3) for x in times]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--work", default=str(REPO / "out" / "study-train-speed"))
    ap.add_argument("--out", default=str(REPO / "studies" / "results" / "train-step-speed.json"))
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r} (known: {', '.join(VARIANTS)})")

    from edgesmith.facts import facts
    from edgesmith.fsutil import write_json
    from edgesmith.machine import cpu_has_fast_bf16

    model = student_dir(Path(args.work))
    ctx = mp.get_context("spawn")
    rows = []
    for v in variants:
        q = ctx.Queue()
        p = ctx.Process(target=measure, args=(str(model), v, args.steps, args.warmup, q))
        p.start()
        r = q.get()
        p.join()
        med = statistics.median(r["step_seconds"])
        r.update(median_seconds=round(med, 3), min_seconds=min(r["step_seconds"]), max_seconds=max(r["step_seconds"]),
                 tokens_per_s=round(BATCH * SEQ / med, 1))
        rows.append(r)
        print(json.dumps({k: r[k] for k in ("variant", "warmup_seconds", "median_seconds", "tokens_per_s")}), flush=True)
    base = next((r for r in rows if r["variant"] == "fp32"), rows[0])
    for r in rows:
        r["speedup_vs_" + base["variant"]] = round(base["median_seconds"] / r["median_seconds"], 3)
    import torch

    write_json(args.out, {
        "student": str(model), "student_params": facts(model).params_total, "batch": [BATCH, SEQ],
        "steps": args.steps, "warmup": args.warmup, "rows": rows,
        "command": " ".join(["python studies/train_step_speed.py"] + sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "bf16_autocast_fast": cpu_has_fast_bf16(), "torch": torch.__version__, "load_average": os.getloadavg()[0]},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
