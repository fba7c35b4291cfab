"""Teacher-generated corpus (`--data teacher:N`): the teacher answers N prompts drawn from the seed prompts
shipped in distill/seed_prompts.jsonl (written for this project; varied topics), by sampling. The corpus is
cached under cache_dir()/teacher-data keyed by the teacher's fingerprint and the sampling settings, and
written batch by batch, so an interrupted generation continues where it stopped and a finished one is
reused: distillation then needs no dataset and no network.

Rows are chat records: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "topic": ..., "finish": ...}.
"""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from dataclasses import dataclass
from pathlib import Path

from edgesmith.errors import EdgesmithError


def seed_prompts() -> list[dict]:
    """The shipped seed prompts: [{"prompt": str, "topic": str}, ...]."""
    text = resources.files("edgesmith.distill").joinpath("seed_prompts.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        raise EdgesmithError("distill/seed_prompts.jsonl is empty")
    return rows


def prompt_order(n: int, n_prompts: int, seed: int) -> list[int]:
    """Which seed prompt sample i answers: every prompt once per round, rounds shuffled with the seed."""
    import random

    out: list[int] = []
    r = 0
    while len(out) < n:
        order = list(range(n_prompts))
        random.Random(seed * 7919 + r).shuffle(order)
        out += order
        r += 1
    return out[:n]


def corpus_path(teacher_path: Path, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int) -> Path:
    from edgesmith.fsutil import cache_dir, model_fingerprint

    prompts_hash = hashlib.sha256(json.dumps(seed_prompts()).encode()).hexdigest()[:8]
    key = f"{model_fingerprint(teacher_path)}-p{prompts_hash}-t{temperature}-p{top_p}-m{max_new_tokens}-s{seed}"
    return cache_dir() / "teacher-data" / f"{key}-n{n}.jsonl"


def generate_corpus(teacher: str, n: int, max_new_tokens: int = 192, temperature: float = 0.8, top_p: float = 0.95,
                    seed: int = 0, batch_size: int = 16, progress: bool = True) -> Path:
    """Sample n teacher answers (cached); returns the JSONL path."""
    import torch

    from edgesmith import modelio
    from edgesmith.fsutil import write_text

    t_path = modelio.resolve(teacher)
    path = corpus_path(t_path, n, max_new_tokens, temperature, top_p, seed)
    if path.is_file():
        return path
    partial = path.with_name(path.name + ".partial")
    rows: list[dict] = []
    if partial.is_file():  # continue an interrupted generation
        rows = [json.loads(x) for x in partial.read_text(encoding="utf-8").splitlines() if x.strip()]
    prompts = seed_prompts()
    order = prompt_order(n, len(prompts), seed)

    model, tok = modelio.load(t_path, dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu")
    use_gqa_attention(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=len(rows), desc="teacher answers", unit="ans", dynamic_ncols=True)
    while len(rows) < n:
        start = len(rows)
        batch = [prompts[i] for i in order[start:start + batch_size]]
        seqs = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=True, add_generation_prompt=True)
                for p in batch]
        # the one sampler (targets not needed here: k=1); each batch reproducible on its own (resumable)
        res = sample_with_targets(model, seqs, max_new_tokens, k=1, temperature=temperature, top_p=top_p,
                                  eos_ids=eos, pad_id=pad, seed=seed * 1_000_003 + start)
        for p, r in zip(batch, res):
            new = r["ids"][r["n_prompt"]:]
            cut = next((j for j, t in enumerate(new) if t in eos), len(new))
            answer = tok.decode(new[:cut], skip_special_tokens=True).strip()
            rows.append({"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": answer}],
                         "topic": p.get("topic", ""), "finish": r["finish"]})
        write_text(partial, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        if bar:
            bar.update(len(batch))
    if bar:
        bar.close()
    rows = [r for r in rows[:n] if r["messages"][1]["content"]]
    if not rows:
        raise EdgesmithError("the teacher produced no answers (empty generations)")
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    partial.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- batched sampling with the teacher's targets
#
# The corpus the student distils on is written by the teacher itself, and every forward the teacher makes
# while writing it already holds its next-token distribution at that position: keep the top-k log-probs
# then, and training never runs the teacher again. One hand-written loop (KV cache, left padding,
# temperature/top-p sampling) instead of `generate`, because `generate` returns neither the prompt
# positions' distributions nor lets us keep only their top-k as it goes.


SAMPLE_CANDIDATES = 256  # nucleus sampling looks at the 256 most likely tokens: sorting the 49k-token vocabulary
                         # for every row of every step cost 0.13 s per step at batch 32, more than the forward


def top_p_sample(logp, temperature: float, top_p: float, gen):
    """logp [B, C] log-probs of C candidate tokens (sorted, most likely first) -> chosen column [B].
    Temperature, then the smallest prefix whose probability reaches top_p; greedy when temperature == 0."""
    import torch

    if temperature <= 0:
        return torch.zeros(logp.shape[0], dtype=torch.long, device=logp.device)
    p = torch.softmax(logp.float() / temperature, dim=-1)                # [B, C], still sorted
    if top_p < 1.0:
        p = p * ((p.cumsum(-1) - p) < top_p)                              # keep the smallest prefix reaching top_p
    return torch.multinomial(p, 1, generator=gen)[:, 0]


def _sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention without repeat_kv: query [B, H, q, d], key/value [B, KV, L, d]. On CPU
    transformers copies every layer's whole KV cache H/KV times per decoding step (GQA in SDPA is enabled only on
    CUDA/XPU); torch's kernel groups the heads itself. Same math, same outputs."""
    import torch

    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                           scale=scaling, is_causal=is_causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(model) -> bool:
    """Switch a grouped-query model on CPU to _sdpa_gqa (registered once with transformers); False where it does not
    apply (no GQA, not on CPU, or the model does not use SDPA)."""
    c = model.config
    if (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) == c.num_attention_heads:
        return False
    if next(model.parameters()).device.type != "cpu" or getattr(c, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("edgesmith_sdpa_gqa", _sdpa_gqa)
    AttentionMaskInterface.register("edgesmith_sdpa_gqa", sdpa_mask)
    model.set_attn_implementation("edgesmith_sdpa_gqa")
    return True


def sample_with_targets(model, prompts: list[list[int]], max_new_tokens: int, *, k: int, temperature: float = 0.8,
                        top_p: float = 0.95, eos_ids: list[int] = (), pad_id: int = 0, seed: int = 0) -> list[dict]:
    """Continue each prompt by sampling; return per sequence its tokens and the teacher's top-k log-probs at
    every position that predicts a next token.

    prompts: B lists of token ids -> [{"ids": [L], "idx": int32 [L-1, k], "logp": float16 [L-1, k],
    "n_prompt": int, "finish": "stop" | "length"}]. Row j of idx/logp is the teacher's distribution for ids[j+1]
    given ids[:j+1] (temperature 1: the targets are the true distribution, whatever the sampling settings).
    A sequence stops after an eos id (kept) or after max_new_tokens new tokens.
    """
    import numpy as np
    import torch

    B, P = len(prompts), max(len(p) for p in prompts)
    dev = next(model.parameters()).device
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding: every row's next token lands in the same column
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=dev)
    rows_idx: list[list[np.ndarray]] = [[] for _ in range(B)]
    rows_logp: list[list[np.ndarray]] = [[] for _ in range(B)]
    out_ids = [list(p) for p in prompts]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    finish = ["length"] * B

    C = max(k, SAMPLE_CANDIDATES)

    def keep_topk(logits, rows):  # logits [B, n, V]; rows: (batch row, slice of n) to keep -> top-C of the last position
        # top-k of the raw logits, then subtract log-sum-exp: no [B, n, V] log-softmax tensor is written
        v, i = logits.topk(min(C, logits.shape[-1]), dim=-1)               # [B, n, C] sorted
        v = v.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)
        vk, ik = v[..., :k].to(torch.float16).cpu().numpy(), i[..., :k].to(torch.int32).cpu().numpy()
        for b, sl in rows:
            rows_idx[b].append(ik[b, sl])
            rows_logp[b].append(vk[b, sl])
        return v[:, -1], i[:, -1]                                          # [B, C] candidates for the next token

    with torch.inference_mode():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)                            # [B, P]
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.past_key_values
        cand_lp, cand_id = keep_topk(out.logits, [(b, slice(P - len(p), P)) for b, p in enumerate(prompts)])
        last_pos = pos[:, -1]
        for t in range(max_new_tokens):
            pick = top_p_sample(cand_lp, temperature, top_p, gen).to(dev)    # [B] column among the candidates
            tok = cand_id.gather(-1, pick[:, None])[:, 0]                   # [B] token ids
            for b in torch.nonzero(~done).flatten().tolist():
                out_ids[b].append(int(tok[b]))
            hit = torch.isin(tok, eos) & ~done
            for b in torch.nonzero(hit).flatten().tolist():
                finish[b] = "stop"
            done |= hit
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
            last_pos = last_pos + 1
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            cand_lp, cand_id = keep_topk(out.logits, [(b, slice(0, 1)) for b in torch.nonzero(~done).flatten().tolist()])
    res = []
    for b in range(B):
        n = len(out_ids[b]) - 1                                            # rows that predict a next token
        idx = np.concatenate(rows_idx[b])[:n]
        logp = np.concatenate(rows_logp[b])[:n]
        res.append({"ids": out_ids[b], "idx": idx, "logp": logp, "n_prompt": len(prompts[b]), "finish": finish[b]})
    return res


