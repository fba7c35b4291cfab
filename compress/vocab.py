"""`edgesmith trim-vocab MODEL --corpus FILE --out DIR`: drop the vocabulary a deployment never uses.

In a small model the token table is where the size is: 63% of Gemma 3 270M's parameters are its 262,144 x 640
embedding, which is also the output projection of every decoded token. A device that only ever sees one language or
domain needs a fraction of those rows. This stage keeps the tokens a corpus uses and removes the rest from the
tokenizer, the embedding and an untied lm_head, renumbering ids in their original order.

Why tokenisation stays exact. BPE (byte-level, or SentencePiece-BPE as llama.cpp and our rebuilt tokenizer run it)
builds each output token from characters by repeatedly joining the adjacent pair with the best-ranked merge. We keep,
for every token the corpus uses, every symbol BPE passes through on the way to it (`bpe_path`), and only the merges
whose two parts and result are all kept.
For a text whose original tokens are all kept, every merge the original tokeniser applied is still there and still
the best-ranked available one (the candidates are a subset of the original's), so the trimmed tokeniser applies the
same merges in the same order: the same tokens, renumbered. This holds for every text built from kept tokens, not
only the corpus. Any other text still tokenises: byte-fallback tokens (SentencePiece) or the byte alphabet
(byte-level BPE) are always kept, so a word outside the domain is spelt with shorter pieces instead. The stage checks
both claims on what it wrote: the corpus tokenises to the renumbered original ids, and probe texts outside it decode
back to themselves.

What the model loses: the removed rows. On text in the kept domain, the trimmed model's logits equal the original's
restricted to the kept ids (checked on a corpus sample); its probabilities are renormalised over the kept tokens,
which can only lower perplexity on such text.

Special tokens kept: BOS/EOS/PAD/UNK and every token the tokenizer config names, the generation config's EOS ids,
every added token the chat template mentions or the corpus uses, and all non-special added tokens (whitespace and
newline runs: matched whole before merging, they are cheap and keep layout exact). Gemma's 6,000 `<unusedN>` and
image tokens go.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from edgesmith.config import add_config_args, config_from_args, to_dict
from edgesmith.errors import EdgesmithError
from edgesmith.fsutil import atomic_dir, write_json

from .checkpoint import checkpoint_dtype

REPORT = "trim_report.json"
BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")
# tokenizer files rewritten here; any other vocabulary file (vocab.json, merges.txt of a slow tokenizer) would describe
# the old ids, so it is not carried over (the fast tokenizer loads from tokenizer.json alone)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
STALE_VOCAB_FILES = ("vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")
# texts outside any corpus domain: after trimming they must still tokenise and decode back to themselves
OUT_OF_DOMAIN = (
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "日本語のテキストと中文，한국어 문장, हिन्दी, العربية",
    "emoji 🤖🚀, rare ☃ ⸘ 𝔹, code: x = {k: v for k, v in d.items()}  # done",
    "qwertzuiop asdfghjkl yxcvbnm 0x1F3A 3.14159e-10",
)


@dataclass
class TrimConfig:
    """Settings of `edgesmith trim-vocab` (a recipe file holds these keys)."""

    model: str = "default"
    """Model whose vocabulary is trimmed: HF directory, .gguf file or 'default'."""
    out: str = "out/trim"
    """Output directory (an HF checkpoint + trim_report.json); replaced atomically."""
    corpus: list[str] = field(default_factory=list)
    """Text the trimmed model must tokenise exactly as the original (.txt/.jsonl/.json, any `edgesmith data` layout;
    chat rows go through the chat template). Every token it uses is kept, with every token inside one."""


# ---------------------------------------------------------------- which ids stay


def merge_ranks(tj: dict) -> dict[tuple[str, str], int]:
    """tokenizer.json's merges as (left, right) -> rank (lower merges first)."""
    return {tuple(mg if isinstance(mg, list) else mg.split(" ", 1)): r for r, mg in enumerate(tj["model"]["merges"])}


