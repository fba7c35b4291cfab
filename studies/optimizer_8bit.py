"""train.optimizer adamw vs adamw8bit on this CPU: peak memory and seconds per training step of a ~0.45B Llama built
from a config (random weights: memory and time do not depend on them), next to the memory estimate the stages check
before they start -> studies/results/optimizer-8bit.json.

    .venv/bin/python studies/optimizer_8bit.py [--steps 4] [--seq-len 256]

Each optimizer runs in its own process (peak RSS is per process), through edgesmith.trainloop.train: full-parameter
training, fp32, batch 1, next-token loss on random tokens. Seconds per step are the mean of the steps after the
first (the first allocates the optimizer states).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "studies" / "results" / "optimizer-8bit.json"
CONFIG = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
              num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=1024)


def one(optimizer: str, steps: int, seq_len: int) -> dict:
    """Train the config's model for `steps` steps with `optimizer` in this process; its peak RSS and step times."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgesmith.trainconfig import TrainConfig, causal_lm_loss_sum
    from edgesmith.trainloop import train

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    rng = random.Random(0)
    examples = [{"input_ids": ids, "labels": ids} for ids in
                ([rng.randrange(3, CONFIG["vocab_size"]) for _ in range(seq_len)] for _ in range(steps))]
    cfg = TrainConfig(lr=1e-4, warmup_steps=0, max_steps=steps, batch_size=1, precision="fp32", progress=False,
                      keep_best=False, optimizer=optimizer)

    def loss_fn(m, b):
        return causal_lm_loss_sum(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

    with tempfile.TemporaryDirectory() as out:
        res = train(model, examples, loss_fn, cfg, out, pad_id=0)
        metrics = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    t = [m["elapsed_s"] for m in metrics if "loss" in m]
    return {"optimizer": optimizer, "params": sum(p.numel() for p in model.parameters()), "steps": res.steps,
            "seconds_per_step": round((t[-1] - t[0]) / (len(t) - 1), 2), "first_step_s": t[0],
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.seq_len)))
        return 0
    from edgesmith.fsutil import write_json
    from edgesmith.machine import machine_info
    from edgesmith.memory import GIB, ModelShape, training_memory

    rows = []
    for opt in ("adamw", "adamw8bit"):
        p = subprocess.run([sys.executable, __file__, "--one", opt, "--steps", str(args.steps), "--seq-len", str(args.seq_len)],
                           capture_output=True, text=True, check=True)
        row = json.loads(p.stdout.strip().splitlines()[-1])
        shape = ModelShape(row["params"], CONFIG["num_hidden_layers"], CONFIG["hidden_size"], CONFIG["intermediate_size"],
                           CONFIG["vocab_size"])
        parts = training_memory(shape, row["params"], 1, args.seq_len, args.seq_len, optimizer=opt)
        row["estimate_gib"] = round(sum(parts.values()) / GIB, 2)
        row["estimate_parts_gib"] = {k: round(v / GIB, 2) for k, v in parts.items()}
        rows.append(row)
        print(json.dumps(row))
    a, q = rows
    doc = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": {"config": CONFIG, "params": a["params"], "note": "random weights, fp32, full-parameter training"},
        "batch": f"1 x {args.seq_len} tokens, {args.steps} steps",
        "rows": rows,
        "adamw8bit_vs_adamw": {"peak_rss_saved_gib": round(a["peak_rss_gib"] - q["peak_rss_gib"], 2),
                               "seconds_per_step_ratio": round(q["seconds_per_step"] / a["seconds_per_step"], 2)},
        "machine": machine_info(2), "load_avg": os.getloadavg()[0],
    }
    write_json(OUT, doc)
    print(json.dumps(doc["adamw8bit_vs_adamw"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
