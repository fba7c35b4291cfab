"""GGUF -> Hugging Face directory, materialised once into the cache and reused.

fp32 safetensors (transformers' GGUF dequantisation), a faithful byte-level BPE tokenizer rebuilt from
the GGUF's tokens/merges with the pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre`, the
chat template and a generation config. The tokenizer transformers itself derives from such a GGUF saves
as a SentencePiece-style Llama tokenizer whose files mislead llama.cpp's converter, so it is never used
for BPE GGUFs. SentencePiece GGUFs (Gemma 3, Llama 2) get a BPE-with-byte-fallback tokenizer rebuilt from their
tokens, scores and types (transformers builds a Unigram model for them, which splits text differently), plus a
`tokenizer.model` for llama.cpp's converter; it is checked against llama.cpp's tokeniser before it is used.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import EdgesmithError
from .fsutil import atomic_dir, cache_dir, quick_fingerprint
from .gguf_check import SUPPORTED_GGUF_ARCHS


def _pre_tokenizer_for(pre: str):
    """The HF pre-tokenizer that reproduces llama.cpp's pre-tokenizer type `pre` (llama-vocab.cpp)."""
    from tokenizers import Regex, pre_tokenizers

    gpt2_regex = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # digits split one by one, then GPT-2's regex
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    if pre in ("gpt-2", "gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        rx = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    elif pre == "qwen2":
        rx = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    else:
        raise EdgesmithError(
            f"GGUF pre-tokenizer {pre!r} is not supported for conversion to Hugging Face "
            "(supported: smollm, gpt-2, llama-bpe, qwen2)"
        )
    del gpt2_regex
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def tokenizer_from_gguf(path: str | os.PathLike):
    """Rebuild a GPT-2-style byte-level BPE tokenizer (tokenizers library) from a GGUF's vocab.

    Returns a transformers PreTrainedTokenizerFast with the GGUF's special tokens, add_bos
    behaviour and chat template. Only for `tokenizer.ggml.model == "gpt2"` files.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    from .gguf_read import metadata

    f = metadata(path)
    model = f["tokenizer.ggml.model"]
    if model != "gpt2":
        raise EdgesmithError(f"{path}: tokenizer model {model!r} is not byte-level BPE")
    tokens = f["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
    types = f["tokenizer.ggml.token_type"] if "tokenizer.ggml.token_type" in f else [1] * len(tokens)
    pre = f["tokenizer.ggml.pre"] if "tokenizer.ggml.pre" in f else "default"
    val = f.get

    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = _pre_tokenizer_for(pre)
    tk.decoder = decoders.ByteLevel()
    # token types: 3 = control (special), 4 = user-defined (added, not special)
    added = [AddedToken(tokens[i], special=(types[i] == 3), normalized=False) for i in range(len(tokens)) if types[i] in (3, 4)]
    tk.add_tokens(added)

    def tok(key):
        i = val(key)
        return tokens[i] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, unk, pad = (tok(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding"))
    add_bos = bool(val("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    ctx = val(f"{val('general.architecture', 'llama')}.context_length", 2048)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        model_max_length=int(ctx),
        clean_up_tokenization_spaces=False,
        add_bos_token=add_bos,
    )
    tmpl = val("tokenizer.chat_template")
    if tmpl:
        hf.chat_template = tmpl
    return hf


# ---------------------------------------------------------------- SentencePiece GGUFs (tokenizer.ggml.model == "llama")

# GGUF / SentencePiece token types (the same numbers in both): normal, unknown, control, user-defined, unused, byte
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# probe texts for the llama.cpp check of a rebuilt SentencePiece tokenizer (with the shipped seed prompts)
_PROBE_TEXTS = [
    "The capital of France is", " leading space", "two  spaces,   three and\ttab\t\ttabs", "line\nbreak\n\n\nthree",
    "  indented\n    code = f(x) + 1  # comment", "Numbers: 3.14159, 2026-12-01, 1,000,000 and 0x1F.",
    "naïve café, Straße, ŝ, Ωμέγα, русский текст, 日本語のテキスト, 中文, 한국어, हिन्दी, العربية",
    "emoji 🤖🚀 and rare ☃ ⸘ 𝔹 \u0000 \u200b zero-width", "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk> [multimodal] <mask>", "@@ -1,3 +1,4 @@ def main():\r\n    return 0", " = Valkyria Chronicles III = ",
]


def _spm_fields(f: dict) -> tuple[list[str], list[float], list[int]]:
    tokens = f["tokenizer.ggml.tokens"]
    scores = f.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = f.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    return tokens, [float(x) for x in scores], [int(t) for t in types]


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges that reproduce llama.cpp's SentencePiece tokeniser (llm_tokenizer_spm): it repeatedly joins the
    adjacent pair whose joined text is a vocabulary token with the highest score (leftmost on ties). Every split of
    every token into two vocabulary tokens is a merge, ranked by the joined token's score. Control and
    user-defined tokens are matched whole before merging (llama.cpp and HF alike), so they get no merges."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, t in enumerate(tokens):
        if types[i] in (_CONTROL, _USER_DEFINED) or len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                merges.append((-scores[i], i, vocab[a], a, b))
    merges.sort()
    return [(a, b) for *_, a, b in merges]


def spm_tokenizer_from_gguf(path: str | os.PathLike, vocab_file: str | os.PathLike | None = None):
    """Rebuild a SentencePiece(-BPE) GGUF's tokenizer (`tokenizer.ggml.model == "llama"`: Llama 2, Gemma, ...) as a
    tokenizers BPE with byte fallback that tokenises like llama.cpp: merges from the scores (`_spm_merges`), spaces
    escaped to `▁`, a `▁` prefixed to every text fragment only when the GGUF says add_space_prefix (Gemma 3: no),
    control tokens special and user-defined tokens (whitespace runs, newlines) matched whole, BOS as the GGUF says.
    transformers' own GGUF conversion builds a Unigram model from these files instead, which tokenises Gemma 3 text
    into about twice as many pieces. With `vocab_file` (the `tokenizer.model` written by write_sentencepiece_model)
    the tokenizer is a Gemma/Llama fast tokenizer that saves that file next to tokenizer.json, so every stage
    directory (prune, distill, merge) keeps what llama.cpp's converter reads the vocabulary from."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GemmaTokenizerFast, LlamaTokenizerFast, PreTrainedTokenizerFast

    from .gguf_read import metadata

    f = metadata(path)
    if f.get("tokenizer.ggml.model") != "llama":
        raise EdgesmithError(f"{path}: tokenizer model {f.get('tokenizer.ggml.model')!r} is not SentencePiece")
    tokens, scores, types = _spm_fields(f)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise EdgesmithError(f"{path}: the SentencePiece vocabulary has duplicate tokens")
    byte_fallback = all(f"<0x{b:02X}>" in vocab for b in range(256))
    unk_id = f.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    tk = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), dropout=None, unk_token=unk,
                              fuse_unk=True, byte_fallback=byte_fallback))
    prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp prefixes a space to every raw-text fragment after a special token when add_space_prefix: "always"
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always" if prefix else "never",
                                                split=False)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(dec)
    tk.add_tokens([AddedToken(tokens[i], special=(types[i] == _CONTROL), normalized=False)
                   for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)])

    def tok(key):
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos, pad = tok("bos"), tok("eos"), tok("padding")
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", True))
    add_eos = bool(f.get("tokenizer.ggml.add_eos_token", False))
    single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
    pair = single + ([f"{bos}:1"] if add_bos and bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos and eos else [])
    tk.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair),
        special_tokens=[(t, vocab[t]) for t in dict.fromkeys(x for x in (bos if add_bos else None, eos if add_eos else None) if x)])
    arch = f.get("general.architecture", "llama")
    ctx = f.get(f"{arch}.context_length", 2048)
    kw = dict(tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad, model_max_length=int(ctx),
              clean_up_tokenization_spaces=False, add_bos_token=add_bos, add_eos_token=add_eos)
    if vocab_file is None:
        hf = PreTrainedTokenizerFast(**kw)
    elif str(arch).startswith("gemma"):
        hf = GemmaTokenizerFast(vocab_file=str(vocab_file), **kw)
    else:
        hf = LlamaTokenizerFast(vocab_file=str(vocab_file), legacy=False, **kw)
    if f.get("tokenizer.chat_template"):
        hf.chat_template = f["tokenizer.chat_template"]
    return hf


