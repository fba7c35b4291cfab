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
from .data import IGNORE  # noqa: F401 - the label of tokens that carry no loss (prompt, padding); stages import it from here
from .errors import ConfigError, EdgesmithError
from .fsutil import atomic_dir, atomic_open, atomic_path, ensure_writable_dir, write_json
from .machine import cpu_has_fast_bf16
from .sharding import (load_optimizer_state, load_trainable_state, optimizer_state, shard_model, shard_or_not,
                       sliced_like, trainable_state, unshard_into)

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


# ---------------------------------------------------------------- accelerate, optimizer, checkpoints, signals


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


# ---------------------------------------------------------------- the loop's state


@dataclass
class _Run:
    """What one run trains, after accelerate (and sharding) wrapped it, and where it writes."""

    cfg: TrainConfig
    acc: Any
    model: Any  # forward/backward go through this one: DDP-wrapped, or sharded by FSDP
    raw_model: Any  # the same weights unwrapped: what checkpoints save and load
    raw_extras: dict
    params: list
    opt: Any
    sched: Any
    sharded: bool
    masks: dict | None  # a sparsity pattern re-applied after every step (cut like the weights when sharded)
    pad_id: int
    out: Path

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def main(self) -> bool:
        return self.acc.is_main_process


@dataclass
class _Progress:
    """The counters a checkpoint saves and `resume` restores (plus this process's clock)."""

    step: int = 0
    best_val: float | None = None
    first_val: float | None = None
    last_val: float | None = None
    bad_evals: int = 0  # evaluations in a row without improvement (early stopping)
    tokens: int = 0
    elapsed_before: float = 0.0  # seconds trained by the processes before a resume
    metrics: list = field(default_factory=list)
    t0: float = 0.0  # when this process started training (after the baseline evaluation)
    window: tuple = (0.0, 0)  # (time, tokens) of the last metrics line: tokens/s since then

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t0


# ---------------------------------------------------------------- the loop's steps


def _prepare(model, extra_modules: dict, cfg: TrainConfig, pad_id: int, out: Path, masks: dict | None) -> _Run:
    """Accelerator, seed, gradient checkpointing, FSDP sharding (before the optimizer, which must see the sharded
    parameters) or DDP wrapping (after it)."""
    from accelerate.utils import set_seed

    acc = _accelerator(cfg)
    world, rank = acc.num_processes, acc.process_index
    set_seed(cfg.seed)
    if cfg.grad_checkpointing:
        _grad_checkpointing(model)
    sharded = shard_or_not(cfg, acc, model)
    if sharded:
        model = raw_model = shard_model(model, extra_modules, acc.device, world)
        extra_wrapped = dict(extra_modules)
        held = sum(p.to_local().numel() for p in model.parameters())
        print(f"train: sharding fsdp: process {rank} of {world} holds {held} of the model's "
              f"{sum(p.numel() for p in model.parameters())} weights")
    params, opt, sched = _optimizer(model, extra_modules, cfg)
    if not sharded:
        wrapped = acc.prepare(model, *extra_modules.values())
        wrapped = list(wrapped) if extra_modules else [wrapped]
        model, extra_wrapped = wrapped[0], dict(zip(extra_modules, wrapped[1:]))
        raw_model = acc.unwrap_model(model)
    raw_extras = {k: acc.unwrap_model(m) for k, m in extra_wrapped.items()}
    if sharded and masks:  # a mask is cut like its weight, once
        held_as = dict(raw_model.named_parameters())
        masks = {n: sliced_like(m, held_as[n]) for n, m in masks.items()}
    return _Run(cfg=cfg, acc=acc, model=model, raw_model=raw_model, raw_extras=raw_extras, params=params, opt=opt,
                sched=sched, sharded=sharded, masks=masks, pad_id=pad_id, out=out)


def _start(run: _Run) -> _Progress:
    """Fresh counters, or with `resume` the weights, optimizer, schedule, counters and RNG exactly where the
    checkpoint left them."""
    if not run.cfg.resume:
        return _Progress()
    st = _load_checkpoint(run.out / "checkpoint", run.cfg, run.world)
    load_trainable_state(run.raw_model, run.raw_extras, st["weights"])
    load_optimizer_state(run.opt, st["optimizer"])
    run.sched.load_state_dict(st["scheduler"])
    prog = _Progress(step=st["step"], best_val=st["best_val"], first_val=st["first_val"], last_val=st["last_val"],
                     bad_evals=st["bad_evals"], tokens=st["tokens"], elapsed_before=st["elapsed"])
    metrics_path = run.out / "metrics.jsonl"
    if metrics_path.is_file():
        metrics = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        prog.metrics = [m for m in metrics if m.get("step", 0) <= prog.step]
    return prog


