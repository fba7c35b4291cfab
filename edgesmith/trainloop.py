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
(`{"input_ids": [...], "labels": [...]}` plus anything its loss needs). The run's settings, schedule and data order
are in edgesmith/trainconfig.py; its state, checkpoints and resume in edgesmith/trainstate.py.
"""
from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from .data import IGNORE
from .errors import EdgesmithError
from .fsutil import ensure_writable_dir
from .machine import cpu_has_fast_bf16
from .sharding import shard_model, shard_or_not, sliced_like
from .trainconfig import TrainConfig, TrainResult, apply_masks, collate, global_batch_indices, lr_at, parse_duration
from .trainstate import Progress, Run, finish_run, save_best, save_checkpoint, start_or_resume, write_metrics


# ---------------------------------------------------------------- accelerate, optimizer, signals, progress bar


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
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = _adamw8bit() if cfg.optimizer == "adamw8bit" else torch.optim.AdamW
    opt = adamw(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))


def _adamw8bit():
    """bitsandbytes' AdamW8bit: moments quantised block-wise to 8 bits (tensors under 4096 elements keep fp32 ones)."""
    import logging

    # its CPU backend warns on import, on AVX512-BF16 CPUs, about an optional 4-bit matmul kernel no optimizer uses
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise EdgesmithError("train.optimizer adamw8bit needs bitsandbytes: pip install 'edgesmith[lowmem]'") from None
    return bnb.optim.AdamW8bit


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


# ---------------------------------------------------------------- the loop's steps


def _prepare(model, extra_modules: dict, cfg: TrainConfig, pad_id: int, out: Path, masks: dict | None) -> Run:
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
    return Run(cfg=cfg, acc=acc, model=model, raw_model=raw_model, raw_extras=raw_extras, params=params, opt=opt,
                sched=sched, sharded=sharded, masks=masks, pad_id=pad_id, out=out)


def _on_device(run: Run, examples: list[dict]) -> dict:
    return {k: v.to(run.acc.device) for k, v in collate(examples, run.pad_id).items()}


def _evaluate(run: Run, val_examples: list[dict], val_loss_fn) -> float:
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


def _record_validation(run: Run, prog: Progress, v: float, writer, count_bad: bool = True) -> bool:
    """Note a validation loss; a new best is saved (keep_best). True when it improved on the best."""
    prog.first_val = v if prog.first_val is None else prog.first_val
    prog.last_val = v
    prog.metrics.append({"step": prog.step, "val_loss": round(v, 6)})
    if writer:
        writer.add_scalar("val/loss", v, prog.step)
    if prog.best_val is None or v < prog.best_val - 1e-6:
        prog.best_val, prog.bad_evals = v, (0 if count_bad else prog.bad_evals)
        if run.cfg.keep_best:
            save_best(run)
        return True
    prog.bad_evals += 1 if count_bad else 0
    return False


def _stop_reason(run: Run, prog: Progress, budget: float | None, stop_signal: list[int]) -> tuple[str | None, float]:
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


def _train_step(run: Run, prog: Progress, train_examples: list[dict], loss_fn, progress: float,
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


def _log_step(prog: Progress, loss: float, lr: float, writer, bar) -> None:
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


def _tensorboard(run: Run, out: Path):
    """A TensorBoard writer on the main process when tensorboard is installed (else the JSONL only)."""
    if not run.main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(out / "tensorboard"))
    except Exception:  # noqa: BLE001 - tensorboard not installed: JSONL only
        return None


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
    prog = start_or_resume(run)
    stop_signal, old_handlers = _catch_stop_signals()  # SIGINT/SIGTERM: finish the current step, checkpoint, stop
    writer = _tensorboard(run, out)
    budget = parse_duration(cfg.time_budget) if cfg.time_budget else None
    bar = _progress_bar(cfg, budget, prog.elapsed_before, prog.step) if run.main and cfg.progress else None
    if val_examples and prog.step == 0:  # the baseline: "validation loss decreases" needs a starting point
        prog.first_val = prog.last_val = prog.best_val = _evaluate(run, val_examples, val_loss_fn)
        prog.metrics.append({"step": 0, "val_loss": round(prog.first_val, 6)})
        if cfg.keep_best:  # training that only makes things worse gives back the starting weights
            save_best(run)
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
                save_checkpoint(run, prog, run_info)
                run.acc.wait_for_everyone()
        if stop_signal and stopped == "max_steps" and prog.step < cfg.max_steps:
            stopped = "interrupted"
        just_validated = cfg.eval_every and prog.step % cfg.eval_every == 0 and prog.metrics and "val_loss" in prog.metrics[-1]
        if val_examples and stopped != "interrupted" and not just_validated:  # the final validation
            _record_validation(run, prog, _evaluate(run, val_examples, val_loss_fn), writer, count_bad=False)
        if cfg.save_every or stopped == "interrupted":
            save_checkpoint(run, prog, run_info)  # a finished run keeps no optimizer state unless checkpoints were asked for
        run.acc.wait_for_everyone()
    finally:
        if bar:
            bar.close()
        if writer:
            writer.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if stopped == "interrupted":
        write_metrics(run, prog)
        raise KeyboardInterrupt(f"interrupted at step {prog.step}; checkpoint saved in {out / 'checkpoint'} (continue with --resume)")
    finish_run(run, prog, model, bool(val_examples))
    return TrainResult(steps=prog.step, stopped=stopped, train_loss=loss, best_val_loss=prog.best_val,
                       first_val_loss=prog.first_val, last_val_loss=prog.last_val, tokens=prog.tokens,
                       seconds=round(prog.elapsed(), 2), precision=run.acc.mixed_precision,
                       world_size=run.world, trainable_params=sum(p.numel() for p in run.params))


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
