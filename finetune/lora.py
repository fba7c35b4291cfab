"""`edgesmith finetune`: LoRA / DoRA / IA3 / full fine-tuning of a causal LM on instruction data.

Top to bottom: load the model (fp32 master weights; QLoRA loads it 4-bit NF4 on CUDA), wrap it with a peft
adapter, render every record through the chat template with loss only on assistant tokens, optionally pack,
train with the shared loop (`edgesmith.trainloop`), save the adapter on its own (plus tokenizer and a
manifest) -- `edgesmith merge` (finetune/merge.py) turns it into a plain HF checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgesmith import processes
from edgesmith.config import to_dict
from edgesmith.errors import ConfigError, EdgesmithError
from edgesmith.trainconfig import TrainConfig

# method -> how peft builds it; every one of these merges into the weights (prefix tuning does not and
# is therefore not offered: merge.py refuses such adapters with the reason)
METHODS = {
    "lora": "LoRA: low-rank A·B added to each target linear layer",
    "dora": "DoRA: LoRA with a learned magnitude per output row (weight-decomposed)",
    "ia3": "IA3: learned per-channel scaling of keys, values and the MLP down projection",
    "full": "full fine-tuning of every weight (no adapter)",
}
# all linear layers of attention and MLP in Llama / Mistral / Qwen2
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class FinetuneConfig:
    """Settings of `edgesmith finetune`."""

    model: str = "default"
    """Base model: HF directory, .gguf file or 'default'."""
    data: str = ""
    """Training data: a prepared split directory (edgesmith data prepare) or any file edgesmith data reads."""
    out: str = "out/finetune"
    """Output directory (the adapter, or the full model for method full; metrics, loss curve, checkpoints)."""
    method: str = "lora"
    """lora, dora, ia3 or full."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linear layers that get adapters (default: all of attention and MLP)."""
    qlora: bool = False
    """Load the base 4-bit NF4 (bitsandbytes, double quantisation, bf16 compute); CUDA only."""
    max_length: int = 1024
    """Tokens per example; longer ones are truncated (and counted)."""
    packing: bool = False
    """Concatenate examples into max_length blocks (faster on short rows; documents share a block)."""
    assistant_only: bool = True
    """Loss only on assistant tokens (prompt and template headers masked)."""
    val_fraction: float = 0.05
    """Held-out validation fraction when data is a single file."""
    format: str = "auto"
    """Input layout for edgesmith data (auto, alpaca, sharegpt, messages, qa, text)."""
    max_examples: int = 0
    """Use only the first N training records (0: all)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4, max_steps=100, warmup_steps=10))
    """Optimiser, schedule and bookkeeping (edgesmith.trainconfig.TrainConfig)."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError("method", f"expected one of {', '.join(METHODS)}, got {self.method!r}"
                              + (" (prefix tuning cannot be merged into the weights, so it cannot be exported)"
                                 if "prefix" in self.method else ""))
        if self.lora_r < 1:
            raise ConfigError("lora_r", f"expected >= 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("lora_dropout", f"expected a value in [0, 1), got {self.lora_dropout}")
        if self.max_length < 8:
            raise ConfigError("max_length", f"expected >= 8, got {self.max_length}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction", f"expected a fraction in [0, 1), got {self.val_fraction}")
        if self.qlora and self.method == "full":
            raise ConfigError("qlora", "QLoRA trains adapters on a 4-bit base; it cannot be combined with method full")


def peft_config(cfg: FinetuneConfig):
    """The peft config for cfg.method (None for full fine-tuning)."""
    from peft import IA3Config, LoraConfig, TaskType

    if cfg.method in ("lora", "dora"):
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=list(cfg.target_modules),
                          use_dora=cfg.method == "dora", bias="none")
    if cfg.method == "ia3":
        targets = [t for t in cfg.target_modules if t in ("k_proj", "v_proj", "down_proj")] or ["k_proj", "v_proj", "down_proj"]
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=[t for t in targets if t == "down_proj"])
    return None


