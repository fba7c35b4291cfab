"""`edgesmith finetune`: LoRA / DoRA / IA3 / full fine-tuning on instruction data (see finetune/lora.py)."""
from __future__ import annotations


def cmd_finetune(args) -> int:
    import json

    from edgesmith.config import config_from_args

    from .lora import FinetuneConfig, run

    cfg = config_from_args(FinetuneConfig, args)
    out = run(cfg)
    res = json.loads((out / "finetune.json").read_text())["result"]
    val = f", validation loss {res['first_val_loss']:.4f} -> {res['best_val_loss']:.4f} (best)" if res.get("best_val_loss") is not None else ""
    print(f"finetune: {res['steps']} steps ({res['stopped']}), train loss {res['train_loss']:.4f}{val}, "
          f"{res['trainable_params']:,} trainable params, {res['seconds']:.0f}s -> {out}")
    if cfg.method != "full":
        print(f"merge into a plain HF checkpoint: edgesmith merge {cfg.model} {out} --out {out}-merged")
    return 0


def register(sub) -> None:
    from edgesmith.config import add_config_args

    from .lora import FinetuneConfig, METHODS

    p = sub.add_parser("finetune", help="LoRA/DoRA/IA3/full fine-tuning on instruction data",
                       description=__doc__ + "\n\nmethods: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    add_config_args(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune)
