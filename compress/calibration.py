"""Calibration text for pruning and the two losses prune measures on it: the user's data (--calib or the shared
Alpaca set) or, with no data at hand, text the model writes itself; packed into windows; scored by the bench's
perplexity (reported) and by a whole-window next-token loss (the shape search's ranking).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from edgesmith.errors import EdgesmithError
from edgesmith.fsutil import data_dir

if TYPE_CHECKING:
    from .prune import PruneConfig


TEACHER_PROMPTS = [
    "Explain how photosynthesis works.", "Write a short story about a lighthouse keeper.",
    "What are the main causes of inflation?", "Give three tips for learning a new language.",
    "Describe the water cycle to a ten-year-old.", "Write a Python function that reverses a string.",
    "Summarise the history of the Roman Empire in a paragraph.", "What is the difference between a virus and a bacterium?",
    "How do I make a cup of green tea?", "Write a polite email asking for a meeting next week.",
    "Why is the sky blue?", "List the planets of the solar system with one fact each.",
    "What is machine learning?", "Give advice for a first job interview.",
    "Describe a sunset over the ocean.", "How does a bicycle stay upright?",
]


def teacher_texts(model, tok, n: int, max_new_tokens: int, seed: int) -> list[str]:
    """Calibration text written by the model itself (when no data is at hand): sampled answers to
    varied prompts, rendered with the chat template so the statistics match how it is used. Sampled
    by the distill stage's one teacher sampler (its targets are not needed here: k=1)."""
    from edgesmith.distill.teacher_data import sample_with_targets

    prompts = [TEACHER_PROMPTS[i % len(TEACHER_PROMPTS)] for i in range(n)]
    if getattr(tok, "chat_template", None):
        seqs = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True) for p in prompts]
    else:
        seqs = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    out = []
    for b in range(0, len(seqs), 8):
        for r in sample_with_targets(model, seqs[b:b + 8], max_new_tokens, k=1, temperature=0.8, top_p=0.95,
                                     eos_ids=eos, pad_id=pad, seed=seed * 1_000_003 + b):
            out.append(tok.decode(r["ids"], skip_special_tokens=False))  # prompt + answer (+ eos when it stopped)
    return out


def calibration_texts(cfg: PruneConfig, tok) -> tuple[list[str], str] | None:
    """(texts, source) from --calib or the shared data, or None (then the teacher writes some)."""
    from edgesmith.data import read_records, render

    if cfg.calib:
        path = Path(cfg.calib)
        if not path.exists():
            raise EdgesmithError(f"{path}: calibration file not found")
        records, _ = read_records(path, skip_bad=True)
        return [render(r, tok) for r in records], str(path)
    root = data_dir()
    if root and (root / "instruct" / "alpaca_en_demo.json").is_file():
        path = root / "instruct" / "alpaca_en_demo.json"
        records, _ = read_records(path, skip_bad=True)
        return [render(r, tok) for r in records], str(path)
    return None


def pack(tok, texts: list[str], seq_len: int, limit: int):
    """Concatenate texts (eos between) and cut into full windows: [N, seq_len] token ids. Where the tokenizer starts
    every text with BOS (Gemma) each window starts with it, as the model always sees text: Gemma 3 270M's MLP
    2048 -> 1024 cut ranked on windows without it scores WikiText perplexity 180, with it 141 (3 windows of 512)."""
    import torch

    from edgesmith.modelio import bos_prefix

    bos = bos_prefix(tok)
    body = seq_len - len(bos)
    ids: list[int] = []
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [eos]
        if len(ids) >= body * limit:
            break
    n = min(limit, len(ids) // body)
    return torch.tensor([bos + ids[i * body:(i + 1) * body] for i in range(n)], dtype=torch.long).view(n, seq_len)


def held_out_perplexity(model, windows) -> float:
    """The bench's perplexity (bench/metrics.py windows_nll: second half of each window scored, like llama-perplexity)
    of an in-memory model on held-out windows [N, T], so prune reports the number `edgesmith bench` would."""
    from edgesmith.bench.backends import HFLM
    from edgesmith.bench.metrics import windows_nll

    return math.exp(float(windows_nll(HFLM.wrap(model), [w.tolist() for w in windows]).mean()))


def calibration_loss(model, windows, batch_size: int = 4) -> float:
    """Mean next-token NLL over every position of the calibration windows [N, T]: how the shape search ranks
    candidates (a loss on the data they were calibrated on, not a reported perplexity)."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(windows), batch_size):
            ids = windows[b:b + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += ids[:, 1:].numel()
    return nll / max(1, count)
