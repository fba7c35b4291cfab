"""`edgesmith merge BASE ADAPTER --out DIR`: fold a peft adapter into its base model and save a plain
Hugging Face checkpoint (weights, tokenizer, chat template, generation config) that every later stage
(export, bench, chat) reads like any model.

The merge always happens in 16/32-bit: a QLoRA adapter was trained against a 4-bit base, but it is
merged into the full-precision base, never into 4-bit weights (that would bake quantisation error in).
Adapters that add virtual tokens instead of weight deltas (prefix / prompt tuning) cannot be merged;
they are refused with the reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgesmith.errors import EdgesmithError

MERGE_DTYPES = ("float32", "bfloat16", "float16")
# peft types that only add virtual tokens / cached key-values: nothing to fold into a weight matrix
NOT_MERGEABLE = {"PREFIX_TUNING": "prefix tuning", "PROMPT_TUNING": "prompt tuning", "P_TUNING": "p-tuning",
                 "MULTITASK_PROMPT_TUNING": "multitask prompt tuning", "ADAPTION_PROMPT": "adaption prompt"}


@dataclass
class MergeSettings:
    """Settings of the pipeline's merge stage (the adapter and its base are wired by the pipeline)."""

    dtype: str = "float32"
    """Precision the adapter is merged in: float32, bfloat16 or float16 (never 4-bit)."""


def read_adapter_config(adapter_dir: Path) -> dict:
    p = Path(adapter_dir) / "adapter_config.json"
    if not p.is_file():
        raise EdgesmithError(f"{adapter_dir}: not a peft adapter directory (adapter_config.json missing)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EdgesmithError(f"{p}: invalid JSON ({e.msg})") from None


def check_mergeable(adapter_cfg: dict, where: str = "adapter") -> None:
    kind = adapter_cfg.get("peft_type", "?")
    if kind in NOT_MERGEABLE:
        raise EdgesmithError(
            f"{where}: {NOT_MERGEABLE[kind]} adapters cannot be merged into the weights (they prepend learned "
            "virtual tokens / key-values at run time, which GGUF/ONNX exports cannot carry); retrain with --method lora"
        )


def merge_adapter(adapter_dir: Path, out_dir: Path, base: str | None = None, dtype: str = "float32") -> Path:
    """Merge `adapter_dir` into `base` (default: the base recorded in the adapter) and save an HF dir at out_dir."""
    import torch
    from peft import PeftModel

    from edgesmith import modelio
    from edgesmith.fsutil import atomic_dir

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if dtype not in MERGE_DTYPES:
        raise EdgesmithError(f"merge dtype {dtype!r}: expected one of {', '.join(MERGE_DTYPES)} (never 4-bit: merging "
                             "into quantised weights bakes their error into the adapter)")
    acfg = read_adapter_config(adapter_dir)
    check_mergeable(acfg, str(adapter_dir))
    base = base or acfg.get("base_model_name_or_path")
    if not base:
        raise EdgesmithError(f"{adapter_dir}: the adapter does not record its base model; pass BASE explicitly")
    base_path = modelio.resolve(base)
    model = modelio.load_model(base_path, dtype=dtype)
    from edgesmith.trainconfig import apply_masks, sparsity_masks

    masks = sparsity_masks(model, base_path)  # taken before the adapter touches the weights
    # tokenizer: the adapter's copy when it has one (it may carry a chat template set at training time)
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    tok = modelio.load_tokenizer(tok_src) if tok_src == base_path else modelio.tokenizer_from_dir(tok_src)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), torch_device="cpu")
    except Exception as e:  # noqa: BLE001 - shape mismatch = wrong base
        raise EdgesmithError(f"{adapter_dir}: cannot apply the adapter to {base_path} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); is BASE the model it was trained on?") from None
    merged = peft_model.merge_and_unload()
    if masks:  # a base pruned with --sparsity: W + BA is dense, the pattern is the base's, so it is re-applied
        apply_masks(merged, masks)
    merged = merged.to(getattr(torch, dtype))
    from edgesmith.fsutil import check_free_space

    # the merged weights plus headroom for the tokenizer, before anything is written
    need = sum(p.numel() * p.element_size() for p in merged.parameters()) + (32 << 20)
    check_free_space(out_dir.parent if str(out_dir.parent) else Path("."), need, "the merged model")
    merged.config._name_or_path = modelio.model_name(base_path)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        meta = {"name": f"{modelio.model_name(base_path)}-merged", "source": str(base_path),
                "adapter": str(adapter_dir), "peft_type": acfg.get("peft_type"), "merge_dtype": dtype,
                "license": modelio.model_license(base_path)}
        (tmp / "edgesmith.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def cmd_merge(args) -> int:
    out = merge_adapter(Path(args.adapter), Path(args.out), base=args.base, dtype=args.dtype)
    print(f"merged {args.adapter} into {args.base} ({args.dtype}) -> {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA/DoRA/IA3 adapter into its base and save a plain HF checkpoint",
                       description=__doc__)
    p.add_argument("base", help="base model the adapter was trained on (HF dir, .gguf or 'default')")
    p.add_argument("adapter", help="adapter directory written by edgesmith finetune")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--dtype", default="float32", choices=MERGE_DTYPES, help="merge and save precision (default float32)")
    p.set_defaults(func=cmd_merge)