def _write_metrics(run: _Run, prog: _Progress) -> None:
    if run.main:
        with atomic_open(run.out / "metrics.jsonl") as f:
            for m in prog.metrics:
                f.write(json.dumps(m) + "\n")


def _save_checkpoint(run: _Run, prog: _Progress, run_info: dict | None) -> None:
    """OUT/checkpoint/ (state.pt + info.json), replaced atomically, and the metrics so far. Every process takes part:
    sharded weights and optimizer states are gathered whole onto the main one."""
    import torch

    weights, optimizer = trainable_state(run.raw_model, run.raw_extras, keep=run.main), optimizer_state(run.opt, keep=run.main)
    if not run.main:
        return
    st = {
        "weights": weights,
        "optimizer": optimizer, "scheduler": run.sched.state_dict(), "step": prog.step,
        "best_val": prog.best_val, "first_val": prog.first_val, "last_val": prog.last_val, "bad_evals": prog.bad_evals,
        "tokens": prog.tokens, "elapsed": prog.elapsed(),
        "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
        "world_size": run.world, "batch_size": run.cfg.batch_size, "config": to_dict(run.cfg),
    }
    with atomic_dir(run.out / "checkpoint") as tmp:
        torch.save(st, tmp / "state.pt")
        write_json(tmp / "info.json", {"step": prog.step, "run": run_info or {}})
    _write_metrics(run, prog)


def _save_best(run: _Run) -> None:
    import torch

    weights = trainable_state(run.raw_model, run.raw_extras, keep=run.main)  # every process: a sharded model is gathered
    if run.main:
        torch.save(weights, run.out / "checkpoint-best.pt")


def _on_device(run: _Run, examples: list[dict]) -> dict:
    return {k: v.to(run.acc.device) for k, v in collate(examples, run.pad_id).items()}


def _evaluate(run: _Run, val_examples: list[dict], val_loss_fn) -> float:
    """Mean validation loss per token over the validation set (or its first eval_batches global batches), all
    processes together."""
    import torch

    cfg, acc, model, device = run.cfg, run.acc, run.model, run.acc.device
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    n = len(val_examples)
    per = cfg.batch_size * run.world
    n_batches = math.ceil(n / per)
    if cfg.eval_batches:
        n_batches = min(n_batches, cfg.eval_batches)
    with torch.no_grad(), acc.autocast():
        for bi in range(n_batches):
            idx = list(range(bi * per, min(n, (bi + 1) * per)))[run.rank * cfg.batch_size:(run.rank + 1) * cfg.batch_size]
            if not idx:
                if run.world > 1:  # a forward is collective (FSDP all-gathers weights, DDP broadcasts buffers such
                    # as rotary frequencies): a process without examples runs one and drops it, or the others hang
                    val_loss_fn(model, _on_device(run, val_examples[:1]))
                continue
            loss_sum, ntok = val_loss_fn(model, _on_device(run, [val_examples[i] for i in idx]))
            total += loss_sum.float()
            count += ntok
    total, count = acc.reduce(total, "sum"), acc.reduce(count, "sum")
    if run.sharded:  # FSDP keeps the top module's weights whole after a forward without backward: back to slices
        model.reshard()
    model.train()
    return float(total / count.clamp(min=1))


def _record_validation(run: _Run, prog: _Progress, v: float, writer, count_bad: bool = True) -> bool:
    """Note a validation loss; a new best is saved (keep_best). True when it improved on the best."""
    prog.first_val = v if prog.first_val is None else prog.first_val
    prog.last_val = v
    prog.metrics.append({"step": prog.step, "val_loss": round(v, 6)})
    if writer:
        writer.add_scalar("val/loss", v, prog.step)
    if prog.best_val is None or v < prog.best_val - 1e-6:
        prog.best_val, prog.bad_evals = v, (0 if count_bad else prog.bad_evals)
        if run.cfg.keep_best:
            _save_best(run)
        return True
    prog.bad_evals += 1 if count_bad else 0
    return False


