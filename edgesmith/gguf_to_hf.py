"""GGUF -> Hugging Face directory, materialised once into the cache and reused.

fp32 safetensors (transformers' GGUF dequantisation), a faithful byte-level BPE tokenizer rebuilt from
the GGUF's tokens/merges with the pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre`, the
chat template and a generation config. The tokenizer transformers itself derives from such a GGUF saves
as a SentencePiece-style Llama tokenizer whose files mislead llama.cpp's converter, so it is never used
for BPE GGUFs.
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


def _materialize(gguf_path: Path, dest: Path, name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .gguf_read import metadata

    fields = metadata(gguf_path)
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise EdgesmithError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(SUPPORTED_GGUF_ARCHS))}"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    )
    if fields.get("tokenizer.ggml.model") == "gpt2":
        tok = tokenizer_from_gguf(gguf_path)
    else:  # SentencePiece GGUFs: transformers' own conversion is faithful for these
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
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
