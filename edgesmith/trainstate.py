"""The state of one training run and how it survives: `Run` (what is trained, wrapped by accelerate or sharded, and
where it writes), `Progress` (the counters a checkpoint saves), resume from OUT/checkpoint (weights, AdamW, schedule,
counters and RNG exactly where they were), checkpoints written atomically, the best weights kept aside, the metrics
JSONL and the loss curve. Used by edgesmith/trainloop.py."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import to_dict
from .errors import EdgesmithError
from .fsutil import atomic_dir, atomic_open, atomic_path, write_json
from .sharding import load_optimizer_state, load_trainable_state, optimizer_state, trainable_state, unshard_into
from .trainconfig import TrainConfig


@dataclass
class Run:
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
class Progress:
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


# ---------------------------------------------------------------- start or resume


def load_checkpoint(ckpt_dir: Path, cfg: TrainConfig, world: int) -> dict:
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


def start_or_resume(run: Run) -> Progress:
    """Fresh counters, or with `resume` the weights, optimizer, schedule, counters and RNG exactly where the
    checkpoint left them."""
    if not run.cfg.resume:
        return Progress()
    st = load_checkpoint(run.out / "checkpoint", run.cfg, run.world)
    load_trainable_state(run.raw_model, run.raw_extras, st["weights"])
    load_optimizer_state(run.opt, st["optimizer"])
    run.sched.load_state_dict(st["scheduler"])
    prog = Progress(step=st["step"], best_val=st["best_val"], first_val=st["first_val"], last_val=st["last_val"],
                     bad_evals=st["bad_evals"], tokens=st["tokens"], elapsed_before=st["elapsed"])
    metrics_path = run.out / "metrics.jsonl"
    if metrics_path.is_file():
        metrics = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        prog.metrics = [m for m in metrics if m.get("step", 0) <= prog.step]
    return prog


# ---------------------------------------------------------------- what a run writes


def write_metrics(run: Run, prog: Progress) -> None:
    if run.main:
        with atomic_open(run.out / "metrics.jsonl") as f:
            for m in prog.metrics:
                f.write(json.dumps(m) + "\n")


def save_checkpoint(run: Run, prog: Progress, run_info: dict | None) -> None:
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
    write_metrics(run, prog)


def save_best(run: Run) -> None:
    import torch

    weights = trainable_state(run.raw_model, run.raw_extras, keep=run.main)  # every process: a sharded model is gathered
    if run.main:
        torch.save(weights, run.out / "checkpoint-best.pt")


def plot_losses(metrics: list[dict], path: Path) -> None:
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


def finish_run(run: Run, prog: Progress, caller_model, has_val: bool) -> None:
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
        write_metrics(run, prog)
        try:
            plot_losses(prog.metrics, run.out / "loss.png")
        except Exception as e:  # noqa: BLE001 - a plot must never fail a finished run
            print(f"warning: loss curve not written ({type(e).__name__}: {e})")
