"""`edgesmith distill`: teach a student (e.g. a pruned model) to match a teacher's next-token distribution.

Top to bottom: check the two tokenizers share one vocabulary, load the data (any file `edgesmith data`
reads, a prepared split directory, or `teacher:N` = N answers the teacher samples from the shipped seed
prompts), optionally cache the teacher's top-k log-probs on disk, then train the student (in full or
through LoRA) with the shared loop on

    loss = (1 - ce_weight) * T² * D(teacher_T || student_T)  +  ce_weight * CE  +  hidden_weight * H

where D is forward KL (default), reverse KL or Jensen-Shannon at temperature T, and H a cosine/MSE
distance between chosen hidden layers (through a learned projection when widths differ).

Block-wise distillation (optional): student block j stands for the teacher layer it was pruned from; its output
should be the teacher's residual stream just before the teacher's next kept layer (for a dropped span, the block
before the gap learns the teacher's output after the gap). `block_phase` spends the first part of the budget on
that local loss alone, each block fed the teacher's own input (blocks learn independently, errors cannot compound);
`block_weight` mixes it into the end-to-end loss with the student's own inputs. Logits are
computed chunk by chunk over the sequence inside activation checkpoints, so full-vocabulary logits
for the whole batch never sit in memory at once (49k vocab x 512 tokens x 8 = 800 MB in fp32).

The losses are in distill/losses.py, the teacher's top-k cache in distill/topk_cache.py, the teacher corpus in
distill/teacher_data.py; this file is the stage: config, data, memory check, the run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgesmith import processes
from edgesmith.config import to_dict
from edgesmith.errors import ConfigError, EdgesmithError
from edgesmith.trainconfig import TrainConfig

from .losses import LOSSES, BlockTaps, block_map, kept_layers, make_loss_fn
from .teacher_data import CorpusSpec
from .topk_cache import TopkCache, build_topk_cache

HIDDEN_LOSSES = ("cosine", "mse")


# ---------------------------------------------------------------- config


@dataclass
class DistillConfig:
    """Settings of `edgesmith distill`."""

    teacher: str = "default"
    """Teacher model: HF directory, .gguf file or 'default'."""
    student: str = ""
    """Student model (HF directory, e.g. the output of edgesmith prune); must share the teacher's vocabulary."""
    data: str = "teacher:256"
    """teacher (a corpus the teacher writes with its top-k targets kept as it samples: see corpus), teacher:N (N teacher
    answers to the shipped seed prompts, cached), or a data file / prepared split directory."""
    out: str = "out/distill"
    """Output HF directory for the distilled student (plus metrics.jsonl, loss.png, distill.json)."""
    loss: str = "forward_kl"
    """Divergence: forward_kl, reverse_kl or js."""
    temperature: float = 1.0
    """Softmax temperature for teacher and student (the loss is scaled by T² to keep gradient size)."""
    ce_weight: float = 0.0
    """Mix in next-token cross-entropy on the data: loss = (1-w)·KD + w·CE."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state loss (0 disables it)."""
    hidden_loss: str = "cosine"
    """Hidden-state distance: cosine or mse."""
    layer_pairs: list[str] = field(default_factory=list)
    """Hidden-state pairs STUDENT:TEACHER (hidden_states indices, 0 = embeddings), e.g. 15:30 (default: middle and last)."""
    block_weight: float = 0.0
    """Block-wise loss mixed into the end-to-end loss, student-side inputs (0 disables): each student block's output vs
    the teacher's residual stream before the next kept teacher layer, normalised MSE. At the demo's 6-minute budget weight 1
    reached WikiText ppl 81.8 vs 78.8 for plain KD (the teacher's forward costs steps): studies/results/distill-ablation.md."""
    block_phase: float = 0.0
    """Fraction of the training budget (time, or steps without one) spent first on the block-wise loss alone, every
    block fed the teacher's input, before end-to-end KD (0 disables). 0.2 of the demo's 6 minutes: 87.5 vs 78.8 without."""
    chunk_size: int = 128
    """Token positions per logits chunk (bounds the [chunk, vocab] memory)."""
    cache_teacher_topk: int = 0
    """Run the teacher once and cache its top-k log-probs per token on disk (0: run the teacher live)."""
    teacher_dtype: str = "float32"
    """Precision the teacher is held in when it runs during training: float32, or bfloat16 (half the memory; its logits
    and hidden states are compared in float32)."""
    max_length: int = 512
    """Tokens per example / packed block."""
    packing: bool = True
    """Concatenate examples into max_length blocks (no padding waste)."""
    assistant_only: bool = False
    """Distil only on assistant tokens of chat data (default: every token)."""
    lora: bool = False
    """Train the student through LoRA adapters (merged into the saved student) instead of in full."""
    lora_r: int = 16
    """LoRA rank when lora is on."""
    lora_alpha: int = 32
    """LoRA alpha when lora is on."""
    val_fraction: float = 0.05
    """Held-out validation fraction (teacher:N data and single files)."""
    format: str = "auto"
    """Input layout for edgesmith data."""
    teacher_max_new_tokens: int = 192
    """teacher:N: longest answer the teacher samples."""
    teacher_temperature: float = 0.8
    """teacher:N: sampling temperature for the teacher's answers."""
    teacher_batch_size: int = 16
    """teacher:N: prompts generated together."""
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    """data: teacher: what the teacher writes (size in tokens, text/chat mix, top-k kept, sampling); cached and resumable."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, max_steps=200, warmup_steps=10, batch_size=4))
    """Optimiser, schedule and bookkeeping (edgesmith.trainconfig.TrainConfig)."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError("loss", f"expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"expected > 0, got {self.temperature}")
        if not 0 <= self.ce_weight <= 1:
            raise ConfigError("ce_weight", f"expected a weight in [0, 1], got {self.ce_weight}")
        if self.hidden_weight < 0:
            raise ConfigError("hidden_weight", f"expected >= 0, got {self.hidden_weight}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ConfigError("hidden_loss", f"expected one of {', '.join(HIDDEN_LOSSES)}, got {self.hidden_loss!r}")
        for i, p in enumerate(self.layer_pairs):
            a, _, b = str(p).partition(":")
            if not (a.strip().lstrip("-").isdigit() and b.strip().lstrip("-").isdigit()):
                raise ConfigError(f"layer_pairs[{i}]", f"expected STUDENT:TEACHER layer indices like 15:30, got {p!r}")
        if self.block_weight < 0:
            raise ConfigError("block_weight", f"expected >= 0, got {self.block_weight}")
        if not 0 <= self.block_phase < 1:
            raise ConfigError("block_phase", f"expected a fraction in [0, 1), got {self.block_phase}")
        if self.chunk_size < 1:
            raise ConfigError("chunk_size", f"expected >= 1, got {self.chunk_size}")
        if self.cache_teacher_topk < 0:
            raise ConfigError("cache_teacher_topk", f"expected >= 0, got {self.cache_teacher_topk}")
        if self.teacher_dtype not in ("float32", "bfloat16"):
            raise ConfigError("teacher_dtype", f"expected float32 or bfloat16, got {self.teacher_dtype!r}")
        if self.max_length < 8:
            raise ConfigError("max_length", f"expected >= 8, got {self.max_length}")


# ---------------------------------------------------------------- checks and helpers


def check_same_vocab(t_tok, s_tok, teacher: str, student: str) -> None:
    """Logit distillation compares distributions id by id: both tokenizers must map the same strings to the same ids."""
    tv, sv = t_tok.get_vocab(), s_tok.get_vocab()
    if tv == sv:
        return
    diff = sorted(set(tv.items()) ^ set(sv.items()), key=lambda kv: kv[1])[:1]
    example = f"; first difference: {diff[0][0]!r} -> id {diff[0][1]}" if diff else ""
    raise EdgesmithError(
        f"teacher {teacher} ({len(tv)} tokens) and student {student} ({len(sv)} tokens) do not share a vocabulary"
        f"{example}: logit distillation needs the same tokenizer"
    )


def default_layer_pairs(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Middle and last block outputs (hidden_states indices; the last one is after the final norm)."""
    return [(n_student // 2, n_teacher // 2), (n_student, n_teacher)]


def parse_pairs(pairs: list[str], n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    out = []
    for p in pairs:
        a, b = (int(x) for x in str(p).split(":"))
        a = a % (n_student + 1) if a < 0 else a
        b = b % (n_teacher + 1) if b < 0 else b
        if not (0 <= a <= n_student and 0 <= b <= n_teacher):
            raise EdgesmithError(f"layer_pairs: {p} out of range (student has {n_student} layers, teacher {n_teacher}; indices 0..N)")
        out.append((a, b))
    return out


# ---------------------------------------------------------------- the stage


def corpus_examples(corpus: Path, cfg: DistillConfig) -> tuple[list[dict], list[dict], dict]:
    """The teacher corpus as (train, validation) examples, every token a label; `index` is the example's row in the
    corpus' top-k cache. The validation slice is a seeded random val_fraction of the sequences."""
    import random

    import numpy as np

    ids = np.load(corpus / "ids.npy")
    off = np.load(corpus / "id_offsets.npy")
    meta = json.loads((corpus / "meta.json").read_text())
    ex = []
    for e in range(len(off) - 1):
        seq = ids[off[e]:off[e + 1]][: cfg.max_length].tolist()
        ex.append({"input_ids": seq, "labels": list(seq), "index": e})
    order = list(range(len(ex)))
    random.Random(cfg.train.seed).shuffle(order)
    n_val = min(len(ex) - 1, max(1, int(round(cfg.val_fraction * len(ex))))) if cfg.val_fraction > 0 and len(ex) >= 2 else 0
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    info = {"kind": "teacher-corpus", "corpus": str(corpus), "tokens": meta["tokens"], "examples": meta["examples"],
            "mix": meta["mix"], "topk": meta["k"], "bf16_sampling": meta["bf16"],
            "train_tokens": int(sum(len(ex[i]["input_ids"]) for i in train)),
            "validation_tokens": int(sum(len(ex[i]["input_ids"]) for i in val)), "validation_examples": val}
    return [ex[i] for i in train], [ex[i] for i in val], info


def heldout_text(cfg: DistillConfig) -> str:
    """The held-out slice of the training data as plain text (the bench's second perplexity)."""
    if cfg.data == "teacher":
        from .teacher_data import build_teacher_corpus

        corpus = build_teacher_corpus(cfg.teacher, cfg.corpus, progress=False)
        _, val, _ = corpus_examples(corpus, cfg)
        from edgesmith import modelio

        tok = modelio.load_tokenizer(modelio.resolve(cfg.teacher))
        # the text the student saw, without special tokens (chat prompts keep their role lines)
        return "\n\n".join(tok.decode(e["input_ids"], skip_special_tokens=True).strip() for e in val)
    _, val, _ = load_data(cfg)
    return "\n\n".join(m["content"] for r in val for m in r.get("messages", []) if m.get("role") == "assistant")


def load_data(cfg: DistillConfig):
    """(train_records, val_records, description) for cfg.data."""
    from edgesmith.data import load_split_records

    if cfg.data.startswith("teacher:"):
        from .teacher_data import generate_corpus

        try:
            n = int(cfg.data.split(":", 1)[1])
        except ValueError:
            raise EdgesmithError(f"--data {cfg.data}: expected teacher:N with N an integer") from None
        if n < 1:
            raise EdgesmithError(f"--data {cfg.data}: N must be >= 1")
        path = generate_corpus(cfg.teacher, n, max_new_tokens=cfg.teacher_max_new_tokens,
                               temperature=cfg.teacher_temperature, seed=cfg.train.seed,
                               batch_size=cfg.teacher_batch_size)
        tr, va = load_split_records(path, cfg.val_fraction, cfg.train.seed, "messages")
        return tr, va, {"kind": "teacher", "n": n, "corpus": str(path)}
    tr, va = load_split_records(cfg.data, cfg.val_fraction, cfg.train.seed, cfg.format)
    return tr, va, {"kind": "file", "path": cfg.data}


def lora_params(s, r: int) -> int:
    """Trainable parameters of rank-r LoRA on every linear of a Llama-family layer (q, k, v, o, gate, up, down):
    r x (in + out) each; k/v outputs taken as wide as q (an upper bound under GQA). s: memory.ModelShape."""
    D, I = s.hidden, s.intermediate
    return s.layers * r * (4 * 2 * D + 3 * (D + I))


def check_memory_fits(cfg: DistillConfig, t_path: Path, s_path: Path, need_teacher: bool, processes: int = 1,
                      available: int | None = None) -> str:
    """The training's estimated peak (edgesmith.memory.training_memory) of `processes` processes on this machine
    against MemAvailable: one line to print, or an EdgesmithError naming the numbers and what would shrink them. Sharded
    (train.sharding: fsdp), each process holds 1/processes of the student's weights, gradients and AdamW states, and
    the whole student while it is loaded and gathered back at the end (edgesmith.memory.sharded_memory); a teacher
    that runs during training is sharded too (its layers; the embeddings and head stay whole)."""
    from edgesmith.memory import ModelShape, check_memory, sharded_memory, training_memory

    student = ModelShape.of(s_path)
    teacher = ModelShape.of(t_path) if need_teacher else None
    trainable = lora_params(student, cfg.lora_r) if cfg.lora else student.params
    shards = processes if cfg.train.sharding == "fsdp" and processes > 1 else 1
    parts = training_memory(student, trainable, cfg.train.batch_size, cfg.max_length, cfg.chunk_size,
                            cfg.train.grad_checkpointing, teacher, 2 if cfg.teacher_dtype == "bfloat16" else 4,
                            teacher_logits=cfg.data != "teacher" and not cfg.cache_teacher_topk, shards=shards,
                            optimizer=cfg.train.optimizer)
    if shards > 1:
        parts = sharded_memory(parts, student, trainable, checkpoints=cfg.train.save_every > 0,
                               teacher_loaded=teacher.params * (2 if cfg.teacher_dtype == "bfloat16" else 4) if teacher else 0)
    hints = [h for h, on in (("train.grad_checkpointing=true", not cfg.train.grad_checkpointing),
                             ("teacher_dtype=bfloat16", need_teacher and cfg.teacher_dtype != "bfloat16"),
                             ("lora=true", not cfg.lora),
                             # LoRA trains few weights: their moments are small either way
                             ("train.optimizer=adamw8bit", cfg.train.optimizer == "adamw" and not cfg.lora and shards == 1),
                             ("train.sharding=fsdp", processes > 1 and shards == 1)) if on]
    hints += [f"a smaller train.batch_size ({cfg.train.batch_size}) or max_length ({cfg.max_length})"]
    return check_memory("distill", parts, "try " + ", ".join(hints), processes, available, shards)


def run(cfg: DistillConfig) -> Path:
    """Distil cfg.teacher into cfg.student; returns the output HF directory."""
    import torch

    from edgesmith import modelio
    from edgesmith.fsutil import ensure_writable_dir, save_files_into, write_json
    from edgesmith.hfdir import read_hf_config
    from edgesmith.data import encode_split
    from edgesmith.trainconfig import result_dict
    from edgesmith.trainloop import train

    if not cfg.student:
        raise EdgesmithError("distill: no --student given (an HF directory, e.g. the output of edgesmith prune)")
    out = ensure_writable_dir(cfg.out)
    # under `accelerate launch` every process runs this; the main one alone writes the output, and what the processes
    # share through the cache (a materialised GGUF, the teacher's corpus or top-k targets) is built once per machine
    procs = processes.state()
    device = procs.device  # this process's GPU under accelerate launch, else cpu
    with processes.main_first():
        t_path, s_path = modelio.resolve(cfg.teacher), modelio.resolve(cfg.student)
    t_tok, s_tok = modelio.load_tokenizer(t_path), modelio.load_tokenizer(s_path)
    check_same_vocab(t_tok, s_tok, cfg.teacher, cfg.student)
    torch.manual_seed(cfg.train.seed)
    # refuse a run that cannot fit before the teacher writes a corpus or anything is loaded
    use_blocks = cfg.block_weight > 0 or cfg.block_phase > 0
    need_teacher = cfg.data != "teacher" or cfg.hidden_weight > 0 or use_blocks
    if device.type == "cpu":
        line = check_memory_fits(cfg, t_path, s_path, need_teacher, procs.num_processes)
        if procs.is_main_process:
            print(f"distill: {line}")
    pad_id = s_tok.pad_token_id if s_tok.pad_token_id is not None else s_tok.eos_token_id
    cache = None
    if cfg.data == "teacher":
        # the teacher writes the corpus and its top-k targets in one pass; training reads both from disk
        import time

        from .teacher_data import build_teacher_corpus

        t0 = time.time()
        with processes.main_first():
            corpus = build_teacher_corpus(cfg.teacher, cfg.corpus)
        train_ex, val_ex, data_info = corpus_examples(corpus, cfg)
        data_info["seconds"] = round(time.time() - t0, 1)
        cache = TopkCache(corpus)
        tr_counts = {"records": len(train_ex), "tokens": data_info["train_tokens"], "truncated": 0}
        va_counts = {"records": len(val_ex), "tokens": data_info["validation_tokens"]}
        print(f"distill: teacher corpus {data_info['tokens']} tokens ({data_info['mix']['text']['tokens']} free text, "
              f"{data_info['mix']['chat']['tokens']} chat), {len(train_ex)} train / {len(val_ex)} validation sequences")
    else:
        with processes.main_first():  # teacher:N samples its answers once
            train_recs, val_recs, data_info = load_data(cfg)
        train_ex, tr_counts, val_ex, va_counts = encode_split(train_recs, val_recs, s_tok, cfg.max_length, cfg.packing,
                                                              cfg.assistant_only)
        print(f"distill: {len(train_ex)} train / {len(val_ex)} validation examples ({tr_counts['tokens']} train tokens, "
              f"{tr_counts['truncated']} truncated to {cfg.max_length})")

    # the teacher stays out of memory when the cache holds every target the loss needs
    teacher = (modelio.load_model(t_path, dtype=cfg.teacher_dtype, device=str(device)).eval().requires_grad_(False)
               if need_teacher else None)
    if cfg.cache_teacher_topk and cache is None:
        from edgesmith.fsutil import model_fingerprint

        key = hashlib.sha256(json.dumps([model_fingerprint(t_path), cfg.cache_teacher_topk,
                                         [e["input_ids"] for e in train_ex], [e["labels"] for e in train_ex]]).encode()).hexdigest()[:20]
        with processes.main_first():
            cache = TopkCache(build_topk_cache(teacher, train_ex, cfg.cache_teacher_topk, key, pad_id))
    if teacher is not None and cfg.train.sharding == "fsdp" and procs.num_processes > 1:
        # sharded like the student, before the student is loaded: each process keeps 1/N of the teacher's layers
        from edgesmith.sharding import shard_frozen

        held, total = shard_frozen(teacher, device)
        print(f"distill: sharding fsdp: process {procs.process_index} of {procs.num_processes} holds {held} of the "
              f"teacher's {total} weights")
    student = modelio.load_model(s_path, dtype="float32")
    if teacher is not None and teacher.get_output_embeddings().weight.shape[0] != student.get_output_embeddings().weight.shape[0]:
        raise EdgesmithError(f"teacher and student output layers differ in vocabulary size "
                             f"({teacher.get_output_embeddings().weight.shape[0]} vs {student.get_output_embeddings().weight.shape[0]})")

    n_s = student.config.num_hidden_layers
    n_t = read_hf_config(t_path).get("num_hidden_layers", n_s)
    pairs = parse_pairs(cfg.layer_pairs, n_s, n_t) if cfg.layer_pairs else default_layer_pairs(n_s, n_t)
    extra, proj = {}, None
    if cfg.hidden_weight > 0:
        hs, ht = student.config.hidden_size, teacher.config.hidden_size  # hidden_weight > 0: the teacher is loaded
        # a learned projection only where widths differ (hidden-size pruning); identity otherwise
        proj = torch.nn.ModuleList([torch.nn.Linear(hs, ht, bias=False) if hs != ht else torch.nn.Identity() for _ in pairs])
        if hs != ht:
            extra["hidden_proj"] = proj

    from edgesmith.trainconfig import apply_masks, sparsity_masks

    masks = sparsity_masks(student, s_path)  # prune --sparsity: the zero pattern survives recovery
    if masks:
        print(f"distill: keeping the student's sparsity pattern ({sum(int((~m).sum()) for m in masks.values())} zero weights)")
    if cfg.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        from edgesmith.finetune.lora import DEFAULT_TARGETS

        student = get_peft_model(student, LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=0.0, target_modules=DEFAULT_TARGETS))
    else:
        student.requires_grad_(True)

    blocks, block_info = None, None
    if use_blocks:
        if cfg.lora:
            raise ConfigError("block_phase" if cfg.block_phase else "block_weight", "block-wise distillation trains whole blocks: not with lora")
        if student.config.hidden_size != teacher.config.hidden_size:
            raise ConfigError("block_phase" if cfg.block_phase else "block_weight",
                              f"block-wise distillation compares residual streams: the student's hidden size "
                              f"({student.config.hidden_size}) must equal the teacher's ({teacher.config.hidden_size})")
        kept, how = kept_layers(s_path, n_s, n_t)
        bmap = block_map(kept, n_t)
        blocks = (bmap, BlockTaps(student), BlockTaps(teacher))
        block_info = {"kept_layers": kept, "from": how, "weight": cfg.block_weight, "phase": cfg.block_phase}
        print(f"distill: block-wise targets from {how}: student block j reads teacher stream kept[j], writes the stream "
              f"before the next kept layer ({sum(1 for a, b in bmap if b - a > 1)} blocks stand for a dropped span)")

    loss_fn = make_loss_fn(teacher, cfg, pairs, proj, cache, blocks)
    # validation: the teacher corpus' cache covers its held-out sequences too; build_topk_cache covers training only
    val_loss_fn = make_loss_fn(teacher, cfg, pairs, proj, None) if cache is not None and cfg.data != "teacher" else None
    res = train(student, train_ex, loss_fn, cfg.train, out, pad_id=pad_id, val_examples=val_ex or None,
                extra_modules=extra, val_loss_fn=val_loss_fn, masks=None if cfg.lora else masks,
                run_info={"stage": "distill", "teacher": str(t_path), "student": str(s_path)})
    if blocks is not None:
        for taps in blocks[1:]:
            taps.close()

    def write_outputs() -> None:  # the main process only: the others wait in main_writes
        nonlocal student
        student.eval()
        if cfg.lora:
            student = student.merge_and_unload()
            if masks:  # the merged adapters filled the zeros: the pattern is the student's, so it comes back
                apply_masks(student, masks)
        student.config._name_or_path = f"{modelio.model_name(s_path)}-distilled"

        def write(tmp: Path) -> None:
            student.save_pretrained(str(tmp), safe_serialization=True)
            s_tok.save_pretrained(str(tmp))
            (tmp / "edgesmith.json").write_text(json.dumps({"name": f"{modelio.model_name(s_path)}-distilled",
                                                            "source": str(s_path), "teacher": str(t_path),
                                                            "license": modelio.model_license(s_path)}, indent=2))

        save_files_into(out, write, ".model-tmp")
        write_json(out / "distill.json", {
            "stage": "distill", "teacher": str(t_path), "student": str(s_path), "data": data_info,
            "examples": {"train": len(train_ex), "validation": len(val_ex), "train_counts": tr_counts, "validation_counts": va_counts},
            "layer_pairs": [f"{a}:{b}" for a, b in pairs] if cfg.hidden_weight > 0 else [],
            "blockwise": block_info,
            "sparsity_kept": bool(masks),
            "teacher_topk_cache": (cfg.corpus.topk if cfg.data == "teacher" else cfg.cache_teacher_topk) or None,
            # how much of the corpus training saw: epochs > 1 means tokens were repeated
            "epochs": round(res.tokens / max(1, tr_counts["tokens"]), 3),
            "train_tokens_per_s": round(res.tokens / max(res.seconds, 1e-9), 1),
            "result": result_dict(res), "config": to_dict(cfg),
        })

    processes.main_writes(write_outputs)
    return out
