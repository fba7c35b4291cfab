"""The arithmetic of `edgesmith bench`, the same for every backend (bench/backends.py's small interface):

* perplexity: llama-perplexity's method. The whole text is tokenized once, cut into non-overlapping windows of
  `ctx` tokens (bos replaces the first token of each window only if the tokenizer adds bos -- SmolLM2's does
  not), and only the second half of each window is scored, so every scored token sees at least ctx/2 tokens of
  context. The one perplexity of the project: the bench, prune's held-out evaluation, the ONNX check.
* multiple choice: sum of log p(continuation | context) per choice (lm-evaluation-harness); `acc` picks the
  highest sum, `acc_norm` the highest sum per character of the choice.
* agreement: KL(reference || artifact) and top-1 agreement at the scored positions.
* generation: greedy answers to chat prompts.
* latency: TTFT (128/512-token prompts), prefill tok/s (pp512), decode tok/s (tg128 from an empty cache, the
  first token excluded); warm-up first, `repeat` runs, mean +- std.
"""
from __future__ import annotations

import math
import time

import numpy as np

from edgesmith.errors import EdgesmithError


def log_softmax(x: np.ndarray) -> np.ndarray:
    # x: [n, vocab] -> [n, vocab] in float64 (llama.cpp sums in double too)
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def ppl_windows(tokens: list[int], ctx: int, max_chunks: int | None, add_bos: bool, bos_id: int | None) -> list[list[int]]:
    """llama-perplexity's windows: non-overlapping ctx-token slices; bos replaces token 0 if the vocab adds bos."""
    n = len(tokens) // ctx
    if max_chunks:
        n = min(n, max_chunks)
    if n < 1:
        raise EdgesmithError(f"perplexity text has {len(tokens)} tokens: need at least ctx={ctx}")
    wins = [list(tokens[i * ctx:(i + 1) * ctx]) for i in range(n)]
    if add_bos and bos_id is not None:
        for w in wins:
            w[0] = bos_id
    return wins