# Free-running text starts from the document separator alone: the teacher then writes from its own prior over
# text (the pretraining distribution an instruct model keeps), so the student learns more than chat replies.
# A topic word from the seed prompts after it spreads the samples over subjects without steering the style.


def text_seed(tok, topic: str) -> list[int]:
    """Token ids that start one free-running sample: the document separator (bos or eos) and a topic phrase. A model
    whose tokenizer starts every text with BOS (Gemma) starts from BOS: after its <eos> alone Gemma 3 writes garbage."""
    from edgesmith.modelio import bos_prefix

    words = tok(topic.capitalize(), add_special_tokens=False)["input_ids"] if topic else []
    bos = bos_prefix(tok)
    if bos:
        return bos + words
    sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    vocab = tok.get_vocab()
    for name in ("<|endoftext|>", "<eos>", "</s>"):  # a true document separator when the vocabulary has one
        if name in vocab:
            sep = vocab[name]
            break
    return ([sep] if sep is not None else []) + words


@dataclass
class CorpusSpec:
    """What the teacher writes for distillation (part of the cache key: change any field, get a new corpus)."""

    tokens: int = 120_000
    """Stop once the corpus holds this many tokens (prompts included)."""
    text_fraction: float = 0.5
    """Share of batches that are free-running text; the rest are chat answers to the shipped seed prompts."""
    max_new_tokens: int = 256
    """Longest continuation of one prompt or seed."""
    temperature: float = 0.8
    """Sampling temperature (the stored targets are always the temperature-1 distribution)."""
    top_p: float = 0.95
    """Nucleus sampling threshold."""
    topk: int = 64
    """Teacher log-probs kept per position."""
    batch_size: int = 128
    """Sequences sampled together (one forward per new token for the whole batch; larger batches use the CPU better)."""
    seed: int = 0
    """Seed of the prompt order and the sampling."""


