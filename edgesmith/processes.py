"""Several processes, one output: who writes and who waits when a stage runs under `accelerate launch`.

Every process of a multi-process run executes the same stage code. Outputs (model, tokenizer, manifests, metrics,
plots, checkpoints) are written by the main process alone while the others wait (`main_writes`), so the command returns
in every process only once the output is complete and no two processes ever write the same file. Caches that every
process reads (a materialised GGUF, the teacher's corpus and its top-k targets) are built by the first process on each
machine while the others wait, then found and read by them (`main_first`).

The waits go through a gloo group of their own with a timeout of days: sampling a teacher corpus can take hours, longer
than the default process group lets one process wait for another (30 minutes on gloo, 10 on nccl). A process that fails
while the others wait ends the run: accelerate's launcher (torchrun) stops the rest. One process: every call here is a
no-op.
"""
from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
WAIT_TIMEOUT = timedelta(days=7)
_wait_group: list = []  # the gloo group of `wait`, created on first use (every process reaches it at the same point)


def state():
    """accelerate's PartialState for this process. Without CUDA it is asked for the CPU explicitly: a bare
    PartialState() there reads one process even under `accelerate launch`, and the processes would run unaware of each
    other. Every stage that may run under the launcher asks here first (the training loop's Accelerator then joins the
    same process group)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def wait() -> None:
    """Every process meets here (no practical timeout)."""
    s = state()
    if s.num_processes == 1:
        return
    import torch.distributed as dist

    if not _wait_group:
        _wait_group.append(dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))
    dist.barrier(group=_wait_group[0])


@contextlib.contextmanager
def main_first(local: bool = True) -> Iterator[None]:
    """The block runs on the main process first (per machine with `local`) while the others wait; then on the others,
    which find what it built in the cache. Every process must enter it."""
    s = state()
    first = s.is_local_main_process if local else s.is_main_process
    if not first:
        wait()
    yield
    if first:
        wait()


def main_writes(write: Callable[[], T]) -> T | None:
    """write() on the main process only (None on the others); every process returns once it is done."""
    out = write() if state().is_main_process else None
    wait()
    return out


def is_main() -> bool:
    return state().is_main_process