def window_logprobs(lm, win: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs at the scored positions of one window and the targets they predict.

    Scored like llama-perplexity: logits of positions first..ctx-2 (first = ctx/2) predict tokens
    first+1..ctx-1. -> (logp [ctx/2 - 1, vocab], targets [ctx/2 - 1])
    """
    first = len(win) // 2
    lg = lm.logits(win[:-1], first)              # [ctx-1-first, vocab]
    return log_softmax(lg), np.asarray(win[first + 1:])


def windows_nll(lm, wins: list[list[int]]) -> np.ndarray:
    """Per-token NLL at every scored position of every window (llama-perplexity's method: the second half of each
    window); perplexity = exp(mean). The one perplexity of the project: the bench, prune's held-out evaluation."""
    return np.concatenate([nll_of(*window_logprobs(lm, w)) for w in wins])


def ppl_record(nll: np.ndarray, wins: list[list[int]], ctx: int, text: str, text_tokens: int) -> dict:
    # nll: [scored positions] -> the perplexity entry of a results JSON
    return {"value": float(np.exp(nll.mean())), "ctx": ctx, "chunks": len(wins), "windows": windows_record(wins, ctx),
            "text": text, "tokens_scored": int(nll.size), "text_tokens": text_tokens,
            "nll_stderr": float(nll.std(ddof=1) / math.sqrt(nll.size))}


def windows_record(wins: list[list[int]], ctx: int) -> dict:
    """The exact token windows, compactly: where each starts in the text's tokens, and a hash of the ids
    (two runs -- or two backends with the same tokenizer -- scored the same tokens iff the hashes match)."""
    import hashlib

    ids = np.asarray(wins, dtype=np.int32)
    return {"starts": [i * ctx for i in range(len(wins))], "scored": [ctx // 2 + 1, ctx - 1],
            "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}


def nll_of(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    # logp: [n, vocab], targets: [n] -> [n]
    return -logp[np.arange(len(targets)), targets]


def kl_top1(ref_logp: np.ndarray, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # [n, vocab] x2 -> KL(ref || model) [n], top-1 equal [n]
    kl = (np.exp(ref_logp) * (ref_logp - logp)).sum(-1)
    # KL >= 0; rounding in log-softmax leaves ~-1e-9 where the two are the same model
    return np.maximum(kl, 0.0), ref_logp.argmax(-1) == logp.argmax(-1)


def split_pair(lm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: encode the whole; the
    continuation is what follows the context's own tokens."""
    whole = lm.encode(context + continuation)
    n_ctx = len(lm.encode(context))
    prefix = [lm.bos_id] if lm.add_bos and lm.bos_id is not None else []
    ids = prefix + whole
    start = len(prefix) + n_ctx  # first continuation token
    if start >= len(ids):
        raise EdgesmithError(f"continuation {continuation!r} tokenizes to nothing")
    if start == 0:
        raise EdgesmithError("empty context and no bos token: cannot score the first token")
    return ids[:start], ids[start:]


def continuation_loglik(lm, context: str, continuation: str) -> float:
    """sum log p(continuation | context) in one pass over context + continuation."""
    ctx_ids, cont = split_pair(lm, context, continuation)
    ids = ctx_ids + cont
    lg = lm.logits(ids[:-1], len(ctx_ids) - 1)   # rows predict cont
    return float(-nll_of(log_softmax(lg), np.asarray(cont)).sum())


def choice_logliks(lm, pairs: list[tuple[str, str]]) -> np.ndarray:
    """sum log p(continuation | context) for each pair; choices that share their context tokens (ARC,
    PIQA, BoolQ, COPA) evaluate the context once and each continuation on its cached KV."""
    if not hasattr(lm, "extend"):
        return np.array([continuation_loglik(lm, c, x) for c, x in pairs])
    split = [split_pair(lm, c, x) for c, x in pairs]
    out = np.empty(len(pairs))
    done: dict[tuple, np.ndarray] = {}
    for i, (ctx_ids, cont) in enumerate(split):
        key = tuple(ctx_ids)
        if key not in done:
            done.clear()  # the backend keeps one prefix: a new context replaces the last one
            done[key] = lm.prefix(ctx_ids)       # [vocab]: predicts cont[0]
        rows = [done[key][None]]
        if len(cont) > 1:
            rows.append(lm.extend(cont[:-1]))    # [len(cont)-1, vocab]: predict cont[1:]
        out[i] = -nll_of(log_softmax(np.concatenate(rows)), np.asarray(cont)).sum()
    return out


def mc_scores(lm, items: list[dict]) -> dict:
    """acc / acc_norm with standard errors, plus every choice's log-likelihood (`logliks`, one list per item):
    cross-backend comparisons and paired significance tests need the per-item numbers, not only the means."""
    acc, acc_norm, lls = [], [], []
    batched = None
    if hasattr(lm, "score_pairs"):  # a backend that scores many sequences per forward (HF): all items at once
        flat = lm.score_pairs([split_pair(lm, c, x) for it in items for c, x in it["pairs"]])
        cuts = np.cumsum([0] + [len(it["pairs"]) for it in items])
        batched = [flat[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    for n, it in enumerate(items):
        ll = batched[n] if batched is not None else choice_logliks(lm, it["pairs"])
        chars = np.array([max(1, len(x.lstrip(" "))) for _, x in it["pairs"]])
        acc.append(int(ll.argmax() == it["gold"]))
        acc_norm.append(int((ll / chars).argmax() == it["gold"]))
        lls.append([round(float(x), 5) for x in ll])

    def stderr(x):
        return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None

    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "n": len(items),
            "acc_stderr": stderr(acc), "acc_norm_stderr": stderr(acc_norm),
            "gold": [int(it["gold"]) for it in items], "logliks": lls}


def chat_prompt(lm, messages: list[dict]) -> list[int]:
    if lm.chat_template:
        from edgesmith.chat_template import render_chat_template

        text = render_chat_template(lm.chat_template, messages, add_generation_prompt=True, special=lm.special)
    else:  # documented plain fallback (edgesmith.data.render)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return lm.encode(text, special=True)


def generate(lm, ids: list[int], max_new: int) -> tuple[list[int], bool]:
    """Greedy; -> (new ids without eos, stopped at eos)."""
    out = []
    tok = lm.prefill(ids)
    for _ in range(max_new):
        if tok in lm.eos_ids:
            return out, True
        out.append(tok)
        if len(out) == max_new:
            break
        tok = lm.step(tok)
    return out, False


def gen_scores(lm, items: list[dict], max_new: int) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps, refs, stopped, lens, secs = [], [], [], [], []
    for it in items:
        ids = chat_prompt(lm, it["messages"])
        t0 = time.perf_counter()
        new, stop = generate(lm, ids, max_new)
        secs.append(time.perf_counter() - t0)
        hyps.append(lm.decode(new).strip())
        refs.append(it["reference"].strip())
        stopped.append(stop and bool(hyps[-1]))
        lens.append(len(new))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)]
    return {
        "exact_match": float(np.mean([h == r for h, r in zip(hyps, refs)])),
        "rougeL": float(np.mean(rouge)),
        "bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
        "chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score),
        "success_rate": float(np.mean(stopped)),  # ended with eos, non-empty, within the budget
        "mean_output_tokens": float(np.mean(lens)),
        "mean_gen_s": float(np.mean(secs)),
        "n": len(items), "max_new_tokens": max_new,
    }


def mean_std(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def measure_latency(lm, prompt: list[int], repeat: int, n_gen: int = 128) -> dict:
    """TTFT for 128/512-token prompts, pp512 and tg128 (llama-bench's tests), each test in its own block after its
    own warm-up, as llama-bench runs them: a decode timed right after a 512-token prefill read ~1.5% slower than one
    after another decode (llama.cpp, SmolLM2 Q4_K_M, 1 and 2 threads, 12 paired rounds each), and tg128 is meant to be
    llama-bench's number."""
    if len(prompt) < 512:
        prompt = (prompt * (512 // max(1, len(prompt)) + 1))[:512]
    p128, p512 = prompt[:128], prompt[:512]

    def prefills():
        t0 = time.perf_counter()
        lm.prefill(p128)
        t128 = time.perf_counter() - t0
        t0 = time.perf_counter()
        lm.prefill(p512)
        return t128, time.perf_counter() - t0

    def decode(n_gen=n_gen):
        tok = lm.prefill(p512[:1])               # first token from an empty cache (excluded from decode speed)
        t0 = time.perf_counter()
        for _ in range(n_gen):
            tok = lm.step(tok)
        return time.perf_counter() - t0

    # warm-ups: page in weights, allocate buffers, let caches settle (16 decode steps are enough)
    prefills()
    pre = [prefills() for _ in range(repeat)]
    decode(16)
    runs = [(*p, decode()) for p in pre]
    t128 = [r[0] for r in runs]
    t512 = [r[1] for r in runs]
    pp = [512 / r[1] for r in runs]
    tg = [n_gen / r[2] for r in runs]
    out = {}
    out["ttft_ms"], out["ttft_ms_std"] = (round(v * 1000, 2) for v in mean_std(t128))
    out["ttft_512_ms"], out["ttft_512_ms_std"] = (round(v * 1000, 2) for v in mean_std(t512))
    out["prefill_tok_s"], out["prefill_tok_s_std"] = (round(v, 2) for v in mean_std(pp))
    out["decode_tok_s"], out["decode_tok_s_std"] = (round(v, 2) for v in mean_std(tg))
    out["repeat"] = repeat
    return out
