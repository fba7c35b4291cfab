"""The training loop shared by `edgesmith distill` and `edgesmith finetune`.

One function, `train(...)`, read top to bottom: AdamW, cosine schedule with linear warm-up, gradient
accumulation, clipping, gradient checkpointing, bf16 (GPU) / fp32 or bf16 autocast (CPU), validation
every N steps with early stopping and the best weights kept, checkpoints every N steps and on
SIGINT/SIGTERM, `resume` with the same data order, a progress bar, metrics JSONL (+ TensorBoard when
installed) and a PNG loss curve. Distribution goes through accelerate's `Accelerator`, so the same
command runs under `accelerate launch` (DDP) unchanged; `sharding: fsdp` splits weights, gradients and AdamW states
across the processes (torch's FSDP2) and still hands back, and checkpoints, whole weights.

Exactness rules that make resume and multi-process runs reproduce a single uninterrupted run:
- the data order is a pure function of (seed, epoch): `batch_indices(step)` never depends on history;
- a global batch is `batch_size * world_size * grad_accum` examples; rank r takes its own slice;
- the loss is a token-weighted *sum* divided by the token count of the whole global batch (all-reduced),
  times world_size to undo DDP's gradient averaging: so the gradient equals the single-process one.

The stage supplies `loss_fn(model, batch) -> (loss_sum, n_tokens)` and a list of examples
(`{"input_ids": [...], "labels": [...]}` plus anything its loss needs).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import to_dict
from .errors import ConfigError, EdgesmithError
from .fsutil import atomic_dir, atomic_open, atomic_path, ensure_writable_dir, write_json

from .data import IGNORE  # the label of tokens that carry no loss (prompt, padding)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SHARDINGS = ("none", "fsdp")


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
        if self.time_budget:
            try:
                parse_duration(self.time_budget)
            except ValueError as e:
                raise ConfigError("time_budget", str(e)) from None


# ---------------------------------------------------------------- small pure helpers


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


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls pay off on CPUs that report AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (forward+backward of the
    demo student 1.6-1.8x faster than fp32); on AVX2-only CPUs bf16 autocast is ~4x slower. Read, never assumed."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _autocast_dtype(cfg: TrainConfig, device_type: str):
    """Mixed-precision choice for accelerate: 'no' | 'bf16' | 'fp16'."""
    import torch

    p = cfg.precision
    if p == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "no"
    if p == "fp16" and device_type != "cuda":
        raise EdgesmithError("precision fp16 needs a CUDA GPU (use bf16 or fp32 on CPU)")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p]


# ---------------------------------------------------------------- memory: estimate before loading, refuse what cannot fit

GIB = 2**30
RUNTIME_BYTES = GIB  # python, torch, transformers, tokenizers, data: measured ~0.8-1 GiB before any model is loaded


@dataclass
class ModelShape:
    """What a memory estimate needs to know about a decoder (edgesmith.facts reads it from the files, no weights)."""

    params: int
    """Parameters (tied embeddings once)."""
    layers: int
    """Decoder layers."""
    hidden: int
    """Residual-stream width D."""
    intermediate: int
    """MLP width I."""
    vocab: int
    """Vocabulary size V."""

    @classmethod
    def of(cls, path) -> "ModelShape":
        from .facts import facts

        f = facts(path)
        return cls(f.params_total, f.num_layers, f.hidden_size, f.intermediate_size, f.vocab_size)

    def layer_params(self) -> int:
        """One decoder layer: q, k, v, o (k/v taken as wide as q: an upper bound under GQA) and the 3 MLP matrices."""
        return 4 * self.hidden * self.hidden + 3 * self.hidden * self.intermediate

    def outer_params(self) -> int:
        """Everything outside the decoder layers (embeddings, output head, final norm): FSDP's root unit."""
        return min(self.params, max(self.params - self.layers * self.layer_params(), self.vocab * self.hidden))