def _stop_reason(run: _Run, prog: _Progress, budget: float | None, stop_signal: list[int]) -> tuple[str | None, float]:
    """(time_budget | interrupted | None, seconds trained). All processes stop at the same step (one stopping alone
    leaves the rest waiting in a collective): a signal reaching one counts for all, the budget reads the mean clock."""
    import torch

    elapsed, signalled = prog.elapsed(), float(bool(stop_signal))
    if run.world > 1:
        both = torch.tensor([elapsed / run.world, signalled], dtype=torch.float64, device=run.acc.device)
        elapsed, signalled = run.acc.reduce(both, "sum").tolist()
    if budget is not None and elapsed >= budget:
        return "time_budget", elapsed
    return ("interrupted" if signalled else None), elapsed


def _train_step(run: _Run, prog: _Progress, train_examples: list[dict], loss_fn, progress: float,
                budget: float | None) -> tuple[float, float]:
    """One optimizer step over the global batch (every process, every micro-batch): forward, backward, clipping, the
    learning rate, AdamW, the sparsity masks. -> (loss per token of the global batch, the learning rate applied)."""
    import torch

    cfg, acc, world, rank = run.cfg, run.acc, run.world, run.rank
    micro_batches = []
    for micro in range(cfg.grad_accum):
        idx = global_batch_indices(len(train_examples), prog.step, micro, cfg.batch_size * world, cfg.grad_accum, cfg.seed)
        micro_batches.append(_on_device(run, [train_examples[i] for i in idx[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]]))
    # tokens carrying loss in the whole global batch (all ranks, all micro-batches)
    local_tok = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
    global_tok = int(acc.reduce(torch.tensor(local_tok, device=acc.device), "sum"))
    step_loss = torch.zeros((), device=acc.device)
    for mi, b in enumerate(micro_batches):
        b["progress"] = progress  # a loss with phases (distill's block-wise phase) reads how far the run is
        sync = mi == len(micro_batches) - 1
        # sharded: gradients are reduce-scattered after every micro-batch (skipping it would keep them whole)
        ctx = acc.no_sync(run.model) if (not sync and world > 1 and not run.sharded) else _nullctx()
        with ctx, acc.autocast():
            loss_sum, _ = loss_fn(run.model, b)
            loss = loss_sum.float() * world / max(global_tok, 1)
        acc.backward(loss)
        step_loss += loss.detach() / world
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
    if cfg.schedule == "time":  # the rate follows the clock: this step's share of the budget
        mult = lr_at(prog.step, cfg, prog.elapsed() / budget)
        for g in run.opt.param_groups:
            g["lr"] = cfg.lr * mult
    used_lr = run.opt.param_groups[0]["lr"]  # the rate this step applied (the scheduler moves it on below)
    run.opt.step()
    if run.masks:  # a sparsity pattern from prune survives every update
        apply_masks(run.raw_model, run.masks)
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    prog.step += 1
    prog.tokens += int(acc.reduce(torch.tensor(sum(int(b["attention_mask"].sum()) for b in micro_batches), device=acc.device), "sum"))
    return float(acc.reduce(step_loss, "sum")), used_lr


def _log_step(prog: _Progress, loss: float, lr: float, writer, bar) -> None:
    """A metrics line (loss, rate, tokens, tokens/s since the last line), TensorBoard and the progress bar."""
    now = time.time()
    tps = (prog.tokens - prog.window[1]) / max(now - prog.window[0], 1e-9)
    prog.window = (now, prog.tokens)
    m = {"step": prog.step, "loss": round(loss, 6), "lr": lr, "tokens": prog.tokens,
         "tok_per_s": round(tps, 1), "elapsed_s": round(prog.elapsed_before + now - prog.t0, 2)}
    prog.metrics.append(m)
    if writer:
        writer.add_scalar("train/loss", loss, prog.step)
        writer.add_scalar("train/lr", lr, prog.step)
    if bar:
        bar.set_postfix(step=prog.step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")


def _tensorboard(run: _Run, out: Path):
    """A TensorBoard writer on the main process when tensorboard is installed (else the JSONL only)."""
    if not run.main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(out / "tensorboard"))
    except Exception:  # noqa: BLE001 - tensorboard not installed: JSONL only
        return None