def write_sentencepiece_model(path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """The GGUF's SentencePiece vocabulary as a `tokenizer.model` (sentencepiece's ModelProto: BPE, byte fallback,
    identity normaliser, the GGUF's add_space_prefix): what llama.cpp's Gemma/Llama converters read the vocabulary
    from. User-defined whitespace pieces are stored escaped (`▁▁`), as SentencePiece matches them after escaping;
    the converter takes their literal text from tokenizer_config.json's added tokens."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from .gguf_read import metadata

    f = metadata(path)
    tokens, scores, types = _spm_fields(f)
    m = sp_pb2.ModelProto()
    for t, s, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece = t.replace(" ", "\u2581") if ty == _USER_DEFINED else t
        p.score = s
        p.type = ty if ty in (_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE) else _NORMAL
    ts = m.trainer_spec
    ts.model_type = sp_pb2.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = all(f"<0x{b:02X}>" in set(tokens) for b in range(256))
    for key, attr in (("unknown", "unk"), ("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        setattr(ts, f"{attr}_id", int(i) if isinstance(i, int) else -1)
        if isinstance(i, int):
            setattr(ts, f"{attr}_piece", tokens[i])
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    dest = Path(dest)
    dest.write_bytes(m.SerializeToString())
    return dest


def probe_texts() -> list[str]:
    """Texts a rebuilt tokenizer is checked on against llama.cpp: edge cases, every shipped seed prompt."""
    from importlib import resources

    try:
        seeds = resources.files("edgesmith.distill").joinpath("seed_prompts.jsonl").read_text(encoding="utf-8")
        prompts = [json.loads(ln)["prompt"] for ln in seeds.splitlines() if ln.strip()]
    except (OSError, ModuleNotFoundError, ValueError, KeyError):
        prompts = []
    return _PROBE_TEXTS + prompts


def tokenizer_disagreements(gguf_path: str | os.PathLike, tok, texts: list[str],
                             isolated: bool = True) -> list[tuple[str, list, list]]:
    """(text, llama.cpp ids, HF ids) for every text the HF tokenizer `tok` splits differently from llama.cpp (no BOS,
    special tokens parsed). llama.cpp runs in a child process unless `isolated=False` (the caller is one)."""
    from . import llamacpp
    from .native import run_isolated

    if isolated:
        ref = run_isolated(llamacpp.tokenize, str(gguf_path), texts, what=f"llama.cpp tokenising with {Path(gguf_path).name}")
    else:  # already in a child process (conversion)
        ref = llamacpp.tokenize(str(gguf_path), texts)
    got = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [(t, r, g) for t, r, g in zip(texts, ref, got) if list(r) != list(g)]


def check_tokenizer(gguf_path: str | os.PathLike, tok, texts: list[str] | None = None, isolated: bool = True) -> int:
    """Refuse (one-line EdgesmithError) a rebuilt tokenizer that splits any probe text differently from llama.cpp;
    returns the number of texts checked."""
    texts = probe_texts() if texts is None else texts
    bad = tokenizer_disagreements(gguf_path, tok, texts, isolated=isolated)
    if bad:
        text, ref, got = bad[0]
        raise EdgesmithError(
            f"{gguf_path}: the tokenizer rebuilt from this GGUF disagrees with llama.cpp's on {len(bad)} of {len(texts)} "
            f"probe texts (first: {text[:40]!r} -> llama.cpp {list(ref)[:8]}, rebuilt {list(got)[:8]}); refusing to "
            "convert it rather than train or measure with the wrong token ids")
    return len(texts)


def _materialize(gguf_path: Path, dest: Path, name: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .gguf_read import metadata, read

    fields = metadata(gguf_path)
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise EdgesmithError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(SUPPORTED_GGUF_ARCHS))}"
        )
    biased = [t["name"] for t in read(gguf_path).tensors if t["name"].endswith(("attn_q.bias", "attn_k.bias"))]
    if arch == "llama" and biased:  # transformers would load it as a Llama without biases, silently wrong
        raise EdgesmithError(f"{gguf_path}: a 'llama' GGUF with attention biases ({biased[0]}: a Qwen2 whose heads were "
                             "pruned, exported for llama.cpp) cannot be read back; use the HF directory it was exported from")
    tok_model = fields.get("tokenizer.ggml.model")  # the tokenizer first: a refusal should not wait for the weights
    if tok_model == "gpt2":
        tok = tokenizer_from_gguf(gguf_path)
    elif tok_model == "llama":  # SentencePiece: rebuilt and checked against llama.cpp (transformers' is Unigram)
        dest.mkdir(parents=True, exist_ok=True)
        # llama.cpp's Gemma/Llama converters read the vocabulary from tokenizer.model: written first, carried along
        tok = spm_tokenizer_from_gguf(gguf_path, vocab_file=write_sentencepiece_model(gguf_path, dest / "tokenizer.model"))
        check_tokenizer(gguf_path, tok, isolated=False)  # this is already a child process
    else:
        raise EdgesmithError(f"{gguf_path}: tokenizer model {tok_model!r} is not supported for conversion "
                             "(supported: gpt2 byte-level BPE, llama SentencePiece)")
    cfg = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    key_length = fields.get(f"{arch}.attention.key_length")
    if key_length and getattr(cfg, "head_dim", None) not in (None, key_length):
        cfg.head_dim = int(key_length)  # transformers 4.57 reads no head_dim for qwen3 (Qwen3-0.6B: 128, not 1024/16)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, config=cfg, dtype=torch.float32, local_files_only=True
    )
    eos_ids = [i for i in (fields.get("tokenizer.ggml.eos_token_id"), fields.get("tokenizer.ggml.eot_token_id")) if i is not None]
    eos_ids = list(dict.fromkeys(int(i) for i in eos_ids))
    model.config._name_or_path = name
    model.generation_config = GenerationConfig(
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id", eos_ids[0] if eos_ids else None),
    )
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest, legacy_format=False)
    stray = dest / "tokenizer.model"  # never ship a copy of the GGUF as a "SentencePiece model"
    if stray.exists() and stray.stat().st_size == gguf_path.stat().st_size:
        stray.unlink()
    (dest / "edgesmith.json").write_text(json.dumps({
        "name": name,
        "source": str(gguf_path),
        "source_fingerprint": quick_fingerprint(gguf_path),
        "source_file_type": fields.get("general.file_type"),
        "license": fields.get("general.license"),
        "note": "dequantised from GGUF; tokenizer rebuilt from the GGUF vocabulary",
    }, indent=2))


def materialize_gguf(gguf_path: Path, name: str | None = None) -> Path:
    """Convert a GGUF to a cached HF directory once; later calls return the cached directory."""
    from .modelio import model_name
    from .native import run_isolated

    gguf_path = Path(gguf_path).resolve()
    name = name or model_name(gguf_path)
    dest = cache_dir() / "models" / f"{name}-{quick_fingerprint(gguf_path)}"
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    with atomic_dir(dest) as tmp:
        # in a child: transformers' GGUF dequantisation peaks at several times the model size
        run_isolated(_materialize, gguf_path, tmp, name, what=f"converting {gguf_path.name} to Hugging Face")
    return dest
