"""HF directory -> GGUF (F16/F32/BF16), and PEFT LoRA adapter -> GGUF LoRA, with llama.cpp's own converters.

Conversion runs llama.cpp's `convert_hf_to_gguf.py` (with its `conversion/` package and the `gguf-py` it
was written against), extracted once from the cached llama-cpp-python sdist into
`cache_dir()/llama.cpp-<version>/` and run as a subprocess. It is the reference converter: it detects the
pre-tokenizer by hashing the HF tokenizer's output (SmolLM2 -> `smollm`), writes tokens/merges/token
types, special ids, add_bos and the chat template the way llama.cpp expects. We add our metadata through
its `--metadata` override file (general.*) plus a few keys it does not know (edgesmith provenance, the
end-of-turn id), injected just before the header is written (the patch in `_BOOTSTRAP`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from edgesmith.errors import EdgesmithError
from edgesmith.fsutil import atomic_dir, atomic_path, cache_dir

from .quantize import FLOAT_TYPES


def llama_cpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise EdgesmithError("llama-cpp-python is not installed: run `make setup`") from None


def converter_dir() -> Path:
    """llama.cpp's convert_hf_to_gguf.py + conversion/ + gguf-py/, extracted once from the cached sdist."""
    ver = llama_cpp_version()
    dest = cache_dir() / f"llama.cpp-{ver}"
    if all((dest / f).exists() for f in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py/gguf", "conversion")):
        return dest
    sdist = cache_dir() / "src" / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.is_file():
        raise EdgesmithError(f"{sdist}: llama-cpp-python source archive missing (it ships llama.cpp's converter); "
                             "run `make setup`")
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
    with atomic_dir(dest) as tmp, tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel and rel.startswith(wanted) and (m.isfile() or m.isdir()):
                m.name = rel
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise EdgesmithError(f"{sdist}: does not contain vendor/llama.cpp/convert_hf_to_gguf.py")
        tar.extractall(tmp, members=members, filter="data")
    return dest


# Runs inside the converter subprocess: put the vendored gguf-py first, add our extra keys right
# before the header is written (the converter has no option for arbitrary keys), optionally force
# the pre-tokenizer name, then run the converter as __main__.
_BOOTSTRAP = r"""
import json, runpy, sys
llama_dir, extra_file, script = sys.argv[1], sys.argv[2], sys.argv[3]
sys.argv = [llama_dir + "/" + script] + sys.argv[4:]
sys.path[:0] = [llama_dir + "/gguf-py", llama_dir]
import gguf
extra = json.load(open(extra_file, encoding="utf-8"))
pre = extra.pop("__pre__", None)
if pre:
    import conversion.base as base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
_write_header = gguf.GGUFWriter.write_header_to_file
def write_header_to_file(self, *a, **k):
    for key, (kind, val) in extra.items():
        if any(key in kv for kv in self.kv_data):
            self.remove_key(key)
        getattr(self, "add_" + kind)(key, val)
    return _write_header(self, *a, **k)
gguf.GGUFWriter.write_header_to_file = write_header_to_file
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _kv(value: Any) -> list:
    """A Python value -> [GGUFWriter add_<kind>, value] for the bootstrap."""
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["uint32", value]
    if isinstance(value, float):
        return ["float32", value]
    return ["string", str(value)]


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _source_gguf(hf_dir: Path, same_vocab: bool = False) -> Path | None:
    """The GGUF an HF dir was materialised from (edgesmith.json 'source'), following stage dirs back. With
    same_vocab, None when a stage on the way changed the vocabulary (`edgesmith trim-vocab`): that GGUF's pre-tokenizer
    and licence still apply, its token list does not."""
    seen = set()
    d = Path(hf_dir)
    while d and d not in seen:
        seen.add(d)
        info = _read_json(d / "edgesmith.json")
        if same_vocab and info.get("stage") == "trim-vocab":
            return None
        src = info.get("source")
        if not src:
            return None
        p = Path(src)
        if p.suffix == ".gguf" and p.is_file():
            return p
        d = p if p.is_dir() else None
    return None


def gguf_metadata(hf_dir: Path, name: str, source_model: str | None = None, recipe_hash: str | None = None) -> tuple[dict, dict]:
    """(general.* override for the converter, extra keys) for `hf_dir` exported as `name`."""
    import gguf

    from edgesmith import __version__
    from edgesmith.facts import facts

    fx = facts(hf_dir)
    meta: dict[str, Any] = {
        "general.name": name,
        "general.basename": name,
        "general.finetune": None,  # the converter guesses one from the directory name; ours names say it all
        # size from the real parameter count: a pruned "135m" model must not be labelled 135M
        "general.size_label": gguf.size_label(fx.params_total, 0, 0, 0),
    }
    info = _read_json(hf_dir / "edgesmith.json")
    src = _source_gguf(hf_dir)
    src_fields = {}
    if src is not None:
        from edgesmith.gguf_read import metadata

        src_fields = metadata(src)
    for key in ("general.languages",):  # not the organisation: a pruned/tuned derivative is not theirs
        if src_fields.get(key):
            meta[key] = src_fields[key]
    extra: dict[str, list] = {
        "edgesmith.version": _kv(__version__),
        "edgesmith.source_model": _kv(source_model or str(hf_dir)),
    }
    # the override file has no license key (the converter takes it from a model card only)
    from edgesmith.modelio import model_license

    lic = model_license(hf_dir) or src_fields.get("general.license")
    if lic:
        extra["general.license"] = _kv(lic)
    if recipe_hash:
        extra["edgesmith.recipe_hash"] = _kv(recipe_hash)
    for k in ("stage", "adapter", "teacher"):
        if info.get(k):
            extra[f"edgesmith.{k}"] = _kv(str(info[k]))
    eot = _end_of_turn_id(hf_dir)
    if eot is not None:
        extra["tokenizer.ggml.eot_token_id"] = _kv(int(eot))
    extra.update(_layer_kinds(_read_json(hf_dir / "config.json")))
    return meta, extra


def _layer_kinds(cfg: dict) -> dict[str, list]:
    """Gemma 3's per-layer attention kinds and local rope base, explicit: llama.cpp otherwise assumes its 5 sliding :
    1 full pattern by position, which a depth-pruned model (layer_types cut with the layers) no longer follows."""
    types = cfg.get("layer_types")
    if cfg.get("model_type") != "gemma3_text" or not isinstance(types, list) or not types or not cfg.get("sliding_window"):
        return {}
    out = {"gemma3.attention.sliding_window_pattern": ["array", [t == "sliding_attention" for t in types]]}
    if isinstance(cfg.get("rope_local_base_freq"), (int, float)):
        out["gemma3.rope.freq_base_swa"] = ["float32", float(cfg["rope_local_base_freq"])]
    return out


def _end_of_turn_id(hf_dir: Path) -> int | None:
    """The eos id (generation_config, else config) whose token the chat template ends turns with."""
    gen = _read_json(hf_dir / "generation_config.json")
    eos = gen.get("eos_token_id", _read_json(hf_dir / "config.json").get("eos_token_id"))
    ids = eos if isinstance(eos, list) else [eos]
    tok = _read_json(hf_dir / "tokenizer.json")
    added = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
    tmpl = _read_json(hf_dir / "tokenizer_config.json").get("chat_template") or ""
    if not tmpl and (hf_dir / "chat_template.jinja").is_file():
        tmpl = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(tmpl, str):
        return None
    for i in ids:
        if i is not None and added.get(i) and added[i] in tmpl:
            return int(i)
    return None


def convert(hf_dir: Path, out_path: Path, outtype: str = "F16", name: str | None = None,
            source_model: str | None = None, recipe_hash: str | None = None) -> Path:
    """HF directory -> one GGUF file (F16/F32/BF16) with llama.cpp's converter, written atomically."""
    from edgesmith.hfdir import check_hf_dir
    from edgesmith.modelio import model_name

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    check_hf_dir(hf_dir)
    if outtype.upper() not in FLOAT_TYPES:
        raise EdgesmithError(f"conversion type {outtype!r}: expected one of {', '.join(FLOAT_TYPES)}")
    llama_dir = converter_dir()
    meta, extra = gguf_metadata(hf_dir, name or model_name(hf_dir), source_model, recipe_hash)
    with atomic_path(out_path) as tmp, tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".convert-") as side:
        meta_file, kv_file = Path(side) / "metadata.json", Path(side) / "extra_kv.json"
        meta_file.write_text(json.dumps(meta))
        kv_file.write_text(json.dumps(extra))
        view = _converter_view(hf_dir, Path(side))
        args = [str(view), "--outtype", FLOAT_TYPES[outtype.upper()], "--outfile", str(tmp), "--metadata", str(meta_file)]
        log = _run_converter(llama_dir, kv_file, args)
        if "BPE pre-tokenizer was not recognized" in log:
            # a tokenizer llama.cpp does not know by hash; if it came from a GGUF, reuse that file's
            # pre-tokenizer name (same vocabulary, and modelio rebuilt the same pre-tokenizer from it)
            pre = _fallback_pre(hf_dir, llama_dir)
            if pre is None:
                raise EdgesmithError(f"{hf_dir}: llama.cpp's converter does not recognise this tokenizer's "
                                     "pre-tokenizer (and there is no source GGUF to take it from)")
            kv_file.write_text(json.dumps({**extra, "__pre__": pre}))
            log = _run_converter(llama_dir, kv_file, args)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise EdgesmithError(f"converting {hf_dir} to GGUF failed: {_last_error(log)}")
    return out_path


