"""`edgesmith info MODEL`: architecture, sizes and quantisation-friendliness of a model, without
loading its weights."""
from __future__ import annotations

import dataclasses
import json

from .facts import facts, width_warnings


def human_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def render(fx) -> str:
    rows = [
        ("source", fx.source),
        ("format", fx.format),
        ("architecture", fx.architecture),
        ("parameters", f"{human_params(fx.params_total)} ({fx.params_total:,})"),
        ("non-embedding", f"{human_params(fx.params_non_embedding)} ({fx.params_non_embedding:,})"),
        ("layers", fx.num_layers),
        ("hidden", fx.hidden_size),
        ("intermediate", fx.intermediate_size),
        ("heads / kv heads", f"{fx.num_attention_heads} / {fx.num_key_value_heads}"),
        ("head_dim", fx.head_dim),
        ("vocab", fx.vocab_size),
        ("tied embeddings", "yes" if fx.tied_embeddings else "no"),
        ("dtype", fx.dtype),
        ("size on disk", f"{fx.size_bytes / 2**20:.1f} MiB"),
        ("chat template", "yes" if fx.chat_template else "no"),
        ("eos / stop tokens", ", ".join(fx.eos_tokens) or "-"),
    ]
    for w, d in fx.widths.items():
        rows.append((f"width {w}", f"{d['tensors']} tensors, ×32: {'yes' if d['mult32'] else 'NO'}, ×256: {'yes' if d['mult256'] else 'NO'}"))
    k = max(len(r[0]) for r in rows)
    lines = [f"{a:<{k}}  {b}" for a, b in rows]
    lines += [f"warning: {m}" for m in width_warnings(fx)]
    return "\n".join(lines)


def cmd_info(args) -> int:
    fx = facts(args.model)
    if args.json:
        d = dataclasses.asdict(fx)
        d["widths"] = {str(k): v for k, v in d["widths"].items()}
        d["warnings"] = width_warnings(fx)
        print(json.dumps(d, indent=2))
    else:
        print(render(fx))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a model (HF dir, .gguf or 'default')", description=__doc__)
    p.add_argument("model", help="HF model directory, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_info)
