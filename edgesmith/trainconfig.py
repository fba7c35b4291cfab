"""What one training run is, as pure data and pure functions: `TrainConfig` (optimiser, schedule, batching,
precision, validation, checkpoints), the learning-rate schedule, the data order (a pure function of seed and epoch,
so a resumed or multi-process run sees the single run's batches), padding a batch, the causal-LM loss, a sparsity
pattern kept through training, and `TrainResult`. The loop that runs it is edgesmith/trainloop.py."""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .data import IGNORE
from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SHARDINGS = ("none", "fsdp")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass
class TrainConfig:
    """Optimiser, schedule and bookkeeping of one training run (shared by distill and finetune)."""

    lr: float = 2e-4
    """Peak learning rate of AdamW (after warm-up)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio at max_steps (or at the time budget, with schedule: time)."""
    schedule: str = "steps"
    """What the cosine decay spans: steps (max_steps) or time (time_budget: a budget-bound run still ends at the low rate)."""
    max_steps: int = 100
    """Optimizer steps to run (the cosine schedule spans them)."""
    time_budget: str = ""
    """Stop after this much wall-clock training time, e.g. 15m, 900s, 1h (empty: no limit)."""
    batch_size: int = 4
    """Examples per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (global batch = batch_size * processes * grad_accum)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower."""
    seed: int = 0
    """Seed for initialisation, dropout and the data order."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp16 where bf16 is missing; on CPU bf16 autocast when /proc/cpuinfo reports AVX512-BF16 or AMX-BF16, else fp32), fp32, bf16 (autocast; faster only on CPUs with AVX512-BF16/AMX, ~4x slower on AVX2-only ones) or fp16 (GPU only)."""
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end when validation data exists)."""
    eval_batches: int = 0
    """Validation micro-batches per evaluation (0: the whole validation set)."""
    early_stopping: int = 0
    """Stop after this many evaluations without improvement (0 disables)."""
    keep_best: bool = True
    """Finish with the weights of the best validation loss instead of the last ones."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: only on SIGINT/SIGTERM)."""
    resume: bool = False
    """Continue from OUT/checkpoint with the same data order."""
    log_every: int = 1
    """Metrics line (JSONL) every N steps."""
    progress: bool = True
    """Show a progress bar with loss, learning rate and tokens/s."""
    optimizer: str = "adamw"
    """adamw (torch; fp32 moments, 8 bytes per trainable parameter) or adamw8bit (bitsandbytes' block-wise 8-bit moments, 2 bytes; CPU and CUDA, `pip install 'edgesmith[lowmem]'`). Measured on 2 CPU cores, full training of a 0.45B model: peak 8.4 -> 6.5 GiB, 2.2x the seconds per step (studies/results/optimizer-8bit.json)."""
    sharding: str = "none"
    """With several processes (accelerate launch): none (each holds the whole model, DDP) or fsdp (torch FSDP2: each holds 1/N of the weights, gradients and AdamW states; output and checkpoints stay whole)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError("lr", f"expected a positive learning rate, got {self.lr}")
        if self.max_steps < 1:
            raise ConfigError("max_steps", f"expected >= 1, got {self.max_steps}")
        for k in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, k) < 1:
                raise ConfigError(k, f"expected >= 1, got {getattr(self, k)}")
        for k in ("warmup_steps", "eval_every", "eval_batches", "early_stopping", "save_every"):
            if getattr(self, k) < 0:
                raise ConfigError(k, f"expected >= 0, got {getattr(self, k)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"expected a ratio in [0, 1], got {self.min_lr_ratio}")
        if self.schedule not in ("steps", "time"):
            raise ConfigError("schedule", f"expected steps or time, got {self.schedule!r}")
        if self.schedule == "time" and not self.time_budget:
            raise ConfigError("schedule", "schedule: time needs a time_budget")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.sharding not in SHARDINGS:
            raise ConfigError("sharding", f"expected one of {', '.join(SHARDINGS)}, got {self.sharding!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optimizer", f"expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer == "adamw8bit" and self.sharding == "fsdp":  # its quantised moments cannot be sliced like the weights
            raise ConfigError("optimizer", "adamw8bit does not shard its states under sharding: fsdp; use adamw there")
        if self.time_budget:
            try:
                parse_duration(self.time_budget)
            except ValueError as e:
                raise ConfigError("time_budget", str(e)) from None


# ---------------------------------------------------------------- schedule, data order, batches, loss


def parse_duration(text: str | int | float) -> float:
    """'15m' -> 900.0, '90s' / '90' -> 90.0, '1h30m' -> 5400.0 seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or re.sub(r"\s", "", s) != "".join(a + b for a, b in parts):
        raise ValueError(f"expected a duration like 15m, 900s or 1h, got {text!r}")
    return sum(float(a) * {"h": 3600, "m": 60, "s": 1}[b] for a, b in parts)