def bpe_path(token: str, ranks: dict[tuple[str, str], int]) -> set[str]:
    """Every symbol BPE passes through when it builds `token` from its characters: repeatedly join the adjacent pair
    with the lowest merge rank (leftmost on ties), as tokenizers' BPE and llama.cpp's SentencePiece tokeniser do.
    Inside a longer text the merges within one output token happen in this same order (a merge across its boundary
    would have fused it with a neighbour), so these are all the symbols that token ever needs."""
    syms = list(token)
    seen = set(syms)
    while len(syms) > 1:
        best = min(((ranks.get((a, b)), k) for k, (a, b) in enumerate(zip(syms, syms[1:])) if (a, b) in ranks),
                   default=None)
        if best is None:
            break
        k = best[1]
        syms[k:k + 2] = [syms[k] + syms[k + 1]]
        seen.add(syms[k])
    return seen


def path_closure(vocab: dict[str, int], ranks: dict[tuple[str, str], int], ids) -> set[int]:
    """`ids` plus every vocabulary token on the BPE path to one of them (`bpe_path`). The set is closed: the path to
    a symbol on a path is part of that path. vocab: token text -> id (tokenizer.json's model.vocab)."""
    text = {i: t for t, i in vocab.items()}
    keep = set()
    for i in ids:
        t = text.get(i)
        if t is None:  # an added token outside the BPE vocabulary: matched whole, never merged
            keep.add(i)
            continue
        keep.update(vocab[s] for s in bpe_path(t, ranks) if s in vocab)
        keep.add(i)
    return keep


