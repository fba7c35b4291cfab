"""Finetune evidence: LoRA on the Alpaca demo train split (edgesmith data prepare, seed 0) for a short CPU
budget; report validation loss before/after and generation metrics (exact match, ROUGE-L, BLEU, chrF via
the `alpaca` bench task, i.e. the same test split) for the base model and the merged model.

    .venv/bin/python studies/finetune_alpaca.py --budget 10m     # writes studies/results/finetune-alpaca.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def gen_score(model_dir: Path, cache: Path, limit: int, threads: int) -> dict:
    from edgesmith.bench.harness import BenchSettings, resolve_settings, run_artifact
    from edgesmith.fsutil import write_json

    if cache.is_file():
        return json.loads(cache.read_text())
    s = resolve_settings(BenchSettings(artifacts=[str(model_dir)], ppl=False, tasks=["alpaca"], limit=limit,
                                       threads=threads, gen_max_new_tokens=96))
    t0 = time.time()
    r = run_artifact(str(model_dir), dataclasses.asdict(s))
    r["seconds"] = round(time.time() - t0, 1)
    write_json(cache, r)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="10m")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", default="2e-4")
    ap.add_argument("--limit", type=int, default=50, help="test items scored by generation (default 50 = the whole test split)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", default="fp32", help="fp32 (default) or bf16; bf16 autocast is ~4x SLOWER on AVX2-only CPUs")
    ap.add_argument("--eval-every", type=int, default=20, help="validation loss every N steps")
    ap.add_argument("--work", default=str(REPO / "out" / "bench-finetune"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "finetune-alpaca.json"))
    args = ap.parse_args()

    from edgesmith.prepare import PrepareConfig, prepare
    from edgesmith.finetune.lora import FinetuneConfig
    from edgesmith.finetune.lora import run as finetune
    from edgesmith.finetune.merge import merge_adapter
    from edgesmith.fsutil import write_json
    from edgesmith.modelio import resolve
    from edgesmith.trainconfig import TrainConfig

    work = Path(args.work)
    data_src = REPO.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
    data = work / "data"
    if not (data / "summary.json").is_file():
        prepare(PrepareConfig(inputs=[str(data_src)], out=str(data), seed=0))
    adapter, merged = work / "adapter", work / "merged"
    cfg = FinetuneConfig(model="default", data=str(data), out=str(adapter), method="lora", max_length=args.max_length,
                         train=TrainConfig(lr=float(args.lr), max_steps=100_000, warmup_steps=5, min_lr_ratio=1.0,
                                           time_budget=args.budget, batch_size=4, precision=args.precision, eval_every=args.eval_every,
                                           eval_batches=0, keep_best=True))
    if not (adapter / "finetune.json").is_file():
        finetune(cfg)
    man = json.loads((adapter / "finetune.json").read_text())
    if not (merged / "model.safetensors").is_file():
        merge_adapter(adapter, merged)
    base = gen_score(resolve("default"), work / "score-base.json", args.limit, args.threads)
    tuned = gen_score(merged, work / "score-merged.json", args.limit, args.threads)
    val = [json.loads(x) for x in (adapter / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    out = {
        "validation_loss": {"before": man["result"]["first_val_loss"], "best": man["result"]["best_val_loss"],
                            "curve": [[v["step"], v["val_loss"]] for v in val]},
        "validation_loss_decreased": man["result"]["best_val_loss"] < man["result"]["first_val_loss"],
        "generation_test_split": {"base": base["tasks"]["alpaca"], "merged": tuned["tasks"]["alpaca"]},
        "train": {k: man["result"][k] for k in ("steps", "stopped", "tokens", "seconds", "precision", "trainable_params")},
        "data": man["data"],
        "config": {"method": "lora", "lora_r": 8, "lora_alpha": 16, "max_length": args.max_length, "lr": float(args.lr),
                   "budget": args.budget, "batch_size": 4, "precision": args.precision, "test_items_scored": args.limit},
        "command": " ".join(["python studies/finetune_alpaca.py"] + sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
    }
    write_json(args.out, out)
    print(json.dumps({"val_before": out["validation_loss"]["before"], "val_best": out["validation_loss"]["best"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
