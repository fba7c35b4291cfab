"""The distillation losses: divergences between teacher and student next-token distributions (full logits or the
teacher's cached top-k), hidden-state and block-wise distances, and `make_loss_fn`, the loss over one batch that
the shared training loop (edgesmith/trainloop.py) calls.

    loss = (1 - ce_weight) * T² * D(teacher_T || student_T)  +  ce_weight * CE  +  hidden_weight * H  (+ block terms)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from edgesmith.errors import EdgesmithError
from edgesmith.data import IGNORE

if TYPE_CHECKING:
    from .distill import DistillConfig
    from .topk_cache import TopkCache


# ---------------------------------------------------------------- divergences (pure functions)
# s_logp, t_logp: [N, V] log-probabilities (already tempered) -> per-row divergence [N]


def kl_forward(s_logp, t_logp):
    """KL(teacher || student): mass-covering; the classic KD loss."""
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def kl_reverse(s_logp, t_logp):
    """KL(student || teacher): mode-seeking; the student may drop low-probability teacher modes."""
    return (s_logp.exp() * (s_logp - t_logp)).sum(-1)


def js_divergence(s_logp, t_logp):
    """Jensen-Shannon: symmetric, bounded by log 2."""
    import math

    import torch

    m_logp = torch.logsumexp(torch.stack([s_logp, t_logp]), dim=0) - math.log(2.0)  # [N, V] log of the mixture
    return 0.5 * kl_forward(m_logp, t_logp) + 0.5 * kl_forward(m_logp, s_logp)


LOSSES = {"forward_kl": kl_forward, "reverse_kl": kl_reverse, "js": js_divergence}


def kd_loss_full(s_logits, t_logits, temperature: float, kind: str):
    """s_logits, t_logits: [N, V] raw logits -> T² · D(p_t^T || p_s^T) per row [N]."""
    import torch.nn.functional as F

    T = temperature
    s_logp = F.log_softmax(s_logits.float() / T, dim=-1)  # [N, V]
    t_logp = F.log_softmax(t_logits.float() / T, dim=-1)  # [N, V]
    return LOSSES[kind](s_logp, t_logp) * T * T


def kd_loss_topk(s_logits, t_idx, t_logp, temperature: float, kind: str):
    """Divergence against a cached sparse teacher. s_logits [N, V]; t_idx [N, k] token ids; t_logp [N, k]
    teacher log-probs at T=1 -> [N].

    The teacher is renormalised over its top-k at temperature T. Forward KL uses the student's full-vocab
    log-probs at those ids (so it also pushes mass *into* the support); reverse KL and JS compare both
    distributions renormalised over the support (they need the student's mass there only).
    """
    import torch.nn.functional as F

    T = temperature
    t = F.log_softmax(t_logp.float() / T, dim=-1)                       # [N, k]
    if kind == "forward_kl":
        s = F.log_softmax(s_logits.float() / T, dim=-1).gather(-1, t_idx)  # [N, k]
    else:
        s = F.log_softmax(s_logits.float().gather(-1, t_idx) / T, dim=-1)  # [N, k]
    return LOSSES[kind](s, t) * T * T


def hidden_distance(s_h, t_h, kind: str):
    """s_h, t_h: [N, H] (student already projected to the teacher width) -> [N]."""
    import torch.nn.functional as F

    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s_h.float(), t_h.float(), dim=-1)
    return (s_h.float() - t_h.float()).pow(2).mean(-1)


def block_map(kept: list[int], n_teacher: int) -> list[tuple[int, int]]:
    """kept: the teacher layer each student layer came from -> per student block (r_in, r_out), indices into the
    teacher's residual stream (0 = embeddings, r = output of teacher layer r-1): the block reads stream kept[j] and
    should write stream kept[j+1] (the last block: the teacher's last layer output, n_teacher)."""
    nxt = list(kept[1:]) + [n_teacher]
    return list(zip(kept, nxt))


def block_distance(s_h, t_h):
    """s_h, t_h: [N, H] one block's outputs over N tokens -> summed squared error normalised by the teacher's mean
    squared norm (a scalar): blocks whose residual streams differ 100x in scale weigh alike."""
    t = t_h.float()
    return (s_h.float() - t).pow(2).sum() / t.pow(2).sum(-1).mean().clamp(min=1e-6)


def kept_layers(student_dir: Path, n_student: int, n_teacher: int) -> tuple[list[int], str]:
    """Which teacher layer each student layer came from: prune_report.json's kept_layers when the student is an
    edgesmith prune output, else the identity (same depth) or evenly spaced layers (an assumption, said so)."""
    rep = student_dir / "prune_report.json"
    if rep.is_file():
        kept = json.loads(rep.read_text()).get("kept_layers")
        if isinstance(kept, list) and len(kept) == n_student and all(isinstance(k, int) and 0 <= k < n_teacher for k in kept):
            return sorted(kept), "prune_report.json"
    if n_student == n_teacher:
        return list(range(n_student)), "same depth"
    return [round(j * n_teacher / n_student) for j in range(n_student)], "evenly spaced (no prune_report.json)"


class BlockTaps:
    """Forward hooks on every decoder layer: record each layer's output; optionally replace each student layer's
    input with a given tensor (the teacher's stream at that block), so every block trains on the teacher's input."""

    def __init__(self, model):
        self.out: list = [None] * len(_decoder_layers(model))
        self.feed: list | None = None  # per layer: the input to use instead of the previous layer's output
        self.handles = []
        for i, layer in enumerate(_decoder_layers(model)):
            self.handles.append(layer.register_forward_hook(self._save(i)))
            self.handles.append(layer.register_forward_pre_hook(self._swap(i), with_kwargs=True))

    def close(self) -> None:
        """Remove the hooks: after training the model runs (and is saved) as a plain model."""
        for h in self.handles:
            h.remove()
        self.handles, self.feed, self.out = [], None, [None] * len(self.out)

    def _save(self, i):
        def hook(mod, args, out):  # noqa: ARG001 - return None: the output is not changed
            self.out[i] = out[0] if isinstance(out, tuple) else out
        return hook

    def _swap(self, i):
        def hook(mod, args, kwargs):  # noqa: ARG001
            if self.feed is None:
                return None
            h = self.feed[i].to(args[0].dtype if args else kwargs["hidden_states"].dtype)
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
        return hook


def _decoder_layers(model):
    return unwrap(model).model.layers


def unwrap(model):
    """The bare transformers model under DDP / peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


# ---------------------------------------------------------------- the loss over one batch


def make_loss_fn(teacher, cfg: DistillConfig, pairs: list[tuple[int, int]], proj=None, cache: TopkCache | None = None,
                 blocks: tuple[list[tuple[int, int]], BlockTaps, BlockTaps] | None = None):
    """loss_fn(student, batch) -> (loss_sum over label positions, n_label_positions) for the shared loop.
    blocks: (block_map, student taps, teacher taps) when a block-wise loss is on."""
    import torch
    from torch.utils.checkpoint import checkpoint

    T, kind = cfg.temperature, cfg.loss
    t_head = unwrap(teacher).get_output_embeddings() if teacher is not None else None  # None: every target is cached

    def block_loss(ids, att, student=None):
        """Mean over blocks of each block's normalised squared error against the teacher's stream (after a teacher
        forward filled its taps). With `student` it runs here, every block on the teacher's input; without, the
        student's last forward (its own inputs) is scored."""
        bmap, s_taps, t_taps = blocks
        stream = [unwrap(teacher).get_input_embeddings()(ids)] + list(t_taps.out)  # n_t + 1 of [B, L, H]
        if student is not None:
            # the feed stays on until the next loss_fn call: with gradient checkpointing the backward recomputes every
            # block, and must recompute it on the same fed input (on the student's own it fails)
            s_taps.feed = [stream[a] for a, _ in bmap]
            logits = student(input_ids=ids, attention_mask=att, logits_to_keep=1).logits
        tok = att.bool()                                                          # [B, L] real tokens
        loss = sum(block_distance(s_taps.out[j][tok], stream[b][tok]) for j, (_, b) in enumerate(bmap)) / len(bmap)
        # the phase's loss does not depend on the final norm and head; DDP refuses parameters that get no gradient,
        # so they join the graph with a zero weight (their gradient is exactly 0)
        return loss + 0.0 * logits.sum() if student is not None else loss

    def chunk_loss(s_rows, t_rows, t_idx, t_logp, labels, s_head):
        # s_rows [C, Hs] student final hidden; t_rows [C, Ht] teacher final hidden (or None with a cache)
        s_logits = s_head(s_rows)                                    # [C, V]
        if t_idx is not None:
            kd = kd_loss_topk(s_logits, t_idx, t_logp, T, kind)      # [C]
        else:
            with torch.no_grad():
                t_logits = t_head(t_rows)                            # [C, V]
            kd = kd_loss_full(s_logits, t_logits, T, kind)           # [C]
        loss = (1 - cfg.ce_weight) * kd.sum()
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * torch.nn.functional.cross_entropy(s_logits.float(), labels, reduction="sum")
        return loss

    def loss_fn(student, batch):
        ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if blocks is not None:
            blocks[1].feed = None  # the last block-phase step's backward is done: the student runs on its own inputs
        want_hidden = cfg.hidden_weight > 0
        m = labels[:, 1:] != IGNORE                                  # [B, L-1] positions that predict a label
        # block-wise phase: the first block_phase of the run (training batches carry "progress"; validation does not)
        phase = blocks is not None and cfg.block_phase > 0 and batch.get("progress", 1.0) < cfg.block_phase
        mixed = blocks is not None and cfg.block_weight > 0 and torch.is_grad_enabled()
        t_hs = None
        if cache is None or want_hidden or phase or mixed:
            with torch.no_grad():  # one teacher pass: final hidden states for KD, layer outputs for the block taps
                t_hs = teacher(input_ids=ids, attention_mask=att, output_hidden_states=True, logits_to_keep=1).hidden_states
        if phase:
            return block_loss(ids, att, student), int(m.sum())
        s_out = student(input_ids=ids, attention_mask=att, output_hidden_states=True, logits_to_keep=1)
        s_hs = s_out.hidden_states                                   # tuple of [B, L, Hs]
        s_rows = s_hs[-1][:, :-1][m]                                 # [N, Hs]
        y = labels[:, 1:][m]                                         # [N]
        t_rows = t_hs[-1][:, :-1][m] if (t_hs is not None and cache is None) else None  # [N, Ht]
        t_idx = t_logp = None
        if cache is not None:
            t_idx, t_logp = cache.rows(batch["index"].tolist(), ids.device, m.sum(1).tolist())
            if t_idx.shape[0] != s_rows.shape[0]:
                raise EdgesmithError("teacher top-k cache does not match the data (delete the cache entry and rerun)")
        s_head = unwrap(student).get_output_embeddings()
        total = s_rows.new_zeros((), dtype=torch.float32)
        C = cfg.chunk_size
        for c in range(0, s_rows.shape[0], C):
            sl = slice(c, c + C)
            args = (s_rows[sl], None if t_rows is None else t_rows[sl], None if t_idx is None else t_idx[sl],
                    None if t_logp is None else t_logp[sl], y[sl], s_head)
            # checkpoint: keep only the [C, H] inputs; the [C, V] logits are recomputed in backward
            total = total + (checkpoint(chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk_loss(*args))
        if want_hidden:
            for j, (a, b) in enumerate(pairs):
                sh = s_hs[a][:, :-1][m]                              # [N, Hs]
                th = t_hs[b][:, :-1][m]                              # [N, Ht]
                if proj is not None and proj[j] is not None and not isinstance(proj[j], torch.nn.Identity):
                    sh = proj[j](sh)                                 # [N, Ht]
                total = total + cfg.hidden_weight / len(pairs) * hidden_distance(sh, th, cfg.hidden_loss).sum()
        if mixed:  # the student's own forward above filled its taps
            total = total + cfg.block_weight * block_loss(ids, att)
        return total, int(m.sum())

    return loss_fn
