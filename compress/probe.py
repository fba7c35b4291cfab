"""Rank shape-search finalists by a short distillation probe (`prune --target-params N --probe-steps S`).

The loss right after the cut is a weak predictor of quality after recovery: a shape that loses more at first can
recover more (e.g. a narrower MLP keeps every layer's role; dropping layers does not come back as easily). Minitron
(Muralidharan et al., 2024) found that the ranking of pruned candidates stabilises after a few hundred steps of
distillation, long before they converge. On a CPU budget the probe is a few dozen steps per finalist: each one is
distilled from the unpruned model (KL on its next-token distribution, the recovery the distill stage runs) on the
calibration windows, then scored by next-token loss on calibration windows it did not train on.
"""
from __future__ import annotations

import time


def kl_sum(student_logits, teacher_logits):
    # [B, T, V] x2 -> sum over positions of KL(teacher || student), float32
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum()


def probe(student, teacher, train_windows, eval_windows, steps: int, lr: float, batch_size: int, seed: int = 0) -> dict:
    """Distil `student` (trained in place; a throw-away copy) from `teacher` for `steps` AdamW steps on batches of
    `train_windows` [N, T], then its mean next-token NLL on `eval_windows` [M, T]. The teacher is never changed."""
    import torch

    from edgesmith.machine import cpu_has_fast_bf16

    from .calibration import calibration_loss

    g = torch.Generator().manual_seed(seed)
    # bf16 autocast only where the CPU has fast bf16 (AVX512-BF16/AMX); ~4x slower than fp32 on AVX2-only CPUs
    dtype = torch.bfloat16 if (not torch.cuda.is_available() and cpu_has_fast_bf16()) else None
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    student.train()
    teacher.eval()
    first = last = None
    t0 = time.perf_counter()
    for _ in range(steps):
        ids = train_windows[torch.randint(len(train_windows), (min(batch_size, len(train_windows)),), generator=g)]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, use_cache=False).logits
            loss = kl_sum(student(input_ids=ids, use_cache=False).logits, t_logits) / ids.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = float(loss.detach())
        first = last if first is None else first
    student.eval()
    return {"probe_loss": calibration_loss(student, eval_windows, batch_size), "probe_kl_first": first, "probe_kl_last": last,
            "probe_seconds": round(time.perf_counter() - t0, 1)}