def training_memory(student: ModelShape, trainable: int, batch: int, seq_len: int, chunk: int,
                    grad_checkpointing: bool = False, teacher: ModelShape | None = None, teacher_bytes: int = 4,
                    teacher_logits: bool = True, shards: int = 1) -> dict[str, int]:
    """Peak bytes of one training process, by part (an upper bound for batches padded to seq_len):

    student weights   params x 4 (fp32 master weights; bf16 autocast casts per op)
    gradients         trainable x 4
    AdamW states      trainable x 8 (exp_avg, exp_avg_sq)
    optimizer step    trainable x 4 (the foreach AdamW step's full-size temporaries)
                      sharded (sharding: fsdp over `shards` processes): these four / shards, plus
    gathered layers   the units FSDP holds whole while they run: the root (embeddings, head, final norm) through the
                      step, the running decoder layer and the next one (prefetched), with their gradients until the
                      reduce-scatter: 4 x (outer + 2 layers) + 4 x min(trainable, outer + layer); the teacher's
                      running and prefetched layers
    teacher weights   teacher params x teacher_bytes (0 when the targets come from the cached top-k); sharded, its
                      layers / shards (shard_frozen) and the rest (embeddings, head) whole
    activations       per token and layer autograd keeps ~10 D + 4 I floats (norm inputs/outputs, q/k/v/rope,
                      attention output, gate/up/act/product); with gradient checkpointing only each layer's input
                      (D) plus one layer recomputed. Plus the loss's logits chunk [chunk, V] x ~4 fp32 copies (x 2
                      more with full teacher logits) and the teacher's kept hidden states [(L_t+1), tokens, D_t].
    runtime           the interpreter and libraries
    Checked against /usr/bin/time on the demo's 97M student (teacher SmolLM2-135M in fp32, batch 4 x 256): 4.6 GiB
    estimated vs 4.4 measured; with gradient checkpointing 3.6 vs 3.6; tiny models 1.3 vs 0.9 (the runtime).
    """
    tokens = batch * seq_len
    per_layer = (10 * student.hidden + 4 * student.intermediate) * 4 * tokens   # bytes one layer's autograd keeps
    if grad_checkpointing:
        act = student.layers * student.hidden * 4 * tokens + per_layer
    else:
        act = student.layers * per_layer
    act += 4 * chunk * student.vocab * 4
    parts = {"student weights": -(-student.params * 4 // shards), "gradients": -(-trainable * 4 // shards),
             "AdamW states": -(-trainable * 8 // shards), "optimizer step": -(-trainable * 4 // shards)}
    if shards > 1:
        outer, layer = student.outer_params(), student.layer_params()
        parts["gathered layers"] = 4 * (outer + 2 * layer) + 4 * min(trainable, outer + layer)
    if teacher is not None:
        parts["teacher weights"] = teacher.params * teacher_bytes
        if shards > 1:
            parts["teacher weights"] = -(-teacher.params * teacher_bytes // shards) + teacher.outer_params() * teacher_bytes
            parts["gathered layers"] += 2 * teacher.layer_params() * teacher_bytes
        act += (teacher.layers + 1) * teacher.hidden * teacher_bytes * tokens           # output_hidden_states
        act += (4 * teacher.hidden + 3 * teacher.intermediate) * teacher_bytes * tokens  # one layer in flight
        if teacher_logits:
            act += 2 * chunk * teacher.vocab * 4
    parts["activations"] = act
    parts["runtime"] = RUNTIME_BYTES
    return parts


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (what can be allocated without swapping), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


SHARDED_PARTS = ("student weights", "gradients", "AdamW states", "optimizer step")


@dataclass
class MemoryPhase:
    """One moment of a run's memory: the bytes each process holds, by part, and what the main process holds on top."""

    what: str
    """When: 'while training', ... (empty for a run with one moment worth estimating)."""
    each: dict[str, int]
    main: dict[str, int] = field(default_factory=dict)

    def total(self, processes: int) -> int:
        return sum(self.each.values()) * processes + sum(self.main.values())


def sharded_memory(training: dict[str, int], student: ModelShape, trainable: int, checkpoints: bool,
                   teacher_loaded: int = 0) -> list[MemoryPhase]:
    """The moments a sharded run peaks, `training` being one process's parts while it trains
    (training_memory(..., shards=N)):
    - training;
    - the whole teacher (`teacher_loaded` bytes) in every process, loaded before it is sharded;
    - the whole student in every process: it is loaded whole before being sharded, and `train` gathers it whole again
      at the end (AdamW states released first) next to the slices it trained;
    - with checkpoints (save_every; a signal writes one too), the main process gathering whole trainable weights and
      AdamW states to write them in the single-process layout, the others holding their slices.
    Checked with ru_maxrss on a 239M-parameter student (teacher 50M, fp32, 2 steps of batch 2 x 128 tokens): one
    process 5.0 GiB measured vs 6.1 estimated; sharded over 2 processes (batch 1 each, the teacher sharded too) 3.8
    and 3.9 vs 4.3 each."""
    held = {k: v for k, v in training.items() if k in ("teacher weights", "runtime")}
    slices = {"student weights": training["student weights"]}
    phases = [MemoryPhase("while training", training),
              MemoryPhase("while the whole student is loaded or gathered", {"whole student": student.params * 4, **slices, **held})]
    if teacher_loaded:
        phases.append(MemoryPhase("while the whole teacher is loaded", {"whole teacher": teacher_loaded,
                                                                        "runtime": training["runtime"]}))
    if checkpoints:
        phases.append(MemoryPhase("while the main process gathers a checkpoint",
                                  {**slices, "AdamW states": training["AdamW states"], **held},
                                  {"whole trainable weights": trainable * 4, "whole AdamW states": trainable * 8}))
    return phases


def check_memory(stage: str, parts: dict[str, int] | list[MemoryPhase], hints: str, processes: int = 1,
                 available: int | None = None, shards: int = 1) -> str:
    """Refuse up front (EdgesmithError, one line, exit 2) when the estimated peak of `processes` training processes on
    this machine exceeds MemAvailable, rather than being killed by the kernel mid-run; otherwise return the estimate as
    one line. parts: one process's peak by part, or the moments of a sharded run (sharded_memory), the largest counts;
    the line names it, its parts per process and what `shards` divides."""
    phases = parts if isinstance(parts, list) else [MemoryPhase("", parts)]
    peak = max(phases, key=lambda p: p.total(processes))
    total = peak.total(processes)
    avail = mem_available() if available is None else available

    def gib(v: int) -> str:
        return f"{v / GIB:.1f}"

    def note(k: str) -> str:
        if shards > 1 and k in SHARDED_PARTS:
            return f" (1/{shards})"
        if k == "teacher weights" and processes > 1:
            return f" (layers 1/{shards}, embeddings and head whole)" if shards > 1 else " (whole in each)"
        return ""

    detail = " + ".join(f"{k} {gib(v)}{note(k)}" for k, v in peak.each.items() if v)
    if processes > 1:
        detail = f"{processes} processes x {gib(sum(peak.each.values()))}: {detail}"
    if peak.main:
        detail += " + on the main process " + " + ".join(f"{k} {gib(v)}" for k, v in peak.main.items())
    line = f"estimated peak memory {gib(total)} GiB{' ' + peak.what if peak.what else ''} ({detail})"
    if avail is not None and total > avail:
        raise EdgesmithError(f"{stage}: {line} exceeds the {gib(avail)} GiB available (MemAvailable); {hints}")
    return line + (f" of {gib(avail)} GiB available" if avail is not None else "")


def _trainable_state(model, extra_modules: dict, keep: bool = True) -> dict:
    """Trainable tensors only (LoRA adapters stay small, full fine-tuning saves everything), whole, on the CPU.
    Sharded, every process must call it (one all-gather per tensor); only those with `keep` hold the result."""
    named = [(f"model.{n}", p) for n, p in model.named_parameters() if p.requires_grad]
    for key, mod in extra_modules.items():
        named += [(f"{key}.{n}", p) for n, p in mod.named_parameters()]
    out = {}
    for k, p in named:
        t = _whole(p.detach())
        if keep:
            out[k] = t.cpu().clone()
    return out


def _load_trainable_state(model, extra_modules: dict, state: dict) -> None:
    import torch

    params = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    for key, mod in extra_modules.items():
        params.update({f"{key}.{n}": p for n, p in mod.named_parameters()})
    missing = set(params) - set(state)
    if missing:
        raise EdgesmithError(f"checkpoint does not match the model (missing {sorted(missing)[:3]} ...)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(_like(state[k].to(p.device, p.dtype), p))


def _plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    va = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ---------------------------------------------------------------- the loop's steps


def _accelerator(cfg: TrainConfig):
    """accelerate's Accelerator for this run: CPU unless CUDA is present, the precision `_autocast_dtype` chooses."""
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    cpu = not torch.cuda.is_available()
    # code that asked a bare PartialState() for its device first set it up without cpu=True, which on a machine without
    # CUDA reads as one process even under `accelerate launch`: that one is forgotten, so the processes join over gloo
    # here instead of each training alone (the stages ask edgesmith.processes.state(), which asks for the CPU)
    alone = cpu and PartialState().num_processes == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # a second run in the same process may use another precision: forget the previous run's settings
    # (the process group of `accelerate launch`, kept in PartialState, stays)
    AcceleratorState._reset_state(reset_partial_state=alone)
    return Accelerator(cpu=cpu, mixed_precision=_autocast_dtype(cfg, "cpu" if cpu else "cuda"))


def _grad_checkpointing(model) -> None:
    """Recompute activations in the backward pass instead of keeping them (memory for ~30% more compute)."""
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        model.config.use_cache = False


def _optimizer(model, extra_modules: dict, cfg: TrainConfig):
    """(trainable parameters, AdamW, the warm-up + cosine LambdaLR). Weight decay only on matrices, not on norms and
    biases, as usual for transformers."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    for mod in extra_modules.values():
        params += list(mod.parameters())
    if not params:
        raise EdgesmithError("nothing to train: the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))


def _load_checkpoint(ckpt_dir: Path, cfg: TrainConfig, world: int) -> dict:
    """The saved state of an interrupted run, its RNG states restored; refuses a missing or unreadable checkpoint and
    one saved with another global batch (the data order would differ)."""
    import torch

    state_file = ckpt_dir / "state.pt"
    if not state_file.is_file():
        raise EdgesmithError(f"{ckpt_dir}: no checkpoint to resume from (run without --resume first)")
    try:  # weights_only: a checkpoint is data, never code to unpickle
        st = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated/corrupt/foreign file
        raise EdgesmithError(f"{state_file}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if st.get("world_size", 1) * st.get("batch_size", cfg.batch_size) != world * cfg.batch_size:
        raise EdgesmithError(f"{ckpt_dir}: saved with a different global batch; resume with the same batch_size/processes")
    torch.set_rng_state(st["rng_torch"])
    random.setstate(st["rng_python"])
    return st


def _shard_or_not(cfg: TrainConfig, acc, model) -> bool:
    """Whether this run shards (sharding: fsdp with several processes; one process has nothing to split). Refuses,
    in one line, a setup FSDP2 cannot shard."""
    import torch
    from accelerate.utils import DistributedType

    if cfg.sharding == "none" or acc.num_processes == 1:
        return False
    if acc.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise EdgesmithError(f"sharding: fsdp shards the model itself and needs accelerate's plain multi-process launch, "
                             f"not {acc.distributed_type.value} (drop FSDP/DeepSpeed from the accelerate config)")
    if any(not p.is_floating_point() for p in model.parameters()):
        raise EdgesmithError("sharding: fsdp needs floating-point weights; quantized ones (QLoRA) cannot be sharded")
    try:
        from torch.distributed import fsdp
    except ImportError:  # a torch built without distributed support
        fsdp = None
    if not hasattr(fsdp, "fully_shard"):
        raise EdgesmithError(f"sharding: fsdp needs torch.distributed's fully_shard (torch >= 2.6), not torch {torch.__version__}")
    return True


def _shard(model, extra_modules: dict, device, world: int):
    """sharding: fsdp. torch's FSDP2 (`fully_shard`) over all processes: each decoder layer, then the rest of the model,
    is cut into 1/world slices, so a process keeps 1/world of the weights, gradients and AdamW states; a layer is whole
    only while it runs (all-gathered) and its gradients are reduce-scattered back into slices, averaged like DDP's.
    accelerate 1.15 turns its own FSDP on only for GPUs (on CPU its Accelerator stays plain multi-process), so the loop
    calls torch directly: the same code over gloo on CPU and nccl on GPU.

    fully_shard changes the module it is given for good (class, hooks, DTensor parameters), yet the stages save and
    merge the model they passed in. So it shards a copy that shares the caller's parameter objects (no weight is
    copied) and releases each whole tensor once its slices exist; `_unshard_into` gives the caller whole weights back.
    The extra modules are used through the loss' closure, so they are sharded in place, per module owning weights.
    -> the sharded model, the one the loss is given."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(device.type, (world,))
    work = copy.deepcopy(model, {id(p): p for p in model.parameters()})
    # transformers names the blocks that must stay whole on one device (_no_split_modules): the units of sharding
    blocks = {n for m in work.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    for unit in [m for m in work.modules() if type(m).__name__ in blocks] + [work]:
        whole = [p for p in unit.parameters() if not isinstance(p, DTensor)]
        fully_shard(unit, mesh=mesh)
        for p in whole:  # the caller's tensor (moved to the device by fully_shard): its memory back, unit by unit
            p.data = p.data.new_empty(0)
    for mod in extra_modules.values():
        for m in mod.modules():
            if next(m.parameters(recurse=False), None) is not None:
                fully_shard(m, mesh=mesh)
    return work


def shard_frozen(model, device) -> tuple[int, int]:
    """sharding: fsdp for a model that only runs forward while another trains, distill's teacher: FSDP2 in place over
    all processes, per decoder layer and then the rest (as `_shard`), so each process keeps 1/N of its layers' weights
    and a layer is whole only while it runs. The rest (embeddings, output head, final norm: FSDP's root unit) stays
    whole from the first forward on, as a root does without a backward: the distillation loss applies the teacher's
    head to its hidden states after the forward, and again where activation checkpoints recompute. Every forward is
    collective: all processes run each one. -> (weights this process holds, weights in the model)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise EdgesmithError("sharding: fsdp needs torch.distributed's fully_shard (torch >= 2.6)") from None
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    for unit in [m for m in model.modules() if type(m).__name__ in blocks] + [model]:
        fully_shard(unit, mesh=mesh)
    ps = list(model.parameters())
    return sum(p.to_local().numel() for p in ps), sum(p.numel() for p in ps)


def _unshard_into(model, work) -> None:
    """The trained weights, whole, back into the caller's model on every process (one all-gather per tensor): the stage
    then saves and merges exactly what a single-process run hands it."""
    sharded = dict(work.named_parameters())
    for n, p in model.named_parameters():
        p.data = _whole(sharded[n].detach())


def _whole(t):
    """A sharded (DTensor) tensor made whole: an all-gather, so every process must call it. Others come back as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(t, p):
    """A whole tensor `t` cut the way parameter `p` is held: this process' slice when p is sharded, else t itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    return distribute_tensor(t.to(p.device), p.device_mesh, p.placements) if isinstance(p, DTensor) else t


def _optimizer_state(opt, keep: bool = True) -> dict:
    """opt.state_dict() with every state tensor whole (sharded: all-gathers, every process calls it; only those with
    `keep` hold them, on the CPU): a sharded run's checkpoint is the one a single process writes."""
    sd = opt.state_dict()
    state: dict = {}
    for i, s in sd["state"].items():
        for k, v in s.items():
            t = _whole(v)
            if keep:
                state.setdefault(i, {})[k] = t.cpu()
    return {**sd, "state": state}


def _load_optimizer_state(opt, sd: dict) -> None:
    """The inverse of _optimizer_state: each whole state tensor cut the way its parameter is held."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {i: {k: v if k == "step" else _like(v, params[i]) for k, v in s.items()} for i, s in sd["state"].items()}
    opt.load_state_dict({**sd, "state": state})


def _catch_stop_signals() -> tuple[list[int], dict]:
    """SIGINT/SIGTERM append to the returned list instead of killing the run (the loop checkpoints and stops);
    returns it and the previous handlers, to restore."""
    stop_signal: list[int] = []
    old_handlers = {}

    def on_signal(signum, frame):  # noqa: ARG001
        stop_signal.append(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[s] = signal.signal(s, on_signal)
        except ValueError:  # not in the main thread
            pass
    return stop_signal, old_handlers


def _progress_bar(cfg: TrainConfig, budget: float | None, elapsed_before: float, step: int):
    """tqdm: a budget-bound run shows seconds against the budget, not steps against an unreachable max_steps."""
    from tqdm.auto import tqdm

    if budget is not None:
        return tqdm(total=round(budget), initial=round(elapsed_before), desc="train", unit="s", dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}{postfix}]")
    return tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------- the loop


def train(
    model,
    train_examples: list[dict],
    loss_fn: Callable[[Any, dict], tuple[Any, int]],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    pad_id: int,
    val_examples: list[dict] | None = None,
    extra_modules: dict | None = None,
    val_loss_fn: Callable[[Any, dict], tuple[Any, int]] | None = None,
    run_info: dict | None = None,
    masks: dict | None = None,
) -> TrainResult:
    """Train `model` (and `extra_modules`, e.g. a hidden-state projection) in place.

    loss_fn(model, batch) -> (loss_sum scalar tensor, n_tokens int) for one micro-batch (a `collate`d
    dict on the right device). Writes OUT/metrics.jsonl, OUT/loss.png and OUT/checkpoint/ (resumable).
    On return the model holds the best-validation weights when cfg.keep_best and validation ran.
    masks (sparsity_masks): parameter name -> the weights allowed to be non-zero, re-applied after every step.
    """
    import torch
    from accelerate.utils import set_seed

    out = ensure_writable_dir(out_dir)
    extra_modules = extra_modules or {}
    val_loss_fn = val_loss_fn or loss_fn
    if not train_examples:
        raise EdgesmithError("no training examples")

    acc = _accelerator(cfg)
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    device = acc.device
    set_seed(cfg.seed)
    if cfg.grad_checkpointing:
        _grad_checkpointing(model)
    sharded = _shard_or_not(cfg, acc, model)
    caller_model = model
    if sharded:  # the optimizer must see the sharded parameters, so sharding comes first
        model = raw_model = _shard(model, extra_modules, device, world)
        extra_wrapped = dict(extra_modules)
        held = sum(p.to_local().numel() for p in model.parameters())
        print(f"train: sharding fsdp: process {rank} of {world} holds {held} of the model's "
              f"{sum(p.numel() for p in model.parameters())} weights")
    params, opt, sched = _optimizer(model, extra_modules, cfg)
    n_trainable = sum(p.numel() for p in params)
    if not sharded:
        wrapped = acc.prepare(model, *extra_modules.values())
        wrapped = list(wrapped) if extra_modules else [wrapped]
        model, extra_wrapped = wrapped[0], dict(zip(extra_modules, wrapped[1:]))
        raw_model = acc.unwrap_model(model)
    raw_extras = {k: acc.unwrap_model(m) for k, m in extra_wrapped.items()}
    if sharded and masks:  # a mask is cut like its weight, once
        held_as = dict(raw_model.named_parameters())
        masks = {n: _like(m, held_as[n]) for n, m in masks.items()}

    ckpt_dir = out / "checkpoint"
    metrics_path = out / "metrics.jsonl"
    best_path = out / "checkpoint-best.pt"
    step, best_val, first_val, last_val, bad_evals, tokens_seen, elapsed_before = 0, None, None, None, 0, 0, 0.0
    metrics: list[dict] = []
    if cfg.resume:  # weights, optimizer, schedule, counters and RNG exactly where the checkpoint left them
        st = _load_checkpoint(ckpt_dir, cfg, world)
        _load_trainable_state(raw_model, raw_extras, st["weights"])
        _load_optimizer_state(opt, st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, best_val, first_val, last_val = st["step"], st["best_val"], st["first_val"], st["last_val"]
        bad_evals, tokens_seen, elapsed_before = st["bad_evals"], st["tokens"], st["elapsed"]
        if metrics_path.is_file():
            metrics = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
            metrics = [m for m in metrics if m.get("step", 0) <= step]

    def save_checkpoint() -> None:
        # every process takes part: sharded weights and optimizer states are gathered whole onto the main one
        weights, optimizer = _trainable_state(raw_model, raw_extras, keep=main), _optimizer_state(opt, keep=main)
        if not main:
            return
        st = {
            "weights": weights,
            "optimizer": optimizer, "scheduler": sched.state_dict(), "step": step,
            "best_val": best_val, "first_val": first_val, "last_val": last_val, "bad_evals": bad_evals,
            "tokens": tokens_seen, "elapsed": elapsed_before + (time.time() - t0),
            "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
            "world_size": world, "batch_size": cfg.batch_size, "config": to_dict(cfg),
        }
        with atomic_dir(ckpt_dir) as tmp:
            torch.save(st, tmp / "state.pt")
            write_json(tmp / "info.json", {"step": step, "run": run_info or {}})
        write_metrics()

    def save_best() -> None:
        weights = _trainable_state(raw_model, raw_extras, keep=main)  # every process: a sharded model is gathered
        if main:
            torch.save(weights, best_path)

    def write_metrics() -> None:
        if not main:
            return
        with atomic_open(metrics_path) as f:
            for m in metrics:
                f.write(json.dumps(m) + "\n")

    def batch_on_device(examples: list[dict]) -> dict:
        b = collate(examples, pad_id)
        return {k: v.to(device) for k, v in b.items()}

    def evaluate() -> float:
        model.eval()
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        n = len(val_examples)
        per = cfg.batch_size * world
        n_batches = math.ceil(n / per)
        if cfg.eval_batches:
            n_batches = min(n_batches, cfg.eval_batches)
        with torch.no_grad(), acc.autocast():
            for bi in range(n_batches):
                idx = list(range(bi * per, min(n, (bi + 1) * per)))[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
                if not idx:
                    if world > 1:  # a forward is collective (FSDP all-gathers weights, DDP broadcasts buffers such
                        # as rotary frequencies): a process without examples runs one and drops it, or the others hang
                        val_loss_fn(model, batch_on_device(val_examples[:1]))
                    continue
                loss_sum, ntok = val_loss_fn(model, batch_on_device([val_examples[i] for i in idx]))
                total += loss_sum.float()
                count += ntok
        total, count = acc.reduce(total, "sum"), acc.reduce(count, "sum")
        if sharded:  # FSDP keeps the top module's weights whole after a forward without backward: back to slices
            model.reshard()
        model.train()
        return float(total / count.clamp(min=1))

    stop_signal, old_handlers = _catch_stop_signals()  # SIGINT/SIGTERM: finish the current step, checkpoint, stop

    writer = None
    if main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard not installed: JSONL only
            writer = None

    budget = parse_duration(cfg.time_budget) if cfg.time_budget else None
    n = len(train_examples)
    global_micro = cfg.batch_size * world
    by_time = budget is not None
    bar = _progress_bar(cfg, budget, elapsed_before, step) if main and cfg.progress else None
    if val_examples and step == 0:  # the baseline: "validation loss decreases" needs a starting point
        first_val = last_val = best_val = evaluate()
        metrics.append({"step": 0, "val_loss": round(first_val, 6)})
        if cfg.keep_best:  # training that only makes things worse gives back the starting weights
            save_best()
    model.train()
    t0 = time.time()  # the time budget counts training, not the baseline evaluation
    stopped = "max_steps"
    last_loss = float("nan")
    tok_window = (time.time(), tokens_seen)
    try:
        while step < cfg.max_steps:
            elapsed, signalled = elapsed_before + time.time() - t0, float(bool(stop_signal))
            if world > 1:  # all processes stop at the same step (one stopping alone leaves the rest waiting in a
                # collective): a signal reaching one counts for all, the budget and the phase read the mean clock
                both = torch.tensor([elapsed / world, signalled], dtype=torch.float64, device=device)
                elapsed, signalled = acc.reduce(both, "sum").tolist()
            if budget is not None and elapsed >= budget:
                stopped = "time_budget"
                break
            if signalled:
                stopped = "interrupted"
                break
            micro_batches = []
            for micro in range(cfg.grad_accum):
                idx = global_batch_indices(n, step, micro, global_micro, cfg.grad_accum, cfg.seed)
                micro_batches.append(batch_on_device([train_examples[i] for i in idx[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]]))
            # tokens carrying loss in the whole global batch (all ranks, all micro-batches)
            local_tok = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
            global_tok = int(acc.reduce(torch.tensor(local_tok, device=device), "sum"))
            step_loss = torch.zeros((), device=device)
            # how far through the run this step is (0..1, by the clock under a time budget, else by steps):
            # a loss with phases (distill's block-wise phase) reads it, and it survives a resume
            progress = (elapsed / budget) if budget is not None else step / max(1, cfg.max_steps)
            for mi, b in enumerate(micro_batches):
                b["progress"] = min(1.0, progress)
                sync = mi == len(micro_batches) - 1
                # sharded: gradients are reduce-scattered after every micro-batch (skipping it would keep them whole)
                ctx = acc.no_sync(model) if (not sync and world > 1 and not sharded) else _nullctx()
                with ctx, acc.autocast():
                    loss_sum, _ = loss_fn(model, b)
                    loss = loss_sum.float() * world / max(global_tok, 1)
                acc.backward(loss)
                step_loss += loss.detach() / world
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            if cfg.schedule == "time":  # the rate follows the clock: this step's share of the budget
                mult = lr_at(step, cfg, (elapsed_before + time.time() - t0) / budget)
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * mult
            used_lr = opt.param_groups[0]["lr"]  # the rate this step applied (the scheduler moves it on below)
            opt.step()
            if masks:  # a sparsity pattern from prune survives every update
                apply_masks(raw_model, masks)
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(acc.reduce(torch.tensor(sum(int(b["attention_mask"].sum()) for b in micro_batches), device=device), "sum"))
            last_loss = float(acc.reduce(step_loss, "sum"))
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.time()
                tps = (tokens_seen - tok_window[1]) / max(now - tok_window[0], 1e-9)
                tok_window = (now, tokens_seen)
                m = {"step": step, "loss": round(last_loss, 6), "lr": used_lr, "tokens": tokens_seen,
                     "tok_per_s": round(tps, 1), "elapsed_s": round(elapsed_before + now - t0, 2)}
                metrics.append(m)
                if writer:
                    writer.add_scalar("train/loss", last_loss, step)
                    writer.add_scalar("train/lr", m["lr"], step)
                if bar:
                    bar.set_postfix(step=step, loss=f"{last_loss:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{tps:.0f}")
            if bar:
                bar.update(1 if not by_time else min(budget, elapsed_before + time.time() - t0) - bar.n)
            if val_examples and cfg.eval_every and step % cfg.eval_every == 0:
                v = evaluate()
                first_val = v if first_val is None else first_val
                last_val = v
                metrics.append({"step": step, "val_loss": round(v, 6)})
                if writer:
                    writer.add_scalar("val/loss", v, step)
                if best_val is None or v < best_val - 1e-6:
                    best_val, bad_evals = v, 0
                    if cfg.keep_best:
                        save_best()
                else:
                    bad_evals += 1
                    if cfg.early_stopping and bad_evals >= cfg.early_stopping:
                        stopped = "early_stopping"
                        break
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint()
                acc.wait_for_everyone()
        else:
            stopped = "max_steps"
        if stop_signal and stopped == "max_steps" and step < cfg.max_steps:
            stopped = "interrupted"
        # final validation if it has not just run
        if val_examples and stopped != "interrupted" and not (cfg.eval_every and step % cfg.eval_every == 0 and metrics and "val_loss" in metrics[-1]):
            v = evaluate()
            first_val = v if first_val is None else first_val
            last_val = v
            metrics.append({"step": step, "val_loss": round(v, 6)})
            if best_val is None or v < best_val - 1e-6:
                best_val = v
                if cfg.keep_best:
                    save_best()
        if cfg.save_every or stopped == "interrupted":
            save_checkpoint()  # a finished run keeps no optimizer state unless checkpoints were asked for
        acc.wait_for_everyone()
    finally:
        if bar:
            bar.close()
        if writer:
            writer.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if stopped == "interrupted":
        write_metrics()
        raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved in {ckpt_dir} (continue with --resume)")
    if cfg.keep_best and val_examples and best_path.is_file():
        _load_trainable_state(raw_model, raw_extras, torch.load(best_path, map_location="cpu", weights_only=True))
    if sharded:
        opt.state.clear()  # the AdamW states are done with: released before the whole weights are gathered
        _unshard_into(caller_model, model)
    acc.wait_for_everyone()
    if main and best_path.is_file():
        best_path.unlink()
    if main and metrics:
        write_metrics()
        try:
            _plot(metrics, out / "loss.png")
        except Exception as e:  # noqa: BLE001 - a plot must never fail a finished run
            print(f"warning: loss curve not written ({type(e).__name__}: {e})")
    return TrainResult(steps=step, stopped=stopped, train_loss=last_loss, best_val_loss=best_val,
                       first_val_loss=first_val, last_val_loss=last_val, tokens=tokens_seen,
                       seconds=round(elapsed_before + time.time() - t0, 2), precision=acc.mixed_precision,
                       world_size=world, trainable_params=n_trainable)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def result_dict(res: TrainResult) -> dict:
    return {k: getattr(res, k) for k in TrainResult.__dataclass_fields__}
