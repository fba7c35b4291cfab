"""`edgesmith distill`: recover a pruned/smaller student by matching the teacher's next-token distribution.

  edgesmith distill --teacher default --student out/pruned --data teacher:256 --out out/distilled --time-budget 15m

--data accepts any file `edgesmith data` reads, a prepared split directory, or teacher:N (the teacher answers N
of the shipped seed prompts; cached, fully offline). See distill/distill.py for the losses.
"""
from __future__ import annotations


def cmd_distill(args) -> int:
    import json

    from edgesmith.config import config_from_args

    from .distill import DistillConfig, run

    cfg = config_from_args(DistillConfig, args)
    out = run(cfg)
    res = json.loads((out / "distill.json").read_text())["result"]
    val = f", validation loss {res['first_val_loss']:.4f} -> {res['best_val_loss']:.4f} (best)" if res.get("best_val_loss") is not None else ""
    print(f"distill: {res['steps']} steps ({res['stopped']}), train loss {res['train_loss']:.4f}{val}, {res['seconds']:.0f}s -> {out}")
    return 0


def register(sub) -> None:
    import argparse

    from edgesmith.config import add_config_args

    from .distill import DistillConfig

    p = sub.add_parser("distill", help="distil a teacher into a student (KL/JS logits, hidden states; full or LoRA)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, DistillConfig)
    p.set_defaults(func=cmd_distill)