def _finish(run: _Run, prog: _Progress, caller_model, has_val: bool) -> None:
    """The best weights back in place (keep_best), whole again in the caller's model when sharded; the metrics and the
    loss curve written."""
    import torch

    best_path = run.out / "checkpoint-best.pt"
    if run.cfg.keep_best and has_val and best_path.is_file():
        load_trainable_state(run.raw_model, run.raw_extras, torch.load(best_path, map_location="cpu", weights_only=True))
    if run.sharded:
        run.opt.state.clear()  # the AdamW states are done with: released before the whole weights are gathered
        unshard_into(caller_model, run.model)
    run.acc.wait_for_everyone()
    if run.main and best_path.is_file():
        best_path.unlink()
    if run.main and prog.metrics:
        _write_metrics(run, prog)
        try:
            _plot(prog.metrics, run.out / "loss.png")
        except Exception as e:  # noqa: BLE001 - a plot must never fail a finished run
            print(f"warning: loss curve not written ({type(e).__name__}: {e})")


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
    out = ensure_writable_dir(out_dir)
    val_loss_fn = val_loss_fn or loss_fn
    if not train_examples:
        raise EdgesmithError("no training examples")

    run = _prepare(model, extra_modules or {}, cfg, pad_id, out, masks)
    prog = _start(run)
    stop_signal, old_handlers = _catch_stop_signals()  # SIGINT/SIGTERM: finish the current step, checkpoint, stop
    writer = _tensorboard(run, out)
    budget = parse_duration(cfg.time_budget) if cfg.time_budget else None
    bar = _progress_bar(cfg, budget, prog.elapsed_before, prog.step) if run.main and cfg.progress else None
    if val_examples and prog.step == 0:  # the baseline: "validation loss decreases" needs a starting point
        prog.first_val = prog.last_val = prog.best_val = _evaluate(run, val_examples, val_loss_fn)
        prog.metrics.append({"step": 0, "val_loss": round(prog.first_val, 6)})
        if cfg.keep_best:  # training that only makes things worse gives back the starting weights
            _save_best(run)
    run.model.train()
    prog.t0 = time.time()  # the time budget counts training, not the baseline evaluation
    prog.window = (prog.t0, prog.tokens)
    stopped, loss = "max_steps", float("nan")
    try:
        while prog.step < cfg.max_steps:
            reason, elapsed = _stop_reason(run, prog, budget, stop_signal)
            if reason:
                stopped = reason
                break
            # how far through the run this step is (0..1, by the clock under a time budget, else by steps)
            progress = (elapsed / budget) if budget is not None else prog.step / max(1, cfg.max_steps)
            loss, lr = _train_step(run, prog, train_examples, loss_fn, min(1.0, progress), budget)
            if prog.step % cfg.log_every == 0 or prog.step == cfg.max_steps:
                _log_step(prog, loss, lr, writer, bar)
            if bar:
                bar.update(1 if budget is None else min(budget, prog.elapsed()) - bar.n)
            if val_examples and cfg.eval_every and prog.step % cfg.eval_every == 0:
                better = _record_validation(run, prog, _evaluate(run, val_examples, val_loss_fn), writer)
                if not better and cfg.early_stopping and prog.bad_evals >= cfg.early_stopping:
                    stopped = "early_stopping"
                    break
            if cfg.save_every and prog.step % cfg.save_every == 0:
                _save_checkpoint(run, prog, run_info)
                run.acc.wait_for_everyone()
        if stop_signal and stopped == "max_steps" and prog.step < cfg.max_steps:
            stopped = "interrupted"
        just_validated = cfg.eval_every and prog.step % cfg.eval_every == 0 and prog.metrics and "val_loss" in prog.metrics[-1]
        if val_examples and stopped != "interrupted" and not just_validated:  # the final validation
            _record_validation(run, prog, _evaluate(run, val_examples, val_loss_fn), writer, count_bad=False)
        if cfg.save_every or stopped == "interrupted":
            _save_checkpoint(run, prog, run_info)  # a finished run keeps no optimizer state unless checkpoints were asked for
        run.acc.wait_for_everyone()
    finally:
        if bar:
            bar.close()
        if writer:
            writer.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if stopped == "interrupted":
        _write_metrics(run, prog)
        raise KeyboardInterrupt(f"interrupted at step {prog.step}; checkpoint saved in {out / 'checkpoint'} (continue with --resume)")
    _finish(run, prog, model, bool(val_examples))
    return TrainResult(steps=prog.step, stopped=stopped, train_loss=loss, best_val_loss=prog.best_val,
                       first_val_loss=prog.first_val, last_val_loss=prog.last_val, tokens=prog.tokens,
                       seconds=round(prog.elapsed(), 2), precision=run.acc.mixed_precision,
                       world_size=run.world, trainable_params=sum(p.numel() for p in run.params))


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def result_dict(res: TrainResult) -> dict:
    return {k: getattr(res, k) for k in TrainResult.__dataclass_fields__}