def _batch_kind(i: int, text_fraction: float) -> str:
    """Batches interleave evenly: batch i is free text when the running share of text batches grows past i."""
    import math

    return "text" if math.floor((i + 1) * text_fraction) > math.floor(i * text_fraction) else "chat"


def build_teacher_corpus(teacher: str, spec: CorpusSpec, *, bf16: bool | None = None, progress: bool = True) -> Path:
    """Sample the mixed corpus with the teacher's top-k targets into the cache (resumable); returns its directory.

    Layout (numpy; `TopkCache` reads idx/logp/offsets): ids.npy int32 [T] all tokens, id_offsets.npy int64 [E+1],
    idx.npy int32 [R, k], logp.npy float16 [R, k], offsets.npy int64 [E+1] (example e owns rows
    offsets[e]:offsets[e+1], one per token that has a successor), examples.jsonl (kind, n_prompt, finish,
    text per example) and meta.json. Batches land as parts/part-NNNNN.npz first: an interrupted build continues
    with the next batch, and a batch's samples depend only on (seed, batch index).
    """
    import time

    import numpy as np
    import torch

    from edgesmith import modelio
    from edgesmith.config import to_dict
    from edgesmith.fsutil import atomic_dir, atomic_path, cache_dir, model_fingerprint, write_json
    from edgesmith.modelio import bos_prefix

    t_path = modelio.resolve(teacher)
    if bf16 is None:
        from edgesmith.machine import cpu_has_fast_bf16

        bf16 = torch.cuda.is_available() or cpu_has_fast_bf16()
    prompts_hash = hashlib.sha256(json.dumps(seed_prompts()).encode()).hexdigest()[:8]
    parts_of_key = [model_fingerprint(t_path), prompts_hash, to_dict(spec), bool(bf16)]
    if bos_prefix(modelio.load_tokenizer(t_path)):  # seeds start with BOS (text_seed): not the <eos>-seeded corpora
        parts_of_key.append("bos-seeded")
    key = hashlib.sha256(json.dumps(parts_of_key).encode()).hexdigest()[:20]
    dest = cache_dir() / "teacher-corpus" / key
    if (dest / "meta.json").is_file():
        return dest
    parts = dest.with_name(key + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    done = sorted(parts.glob("part-*.npz"))
    have = sum(int(np.load(p)["id_offsets"][-1]) for p in done)

    # bf16 weights where the hardware has bf16 matmuls: 2-3x the tokens/s of fp32 at batch 128-256 on an AVX512-BF16
    # CPU, and the targets move little (KL to the fp32 teacher 0.001 nats, top-1 agreement 98% on Alpaca text)
    model, tok = modelio.load(t_path, dtype="bfloat16" if bf16 else "float32",
                              device="cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    use_gqa_attention(model)  # 1.3-1.7x the tokens/s of SmolLM2 sampling at batch 128 on 2 cores, identical logits
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, list) else [gen_cfg.eos_token_id]
    eos = [e for e in eos if e is not None] or [tok.eos_token_id]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    prompts = seed_prompts()
    order = prompt_order(10 ** 6, len(prompts), spec.seed)
    has_template = bool(getattr(tok, "chat_template", None))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=spec.tokens, initial=min(have, spec.tokens), desc="teacher corpus", unit="tok", dynamic_ncols=True)
    t0 = time.time()
    i = len(done)
    while have < spec.tokens:
        kind = _batch_kind(i, spec.text_fraction) if has_template else "text"
        picks = [prompts[order[(i * spec.batch_size + j) % len(order)]] for j in range(spec.batch_size)]
        if kind == "chat":
            seqs = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=True, add_generation_prompt=True)
                    for p in picks]
        else:
            seqs = [text_seed(tok, p.get("topic", "")) for p in picks]
        tb = time.time()
        res = sample_with_targets(model, seqs, spec.max_new_tokens, k=spec.topk, temperature=spec.temperature,
                                  top_p=spec.top_p, eos_ids=eos if kind == "chat" else [], pad_id=pad,
                                  seed=spec.seed * 1_000_003 + i)
        ids = [r["ids"] for r in res]
        with atomic_path(parts / f"part-{i:05d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, ids=np.concatenate([np.asarray(x, np.int32) for x in ids]),
                     id_offsets=np.cumsum([0] + [len(x) for x in ids]).astype(np.int64),
                     idx=np.concatenate([r["idx"] for r in res]), logp=np.concatenate([r["logp"] for r in res]),
                     offsets=np.cumsum([0] + [len(r["idx"]) for r in res]).astype(np.int64),
                     n_prompt=np.asarray([r["n_prompt"] for r in res], np.int32),
                     finish=np.asarray([r["finish"] == "stop" for r in res]), kind=np.asarray([kind] * len(res)),
                     seconds=np.asarray(time.time() - tb))
        n_new = sum(len(x) for x in ids)
        have += n_new
        i += 1
        if bar:
            bar.update(min(n_new, max(0, spec.tokens - bar.n)))
    if bar:
        bar.close()

    # merge the parts into the final layout
    done = sorted(parts.glob("part-*.npz"))
    loaded = [np.load(p) for p in done]
    ids_all, idx_all, logp_all, id_off, row_off, rows = [], [], [], [0], [0], []
    for z in loaded:
        o, ro = z["id_offsets"], z["offsets"]
        for e in range(len(o) - 1):
            seq = z["ids"][o[e]:o[e + 1]]
            ids_all.append(seq)
            id_off.append(id_off[-1] + len(seq))
            row_off.append(row_off[-1] + int(ro[e + 1] - ro[e]))
            rows.append({"kind": str(z["kind"][e]), "n_prompt": int(z["n_prompt"][e]),
                         "finish": "stop" if bool(z["finish"][e]) else "length",
                         "text": tok.decode(seq.tolist(), skip_special_tokens=False)})
        idx_all.append(z["idx"])
        logp_all.append(z["logp"])
    kinds = [r["kind"] for r in rows]
    with atomic_dir(dest) as tmp:
        np.save(tmp / "ids.npy", np.concatenate(ids_all))
        np.save(tmp / "id_offsets.npy", np.asarray(id_off, np.int64))
        np.save(tmp / "idx.npy", np.concatenate(idx_all))
        np.save(tmp / "logp.npy", np.concatenate(logp_all))
        np.save(tmp / "offsets.npy", np.asarray(row_off, np.int64))
        (tmp / "examples.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        write_json(tmp / "meta.json", {
            "teacher": str(t_path), "spec": to_dict(spec), "bf16": bool(bf16), "examples": len(rows),
            "tokens": int(id_off[-1]), "rows": int(row_off[-1]), "k": spec.topk,
            "mix": {k: {"examples": kinds.count(k), "tokens": int(sum(len(s) for s, kk in zip(ids_all, kinds) if kk == k))}
                    for k in ("chat", "text")},
            "chat_stopped": sum(1 for r in rows if r["kind"] == "chat" and r["finish"] == "stop"),
            # sampling time summed over the batches (an interrupted build's earlier runs included)
            "build_seconds": round(sum(float(z["seconds"]) if "seconds" in z.files else 0.0 for z in loaded), 1),
            "build_seconds_this_run": round(time.time() - t0, 1),
        })
    import shutil

    shutil.rmtree(parts, ignore_errors=True)
    return dest