def _converter_view(hf_dir: Path, side: Path) -> Path:
    """The directory the converter reads: `hf_dir` itself, except for a Qwen2 whose attention width (heads x head_dim)
    is not its hidden size (query heads or hidden channels pruned). llama.cpp's qwen2 graph assumes the two are equal
    and refuses to load such a file; its llama graph takes head_dim from key_length and adds q/k/v biases where
    present, with the same rotary embedding (the Llama converter permutes q/k rows, biases included). So that Qwen2 is
    presented as a Llama: links to its files, with config.json naming LlamaForCausalLM."""
    cfg = _read_json(hf_dir / "config.json")
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    if cfg.get("model_type") != "qwen2" or not heads or not hidden:
        return hf_dir
    if (cfg.get("head_dim") or hidden // heads) * heads == hidden:
        return hf_dir
    view = side / hf_dir.name
    view.mkdir()
    for f in hf_dir.iterdir():
        if f.name != "config.json":
            (view / f.name).symlink_to(f.resolve())
    (view / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return view


def _run_converter(llama_dir: Path, kv_file: Path, args: list[str], script: str = "convert_hf_to_gguf.py") -> str:
    env = {**os.environ, "PYTHONPATH": str(llama_dir / "gguf-py"), "NO_LOCAL_GGUF": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", _BOOTSTRAP, str(llama_dir), str(kv_file), script, *args],
                          capture_output=True, text=True, env=env)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 and "BPE pre-tokenizer was not recognized" not in log:
        raise EdgesmithError(f"converting {args[0]} to GGUF failed: {_last_error(log)}")
    return log


def _last_error(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln) or ln.startswith("ERROR")]
    return (errs or lines or ["no output"])[-1][:300]


def _fallback_pre(hf_dir: Path, llama_dir: Path) -> str | None:
    """The pre-tokenizer name for a tokenizer llama.cpp does not know by hash: the source GGUF's, else, after
    `edgesmith trim-vocab` (same pre-tokenizer, renumbered ids, so a new hash), the one llama.cpp's converter finds for
    the untrimmed source directory."""
    src = _source_gguf(hf_dir)
    if src is not None:
        from edgesmith.gguf_read import metadata

        pre = metadata(src).get("tokenizer.ggml.pre")
        return pre if isinstance(pre, str) else None
    seen, d = set(), Path(hf_dir)
    while d.is_dir() and d not in seen:
        seen.add(d)
        info = _read_json(d / "edgesmith.json")
        if info.get("stage") == "trim-vocab" and info.get("source"):
            return _pre_by_hash(llama_dir, Path(info["source"]))
        d = Path(info["source"]) if info.get("source") else Path()
    return None


_PRE_BY_HASH = r"""
import sys
sys.path[:0] = [sys.argv[1] + "/gguf-py", sys.argv[1]]
from transformers import AutoTokenizer
from conversion.base import TextModel
print("PRE=" + TextModel.get_vocab_base_pre(None, AutoTokenizer.from_pretrained(sys.argv[2], local_files_only=True)))
"""


def _pre_by_hash(llama_dir: Path, hf_dir: Path) -> str | None:
    """llama.cpp's converter's own pre-tokenizer name for `hf_dir`'s tokenizer (None if it does not know it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _PRE_BY_HASH, str(llama_dir), str(hf_dir)], capture_output=True,
                          text=True, env=env)
    m = re.search(r"^PRE=(\S+)$", proc.stdout, re.M)
    return m.group(1) if m else None


# ---------------------------------------------------------------- LoRA adapter -> GGUF LoRA


def adapter_base_dir(adapter_dir: Path, base: str | None = None) -> Path:
    """The local HF directory of a PEFT adapter's base: `base` if given, else the one the adapter records."""
    from edgesmith.modelio import resolve

    cfg = _read_json(Path(adapter_dir) / "adapter_config.json")
    spec = base or cfg.get("base_model_name_or_path")
    if not spec:
        raise EdgesmithError(f"{adapter_dir}/adapter_config.json: no base_model_name_or_path; pass the base model")
    return resolve(spec)


def convert_lora(adapter_dir: Path, base_hf_dir: Path, out_path: Path, outtype: str = "F16",
                 source_model: str | None = None) -> Path:
    """PEFT LoRA adapter directory -> GGUF LoRA (llama.cpp's convert_lora_to_gguf.py), written atomically.

    The file is what llama.cpp's `--lora`, llama-cpp-python's `lora_path=` and Ollama's `ADAPTER` load on
    top of the *base* model's GGUF (any quant of it)."""
    from edgesmith import __version__

    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise EdgesmithError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    peft_type = _read_json(adapter_dir / "adapter_config.json").get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise EdgesmithError(f"{adapter_dir}: a {peft_type} adapter cannot be exported as a GGUF LoRA "
                             "(only LoRA; export the merged model instead)")
    if outtype.upper() not in FLOAT_TYPES:
        raise EdgesmithError(f"LoRA GGUF type {outtype!r}: expected one of {', '.join(FLOAT_TYPES)}")
    llama_dir = converter_dir()
    extra = {"edgesmith.version": _kv(__version__), "edgesmith.source_model": _kv(source_model or str(adapter_dir))}
    with atomic_path(out_path) as tmp, tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".convert-") as side:
        kv_file = Path(side) / "extra_kv.json"
        kv_file.write_text(json.dumps(extra))
        args = [str(adapter_dir), "--base", str(base_hf_dir), "--outtype", FLOAT_TYPES[outtype.upper()], "--outfile", str(tmp)]
        log = _run_converter(llama_dir, kv_file, args, script="convert_lora_to_gguf.py")
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise EdgesmithError(f"converting adapter {adapter_dir} to a GGUF LoRA failed: {_last_error(log)}")
    return out_path