def load_base(cfg: FinetuneConfig):
    """(model, tokenizer): fp32 weights, or 4-bit NF4 for QLoRA (CUDA only)."""
    import torch

    from edgesmith import modelio

    if cfg.qlora:
        if not torch.cuda.is_available():
            raise EdgesmithError("--qlora needs a CUDA GPU (bitsandbytes 4-bit NF4); none found here: use --method lora on CPU")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise EdgesmithError("--qlora needs bitsandbytes: pip install 'edgesmith[cuda]'") from None
        from accelerate import PartialState
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        path = modelio.resolve(cfg.model)
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=bnb, dtype=torch.bfloat16,
                                                     local_files_only=True, device_map={"": PartialState().local_process_index})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.grad_checkpointing)
        return model, modelio.load_tokenizer(cfg.model)
    return modelio.load(cfg.model, dtype="float32")


def ce_loss(model, batch):
    """Causal-LM cross-entropy summed over label tokens -> (loss_sum, n_tokens)."""
    from edgesmith.trainconfig import causal_lm_loss_sum

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, L, V]
    return causal_lm_loss_sum(logits, batch["labels"])


def run(cfg: FinetuneConfig) -> Path:
    """Fine-tune and save; returns the output directory (adapter dir, or full HF dir for method full)."""
    import torch

    from edgesmith import modelio
    from edgesmith.fsutil import ensure_writable_dir, save_files_into, write_json
    from edgesmith.data import encode_split, load_split_records
    from edgesmith.trainconfig import result_dict
    from edgesmith.trainloop import train

    if not cfg.data:
        raise EdgesmithError("finetune: no --data given (a prepared split directory or a data file)")
    out = ensure_writable_dir(cfg.out)
    torch.manual_seed(cfg.train.seed)
    # under `accelerate launch` every process runs this: a GGUF base is materialised once per machine, and the main
    # process alone writes the output
    processes.state()
    with processes.main_first():
        base_path = modelio.resolve(cfg.model)
    model, tok = load_base(cfg)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    train_recs, val_recs = load_split_records(cfg.data, cfg.val_fraction, cfg.train.seed, cfg.format)
    if cfg.max_examples:
        train_recs = train_recs[:cfg.max_examples]
    train_ex, train_counts, val_ex, val_counts = encode_split(train_recs, val_recs, tok, cfg.max_length, cfg.packing,
                                                              cfg.assistant_only)
    if not train_ex:
        raise EdgesmithError(f"{cfg.data}: no training example has any assistant token to learn from "
                             f"({train_counts['no_labels']} lost every answer token to truncation at {cfg.max_length} or had none): "
                             "raise --max-length")
    print(f"finetune: {len(train_ex)} train / {len(val_ex)} validation examples; "
          f"truncated to {cfg.max_length} tokens: {train_counts['truncated']} train, {val_counts.get('truncated', 0)} validation")

    from edgesmith.trainconfig import sparsity_masks

    # prune --sparsity: full fine-tuning keeps the zero pattern; adapters get it back when merged (edgesmith merge)
    masks = sparsity_masks(model, base_path) if cfg.method == "full" else None
    pcfg = peft_config(cfg)
    if pcfg is not None:
        from peft import get_peft_model

        model = get_peft_model(model, pcfg)
    else:
        model.requires_grad_(True)
    res = train(model, train_ex, ce_loss, cfg.train, out, pad_id=pad_id, val_examples=val_ex or None, masks=masks,
                run_info={"stage": "finetune", "model": str(base_path), "method": cfg.method})

    def write_outputs() -> None:  # the main process only: the others wait in main_writes
        # save: the adapter on its own (base recorded as the resolved directory), tokenizer next to it
        model.eval()
        if pcfg is not None:
            model.peft_config["default"].base_model_name_or_path = str(base_path)

        def write(tmp: Path) -> None:
            model.save_pretrained(str(tmp), safe_serialization=True)
            if pcfg is None:
                (tmp / "edgesmith.json").write_text(json.dumps({"name": f"{modelio.model_name(cfg.model)}-ft", "source": str(base_path),
                                                                  "license": modelio.model_license(base_path)}, indent=2))
            tok.save_pretrained(str(tmp))

        save_files_into(out, write, ".adapter-tmp")
        write_json(out / "finetune.json", {
            "stage": "finetune", "base_model": str(base_path), "base_name": modelio.model_name(cfg.model),
            "method": cfg.method, "qlora": cfg.qlora, "mergeable": True,
            "data": {"train": train_counts, "validation": val_counts, "packing": cfg.packing,
                     "train_examples": len(train_ex), "validation_examples": len(val_ex)},
            "result": result_dict(res), "config": to_dict(cfg),
        })

    processes.main_writes(write_outputs)
    return out
