"""Resident memory at each moment of a short `edgesmith distill` (each model loaded, every forward, backward and
optimizer step): where the peak comes from, against distill's own estimate (issue 20: the LoRA estimate ran short).

    .venv/bin/python studies/distill_memory_phases.py distill --teacher T --student S --data FILE --set lora=true ...

takes exactly `edgesmith distill`'s arguments and prints `MEM <moment> rss .. hwm ..` lines (VmRSS and VmHWM from
/proc/self/status, GiB). The measurement committed in studies/results/scaling/lora-memory.json ran it on the 0.5B
random Llama of studies/scaling.py and its pruned student (MLP 4096 -> 2048, 16 -> 12 layers), 2 steps of one
512-token block, teacher in bf16, gradient checkpointing, once as is and once with glibc's malloc told to return
freed memory (MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 in the environment).
"""
import sys

import torch


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 2**20


def log(tag):
    print(f"MEM {tag:28s} rss {status('VmRSS'):6.2f}  hwm {status('VmHWM'):6.2f} GiB", flush=True)


import accelerate  # noqa: E402

_backward = accelerate.Accelerator.backward


def backward(self, loss, **k):
    log("before backward")
    r = _backward(self, loss, **k)
    log("after backward")
    return r


accelerate.Accelerator.backward = backward
_zero = torch.optim.Optimizer.zero_grad


def zero_grad(self, set_to_none=True):
    log("after optimizer step")
    r = _zero(self, set_to_none)
    log("after zero_grad")
    return r


torch.optim.Optimizer.zero_grad = zero_grad

import edgesmith.distill.distill as D  # noqa: E402
import edgesmith.modelio as M  # noqa: E402

_mk = D.make_loss_fn


def make_loss_fn(*a, **k):
    fn = _mk(*a, **k)

    def wrapped(model, batch):
        log("before forward")
        r = fn(model, batch)
        log("after forward+loss")
        return r
    return wrapped


D.make_loss_fn = make_loss_fn
_load = M.load_model


def load_model(*a, **k):
    r = _load(*a, **k)
    log(f"loaded {str(a[0])[-24:]}")
    return r


M.load_model = load_model

if __name__ == "__main__":
    from edgesmith.cli import main
    log("start")
    sys.exit(main(sys.argv[1:]))