def always_kept(tj: dict, tok_cfg: dict, model_cfg: dict, gen_cfg: dict, chat_template: str | None) -> set[int]:
    """Ids kept whatever the corpus: what makes any text tokenise (byte fallback or the byte alphabet), the special
    tokens the model's configs name, the added tokens the chat template mentions, and non-special added tokens."""
    vocab = tj["model"]["vocab"]
    if tj["model"].get("byte_fallback"):
        keep = {i for t, i in vocab.items() if BYTE_TOKEN.match(t)}
    else:  # byte-level BPE: single symbols are the alphabet every word is spelt in
        keep = {i for t, i in vocab.items() if len(t) == 1}
    named = [tok_cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")]
    extra = tok_cfg.get("extra_special_tokens") or {}
    named += list(tok_cfg.get("additional_special_tokens") or []) + list(extra.values() if isinstance(extra, dict) else extra)
    named = {v.get("content") if isinstance(v, dict) else v for v in named}
    for tok in tj.get("added_tokens", []):
        if not tok.get("special") or tok["content"] in named or (chat_template and tok["content"] in chat_template):
            keep.add(tok["id"])
    for cfg in (model_cfg, gen_cfg):
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            v = cfg.get(k)
            keep.update(x for x in (v if isinstance(v, list) else [v]) if isinstance(x, int))
    unk = tj["model"].get("unk_token")
    if unk in vocab:
        keep.add(vocab[unk])
    return keep


# ---------------------------------------------------------------- rewriting the tokenizer files


def _remap_ids(obj, new_id: dict[int, int]):
    """TemplateProcessing's special_tokens (and Sequence processors holding one): old ids -> new ids."""
    if isinstance(obj, dict):
        if obj.get("type") == "TemplateProcessing":
            for spec in obj.get("special_tokens", {}).values():
                spec["ids"] = [new_id[i] for i in spec["ids"]]
        elif obj.get("type") in ("RobertaProcessing", "BertProcessing"):
            for k in ("sep", "cls"):
                name, i = obj[k]
                obj[k] = [name, new_id[i]]
        for v in obj.values():
            if isinstance(v, (dict, list)):
                _remap_ids(v, new_id)
    elif isinstance(obj, list):
        for v in obj:
            _remap_ids(v, new_id)


def trim_tokenizer_json(tj: dict, new_id: dict[int, int]) -> dict:
    """tokenizer.json with only the kept ids (old id -> new id): vocabulary, merges whose parts and result are all
    kept (in their original order, so ranks keep their relative order), added tokens, post-processor ids."""
    out = json.loads(json.dumps(tj))
    m = out["model"]
    old_vocab = m["vocab"]
    m["vocab"] = {t: new_id[i] for t, i in sorted(old_vocab.items(), key=lambda kv: kv[1]) if i in new_id}
    kept = m["vocab"]
    merges = []
    for mg in m["merges"]:
        a, b = mg if isinstance(mg, list) else mg.split(" ", 1)
        if a in kept and b in kept and a + b in kept:
            merges.append(mg)
    m["merges"] = merges
    out["added_tokens"] = [{**t, "id": new_id[t["id"]]} for t in out.get("added_tokens", []) if t["id"] in new_id]
    _remap_ids(out.get("post_processor"), new_id)
    return out


def trim_tokenizer_config(tc: dict, new_id: dict[int, int]) -> dict:
    out = dict(tc)
    if "added_tokens_decoder" in out:
        out["added_tokens_decoder"] = {str(new_id[int(i)]): v for i, v in tc["added_tokens_decoder"].items()
                                       if int(i) in new_id}
    return out


def trim_sentencepiece(data: bytes, keep: list[int], new_id: dict[int, int], where: Path) -> bytes:
    """tokenizer.model (sentencepiece's ModelProto, what llama.cpp's Gemma/Llama converters read the vocabulary
    from) with only the kept pieces, in the same order as the trimmed tokenizer.json."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    m = sp_pb2.ModelProto()
    m.ParseFromString(data)
    if len(m.pieces) <= max(keep):
        raise EdgesmithError(f"{where}: has {len(m.pieces)} pieces but tokenizer.json uses id {max(keep)}; "
                             "the two vocabularies disagree")
    pieces = [m.pieces[i] for i in keep]
    out = sp_pb2.ModelProto()
    out.CopyFrom(m)
    del out.pieces[:]
    for p in pieces:
        out.pieces.add().CopyFrom(p)
    ts = out.trainer_spec
    ts.vocab_size = len(keep)
    for k in ("unk_id", "bos_id", "eos_id", "pad_id"):
        v = getattr(ts, k)
        if v >= 0:
            setattr(ts, k, new_id.get(v, -1))
    return out.SerializeToString()


def _remap_config_ids(cfg: dict, new_id: dict[int, int]) -> dict:
    out = dict(cfg)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id"):
        v = out.get(k)
        if isinstance(v, int):
            out[k] = new_id[v]
        elif isinstance(v, list):
            out[k] = [new_id[x] for x in v]
    return out


# ---------------------------------------------------------------- the model


def trim_embeddings_(model, keep: list[int]) -> None:
    """Keep rows `keep` of the input embedding and of an untied lm_head, in place."""
    import torch

    idx = torch.tensor(keep, dtype=torch.long)
    emb = model.get_input_embeddings()
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb.weight
    old = emb.num_embeddings
    emb.weight = torch.nn.Parameter(emb.weight.data.index_select(0, idx).clone(), requires_grad=False)
    emb.num_embeddings = len(keep)
    if emb.padding_idx is not None:
        emb.padding_idx = keep.index(emb.padding_idx) if emb.padding_idx in keep else None
    head = model.get_output_embeddings()
    model.config.vocab_size = len(keep)
    if head is not None and not tied and head.weight.shape[0] == old:
        head.weight = torch.nn.Parameter(head.weight.data.index_select(0, idx).clone(), requires_grad=False)
        head.out_features = len(keep)
        if getattr(head, "bias", None) is not None:
            head.bias = torch.nn.Parameter(head.bias.data.index_select(0, idx).clone(), requires_grad=False)
    elif tied:
        model.tie_weights()


# ---------------------------------------------------------------- the stage


def corpus_texts(paths: list[str], tok) -> list[str]:
    from edgesmith.data import read_records, render

    texts = []
    for p in paths:
        records, _ = read_records(p)
        texts += [render(r, tok) for r in records]
    return texts


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False)["input_ids"]


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def run(cfg: TrimConfig, quiet: bool = False) -> Path:
    """Trim `cfg.model`'s vocabulary to what `cfg.corpus` needs, into `cfg.out`; returns the output directory."""
    import torch

    from edgesmith.facts import facts, width_warnings
    from edgesmith.hfdir import read_hf_config
    from edgesmith.modelio import load_model, load_tokenizer, model_license, model_name, resolve, tokenizer_from_dir

    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if not cfg.corpus:
        raise EdgesmithError("corpus: give the text the trimmed model must handle (--corpus FILE, repeatable)")
    out, src = Path(cfg.out), resolve(cfg.model)
    if not (src / "tokenizer.json").is_file():
        raise EdgesmithError(f"{src}: no tokenizer.json (vocabulary trimming rewrites a fast tokenizer's file)")
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    if tj.get("model", {}).get("type") != "BPE":
        raise EdgesmithError(f"{src}/tokenizer.json: model.type {tj.get('model', {}).get('type')!r}: vocabulary trimming "
                             "supports BPE tokenizers (byte-level or SentencePiece-BPE)")
    if tj["model"].get("continuing_subword_prefix") or tj["model"].get("end_of_word_suffix"):
        raise EdgesmithError(f"{src}/tokenizer.json: a BPE with subword prefixes/suffixes (merged text is not the two "
                             "parts joined) cannot be trimmed exactly")
    tok = load_tokenizer(cfg.model)
    tok_cfg, gen_cfg, model_cfg = (_read_json(src / f) for f in ("tokenizer_config.json", "generation_config.json", "config.json"))

    # -- which ids stay
    texts = corpus_texts(cfg.corpus, tok)
    orig_ids = _ids(tok, texts)
    counts = Counter(i for ids in orig_ids for i in ids)
    base = always_kept(tj, tok_cfg, model_cfg, gen_cfg, getattr(tok, "chat_template", None))
    keep = sorted(path_closure(tj["model"]["vocab"], merge_ranks(tj), counts) | base)
    new_id = {old: new for new, old in enumerate(keep)}
    vocab_before = int(model_cfg.get("vocab_size") or len(tok))
    say(f"trim-vocab: corpus {len(texts)} texts, {sum(counts.values())} tokens, {len(counts)} distinct; "
        f"keeping {len(keep)} of {vocab_before} ids ({len(base)} always kept)")

    # -- the model: rows gathered in the checkpoint's own dtype
    dtype_name = checkpoint_dtype(read_hf_config(src))
    model = load_model(cfg.model, dtype=dtype_name)
    params_before = sum(p.numel() for p in model.parameters())
    sample = [ids for ids in orig_ids if ids][:4]
    with torch.no_grad():
        ref = [model(torch.tensor([ids[:128]])).logits[0].float() for ids in sample]
    trim_embeddings_(model, keep)
    model.config.update(_remap_config_ids({k: getattr(model.config, k, None) for k in
                                           ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}, new_id))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        for k, v in _remap_config_ids({k: getattr(gen, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                                          "decoder_start_token_id")}, new_id).items():
            setattr(gen, k, v)
    params_after = sum(p.numel() for p in model.parameters())

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in src.iterdir():  # chat templates, licence, README: everything that is not weights or vocabulary
            if f.is_file() and f.name not in TOKENIZER_FILES + STALE_VOCAB_FILES + (REPORT, "edgesmith.json") \
                    and not (tmp / f.name).exists() and not f.name.startswith(("model", "pytorch_model")):
                shutil.copy(f, tmp / f.name)
        write_json(tmp / "tokenizer.json", trim_tokenizer_json(tj, new_id))
        if (src / "tokenizer_config.json").is_file():
            write_json(tmp / "tokenizer_config.json", trim_tokenizer_config(tok_cfg, new_id))
        if (src / "special_tokens_map.json").is_file():
            shutil.copy(src / "special_tokens_map.json", tmp / "special_tokens_map.json")
        if (src / "tokenizer.model").is_file():
            (tmp / "tokenizer.model").write_bytes(trim_sentencepiece((src / "tokenizer.model").read_bytes(), keep, new_id,
                                                                     src / "tokenizer.model"))
        (tmp / "edgesmith.json").write_text(json.dumps({
            "name": f"{model_name(cfg.model)}-trimmed", "source": str(src), "stage": "trim-vocab",
            "license": model_license(src), "note": "vocabulary trimmed by edgesmith; see trim_report.json",
        }, indent=2))

        # -- prove it on what was written: tokenizer, logits, out-of-domain texts
        new_tok = tokenizer_from_dir(tmp)
        got = _ids(new_tok, texts)
        mismatched = sum(g != [new_id[i] for i in o] for g, o in zip(got, orig_ids))
        if mismatched:
            raise EdgesmithError(f"{src}: the trimmed tokenizer splits {mismatched} of {len(texts)} corpus texts differently "
                                 "from the original (a tokenizer this stage cannot trim exactly)")
        ood = []
        for text in OUT_OF_DOMAIN:
            ids_ = _ids(new_tok, [text])[0]
            back = new_tok.decode(ids_)
            ood.append({"text": text, "tokens_before": len(_ids(tok, [text])[0]), "tokens_after": len(ids_),
                        "decodes_back": back == tok.decode(_ids(tok, [text])[0])})
        if not all(o["decodes_back"] for o in ood):
            bad = next(o["text"] for o in ood if not o["decodes_back"])
            raise EdgesmithError(f"{src}: after trimming, {bad!r} no longer decodes back to itself")
        idx = torch.tensor(keep)
        with torch.no_grad():
            diff = max((model(torch.tensor([[new_id[i] for i in ids[:128]]])).logits[0].float() - r[:, idx]).abs().max().item()
                       for ids, r in zip(sample, ref))
        report = {
            "model": cfg.model, "source_dir": str(src), "out": str(out), "config": to_dict(cfg),
            "vocab": {"before": vocab_before, "after": len(keep), "always_kept": len(base),
                      "used_by_corpus": len(counts), "added_on_bpe_paths": len(keep) - len(set(counts) | base)},
            "params": {"before": params_before, "after": params_after},
            "corpus": {"files": list(cfg.corpus), "texts": len(texts), "tokens": sum(counts.values())},
            "checks": {"corpus_tokenisation_equal": True, "texts_checked": len(texts),
                       "logits_max_abs_diff_vs_original_kept_columns": diff, "out_of_domain": ood},
            "old_ids": keep,  # new id i was old id old_ids[i]
        }
        report["width_warnings"] = width_warnings(facts(tmp))
        report["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(tmp / REPORT, report)
    say(f"trim-vocab: {vocab_before} -> {len(keep)} tokens, {params_before / 1e6:.1f}M -> {params_after / 1e6:.1f}M "
        f"parameters; corpus tokenisation identical ({len(texts)} texts); logits on kept ids within {diff:.2e}; {out}")
    return out


def cmd_trim(args) -> int:
    run(config_from_args(TrimConfig, args, given={"model": args.model, "out": args.out, "corpus": args.corpus or None}))
    return 0


def register(sub) -> None:
    p = sub.add_parser("trim-vocab", help="keep only the vocabulary a corpus needs (smaller embedding, faster output layer)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="HF model directory, .gguf file or 'default' (default: from the recipe, else 'default')")
    p.add_argument("--out", default=None, help="output directory (default: from the recipe, else out/trim)")
    p.add_argument("--corpus", action="append", default=None, metavar="FILE",
                   help="text the trimmed model must tokenise exactly as the original (repeatable)")
    add_config_args(p, TrimConfig, skip=("model", "out", "corpus"))
    p.set_defaults(func=cmd_trim)
