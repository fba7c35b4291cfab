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
    from edgesmith.fsutil import cache_dir

    from .distill import model_fingerprint

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
    tok.padding_side = "left"  # batched generation: prompts end at the same position
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
        texts = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False, add_generation_prompt=True)
                 for p in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        torch.manual_seed(seed * 1_000_003 + start)  # each batch reproducible on its own (resumable)
        with torch.inference_mode():
            seq = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
        for p, s in zip(batch, seq[:, enc["input_ids"].shape[1]:].tolist()):
            finish = "stop" if any(t in eos for t in s) else "length"
            cut = next((j for j, t in enumerate(s) if t in eos), len(s))
            answer = tok.decode(s[:cut], skip_special_tokens=True).strip()
            rows.append({"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": answer}],
                         "topic": p.get("topic", ""), "finish": finish})
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