def lr_at(step: int, cfg: TrainConfig, time_fraction: float | None = None) -> float:
    """Learning rate multiplier for optimizer step `step` (0-based): linear warm-up, cosine decay over the steps
    after warm-up, or over the time budget when time_fraction (elapsed / budget) is given."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if time_fraction is not None:
        progress = min(1.0, max(0.0, time_fraction))
    else:
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a pure function of (seed, epoch), so resume sees the same data."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def global_batch_indices(n: int, step: int, micro: int, global_micro: int, grad_accum: int, seed: int) -> list[int]:
    """Example indices of micro-step `micro` of optimizer step `step` (all ranks together).

    The stream is the concatenation of epoch orders; global batch g covers positions
    [g * global_micro * grad_accum, ...). Returns global_micro indices.
    """
    start = (step * grad_accum + micro) * global_micro
    out = []
    for pos in range(start, start + global_micro):
        epoch, i = divmod(pos, n)
        out.append(epoch_order(n, seed, epoch)[i])
    return out


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a list of {"input_ids", "labels", ...} to the longest; labels padded with IGNORE.

    -> input_ids [B, L] long, labels [B, L] long, attention_mask [B, L] long, plus `index` [B].
    """
    import torch

    L = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n] = torch.tensor(e["input_ids"])
        labels[b, :n] = torch.tensor(e["labels"])
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "index": torch.tensor([e.get("index", -1) for e in examples])}


def causal_lm_loss_sum(logits, labels):
    """Next-token cross-entropy summed over tokens. logits [B, L, V], labels [B, L] -> (sum, n_tokens)."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(L-1), V]
    shift_labels = labels[:, 1:].reshape(-1)                             # [B*(L-1)]
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    return loss, int((shift_labels != IGNORE).sum())


# ---------------------------------------------------------------- a sparsity pattern kept through training


def sparsity_masks(model, model_dir) -> dict | None:
    """The zero pattern `prune --sparsity` (2:4 or unstructured) left in the decoder's linear weights, when the model's
    prune_report.json records one: parameter name -> bool mask [out, in] of the weights allowed to be non-zero.
    Recovery re-applies it after every optimizer step, so distillation or full fine-tuning keeps the pattern
    (2:4 kernels need it exactly; without the mask one step of AdamW fills every zero)."""
    rep = Path(model_dir) / "prune_report.json"
    if not rep.is_file() or not (json.loads(rep.read_text()).get("sparsity") or {}).get("pattern"):
        return None
    return {n: p.detach() != 0 for n, p in model.named_parameters()
            if p.dim() == 2 and ".layers." in n and n.endswith("_proj.weight")}


def apply_masks(model, masks: dict) -> None:
    """Zero every weight outside its mask, in place (names as in model.named_parameters())."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            m = masks.get(n)
            if m is not None:
                p.mul_(m.to(p.device))


# ---------------------------------------------------------------- results of a run


@dataclass
class TrainResult:
    steps: int
    """Optimizer steps completed."""
    stopped: str
    """max_steps, time_budget, early_stopping or interrupted."""
    train_loss: float
    """Mean loss (per token) of the last logged step."""
    best_val_loss: float | None
    first_val_loss: float | None
    last_val_loss: float | None
    tokens: int
    seconds: float
    precision: str
    world_size: int
    trainable_params: int = 0


def result_dict(res: TrainResult) -> dict:
    return {k: getattr(res, k) for k in TrainResult.__dataclass_fields__}
