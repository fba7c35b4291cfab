"""GGUF export: an HF Llama-family directory -> GGUF F16 (or F32/BF16) -> llama.cpp quants.

Conversion runs llama.cpp's own `convert_hf_to_gguf.py` (with its `conversion/` package and the
`gguf-py` it was written against), extracted once from the cached llama-cpp-python sdist into
`cache_dir()/llama.cpp-<version>/` and run as a subprocess. It is the reference converter: it
detects the pre-tokenizer by hashing the HF tokenizer's output (SmolLM2 -> `smollm`), writes
tokens/merges/token types, special ids, add_bos and the chat template the way llama.cpp expects.
We add our metadata through its `--metadata` override file (general.*) plus a few keys it does
not know (edgesmith provenance, the end-of-turn id), injected just before the header is written.

Quantisation is llama.cpp's quantiser (`llama_cpp.llama_model_quantize`), one child process per
file (`edgesmith.native.run_isolated`): calling it repeatedly in one process has crashed, and an
abort there must not kill the CLI. Its log is captured: llama.cpp itself says which tensors fell
back to another type because their row length is not a multiple of the type's block size
(256 for K-quants, 32 for legacy quants) -- SmolLM2's hidden 576 is one of those.

`--imatrix`: importance matrix = mean of x^2 per input column of every linear layer, gathered with
PyTorch forward hooks on calibration text and written in llama.cpp's GGUF imatrix format
(`<tensor>.in_sum2` + `<tensor>.counts`, what `llama-imatrix` writes). The quantiser takes it the
way llama.cpp's quantize tool passes it: an array of {name, data, size} in `params.imatrix`.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from edgesmith.errors import EdgesmithError
from edgesmith.fsutil import atomic_dir, atomic_path, cache_dir, check_free_space

# Types the converter writes directly; every other name goes through the quantiser.
FLOAT_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
DEFAULT_TYPES = ("F16", "Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0")
# ftypes that exist in the enum but that llama.cpp cannot produce for a dense Llama (or that are guesses)
_NOT_QUANTS = {"GUESSED", "MOSTLY_MXFP4_MOE"}
IMATRIX_CHUNK = 512      # tokens per calibration chunk (llama-imatrix's default n_ctx)
IMATRIX_MAX_CHUNKS = 32  # 16k tokens: enough for a stable per-column mean on small models, ~1 min CPU
# token sequences every exported GGUF must tokenise exactly like the HF tokenizer (special tokens in text)
TOKENIZER_SAMPLES = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "In 1999, 3.14159 * 2 = 6.28318; call f(x) -> y.",
    "  leading spaces\tand tabs\nand new lines\n\n",
    "Ünïcödé: café, naïve, 日本語, emoji 🤖.",
    "def add(a, b):\n    return a + b  # sum",
)


# ---------------------------------------------------------------- type names


def ftype_table() -> dict[str, int]:
    """Quant/type name -> llama.cpp `llama_ftype` value (from gguf-py's copy of the enum)."""
    import gguf

    out = {}
    for m in gguf.LlamaFileType:
        if m.name in _NOT_QUANTS:
            continue
        out[m.name.replace("MOSTLY_", "").replace("ALL_", "")] = int(m.value)
    return out


def valid_types() -> list[str]:
    return list(ftype_table())


def parse_types(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'F16,Q4_K_M' -> ['F16', 'Q4_K_M'] (names kept exactly as given, matched case-insensitively)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    table = ftype_table()
    bad = [s for s in items if s.upper() not in table]
    if bad:
        raise EdgesmithError(f"unknown GGUF type {bad[0]!r}; valid: {', '.join(table)}")
    return list(dict.fromkeys(items))


def _primary_block(qtype: str) -> int:
    """Block size of the main tensor type of an ftype (256 for K/IQ quants, 32 for legacy, 1 for floats)."""
    import gguf

    name = qtype.upper()
    if name in FLOAT_TYPES:
        return 1
    for cand in (name, re.sub(r"_(S|M|L|XS|XXS)$", "", name), re.sub(r"_(M)$", "_S", name)):
        if cand in gguf.GGMLQuantizationType.__members__:
            return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[cand]][0])
    return 256 if ("K" in name or name.startswith("IQ")) else 32


# ---------------------------------------------------------------- llama.cpp's converter


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


def _source_gguf(hf_dir: Path) -> Path | None:
    """The GGUF an HF dir was materialised from (edgesmith.json 'source'), following stage dirs back."""
    seen = set()
    d = Path(hf_dir)
    while d and d not in seen:
        seen.add(d)
        src = _read_json(d / "edgesmith.json").get("source")
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
    from edgesmith.modelio import facts

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
    return meta, extra


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
    from edgesmith.modelio import check_hf_dir, model_name

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
        args = [str(hf_dir), "--outtype", FLOAT_TYPES[outtype.upper()], "--outfile", str(tmp), "--metadata", str(meta_file)]
        log = _run_converter(llama_dir, kv_file, args)
        if "BPE pre-tokenizer was not recognized" in log:
            # a tokenizer llama.cpp does not know by hash; if it came from a GGUF, reuse that file's
            # pre-tokenizer name (same vocabulary, and modelio rebuilt the same pre-tokenizer from it)
            pre = _fallback_pre(hf_dir)
            if pre is None:
                raise EdgesmithError(f"{hf_dir}: llama.cpp's converter does not recognise this tokenizer's "
                                     "pre-tokenizer (and there is no source GGUF to take it from)")
            kv_file.write_text(json.dumps({**extra, "__pre__": pre}))
            log = _run_converter(llama_dir, kv_file, args)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise EdgesmithError(f"converting {hf_dir} to GGUF failed: {_last_error(log)}")
    return out_path


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


def _fallback_pre(hf_dir: Path) -> str | None:
    src = _source_gguf(hf_dir)
    if src is None:
        return None
    from edgesmith.gguf_read import metadata

    pre = metadata(src).get("tokenizer.ggml.pre")
    return pre if isinstance(pre, str) else None


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


# ---------------------------------------------------------------- importance matrix


def compute_imatrix(hf_dir: Path, calib: Path, out_path: Path, chunk: int = IMATRIX_CHUNK,
                    max_chunks: int = IMATRIX_MAX_CHUNKS, say: Callable[[str], None] = print) -> Path:
    """Mean of x^2 per input column of every nn.Linear over calibration text, saved as a llama.cpp
    GGUF imatrix (`<gguf tensor>.in_sum2` sums, `<gguf tensor>.counts` token counts)."""
    import gguf
    import numpy as np
    import torch

    from edgesmith.modelio import load

    calib = Path(calib)
    try:
        text = calib.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgesmithError(f"{calib}: cannot read calibration text ({e})") from None
    model, tok = load(hf_dir, dtype="float32")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
    step = chunk - (bos is not None)
    n = min(max_chunks, len(ids) // step)
    if n < 1:
        raise EdgesmithError(f"{calib}: calibration text too short: {len(ids)} tokens, need at least {step}")
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[model.config.model_type]
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(gname):
        def fn(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()  # x: [tokens, in]
            sums[gname] = sums.get(gname, 0) + (x * x).sum(0)         # -> [in]
            counts[gname] = counts.get(gname, 0) + x.shape[0]
        return fn

    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            gname = names.get_name(mname + ".weight", try_suffixes=(".weight",))
            if gname:
                hooks.append(mod.register_forward_hook(hook(gname)))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            piece = ids[i * step:(i + 1) * step]
            x = torch.tensor([([bos] if bos is not None else []) + piece])
            model(x)
    for h in hooks:
        h.remove()
    say(f"imatrix: {len(sums)} tensors from {n} chunks x {chunk} tokens of {calib.name} ({time.perf_counter() - t0:.0f}s)")
    with atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="imatrix")
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [calib.name])
        w.add_uint32("imatrix.chunk_count", n)
        w.add_uint32("imatrix.chunk_size", chunk)
        for gname in sorted(sums):
            w.add_tensor(gname + ".in_sum2", sums[gname].numpy().astype(np.float32))
            w.add_tensor(gname + ".counts", np.array([counts[gname]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out_path


def load_imatrix(path: Path) -> tuple[dict[str, Any], dict]:
    """An imatrix file (llama.cpp GGUF format or legacy .dat) -> ({tensor: mean x^2 [in]}, info),
    normalised exactly like llama.cpp's quantize tool does."""
    import numpy as np

    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    data: dict[str, Any] = {}
    info: dict[str, Any] = {"file": str(path)}
    if magic == b"GGUF":
        from edgesmith.gguf_read import read

        r = read(path)
        t = {x["name"]: np.asarray(r.tensor_array(x["name"]), dtype=np.float32).reshape(-1) for x in r.tensors}
        for key in t:
            if not key.endswith(".in_sum2"):
                continue
            base = key[: -len(".in_sum2")]
            if base + ".counts" not in t:
                raise EdgesmithError(f"{path}: imatrix has sums but no counts for {base}")
            sums, cnt = t[key], t[base + ".counts"]
            per = sums.reshape(len(cnt), -1)  # [experts, in]
            data[base] = np.where(cnt[:, None] > 0, per / np.maximum(cnt[:, None], 1), 1.0).reshape(-1).astype(np.float32)
        for k in ("imatrix.chunk_count", "imatrix.chunk_size"):
            if k in r.fields:
                info[k.split(".")[1]] = int(r.fields[k])
        if "imatrix.datasets" in r.fields:
            info["datasets"] = r.fields["imatrix.datasets"]
    else:  # legacy: n_entries, then (len, name, ncall, nval, float[nval]) per entry
        raw = path.read_bytes()
        try:
            off = 0
            (n,) = np.frombuffer(raw, np.int32, 1, off); off += 4
            for _ in range(int(n)):
                (ln,) = np.frombuffer(raw, np.int32, 1, off); off += 4
                name = raw[off:off + ln].decode(); off += ln
                ncall, nval = np.frombuffer(raw, np.int32, 2, off); off += 8
                vals = np.frombuffer(raw, np.float32, int(nval), off); off += 4 * int(nval)
                data[name] = (vals / ncall if ncall > 0 else vals).astype(np.float32)
        except (ValueError, UnicodeDecodeError):
            raise EdgesmithError(f"{path}: not an imatrix file (GGUF imatrix or legacy .dat)") from None
    if not data:
        raise EdgesmithError(f"{path}: imatrix file holds no entries")
    bad = [k for k, v in data.items() if not np.isfinite(v).all()]
    if bad:
        raise EdgesmithError(f"{path}: imatrix has non-finite values for {bad[0]}")
    info["entries"] = len(data)
    return data, info


def is_imatrix_file(path: Path) -> bool:
    """True for a GGUF imatrix or a legacy .dat; False for calibration text."""
    path = Path(path)
    if path.suffix in (".dat", ".imatrix"):
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        return False
    from edgesmith.gguf_read import metadata

    return metadata(path).get("general.type") == "imatrix"


# ---------------------------------------------------------------- quantiser (child process)


def _quantize_child(src: str, dst: str, ftype: int, nthread: int, imatrix_file: str | None) -> str:
    """Runs in a child: llama_model_quantize(src -> dst); returns llama.cpp's log text."""
    import ctypes

    import llama_cpp

    from edgesmith.llamacpp import capture_logs

    logs = capture_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    keep: list[Any] = []  # buffers the C side points into must outlive the call
    if imatrix_file:
        import numpy as np

        data, info = load_imatrix(Path(imatrix_file))
        arr = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()
        for i, (name, vals) in enumerate(sorted(data.items())):
            v = np.ascontiguousarray(vals, dtype=np.float32)
            b = name.encode()
            keep += [v, b]
            arr[i].name = b
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(data)].name = None  # terminator
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        # the same provenance keys llama.cpp's quantize tool records
        kvs = [("quantize.imatrix.file", Path(imatrix_file).name), ("quantize.imatrix.entries_count", len(data))]
        if info.get("chunk_count"):
            kvs.append(("quantize.imatrix.chunks_count", int(info["chunk_count"])))
        if info.get("datasets"):
            kvs.append(("quantize.imatrix.dataset", str(info["datasets"][0])))
        ov = (llama_cpp.llama_model_kv_override * (len(kvs) + 1))()
        for i, (k, v) in enumerate(kvs):
            ov[i].key = k.encode()
            if isinstance(v, int):
                ov[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                ov[i].value.val_i64 = v
            else:
                ov[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                ov[i].value.val_str = v.encode()[:127]
        ov[len(kvs)].key = b""
        keep.append(ov)
        params.kv_overrides = ctypes.cast(ov, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    text = "".join(logs)
    if rc != 0:
        errs = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        raise EdgesmithError(f"llama.cpp could not quantise {Path(src).name} to {Path(dst).name}: "
                             f"{(errs or ['quantiser returned ' + str(rc)])[-1][:300]}")
    return text


def quantize(src: Path, dst: Path, qtype: str, imatrix: Path | None = None, threads: int | None = None) -> str:
    """One quantisation in a child process, written atomically; returns llama.cpp's log."""
    table = ftype_table()
    if qtype.upper() not in table or qtype.upper() in FLOAT_TYPES:
        raise EdgesmithError(f"unknown quant type {qtype!r}; valid: {', '.join(k for k in table if k not in FLOAT_TYPES)}")
    from edgesmith.native import run_isolated

    nthread = threads or os.cpu_count() or 1
    with atomic_path(dst) as tmp:
        return run_isolated(_quantize_child, str(src), str(tmp), table[qtype.upper()], nthread,
                            str(imatrix) if imatrix else None, what=f"llama.cpp quantising to {qtype}")


_FALLBACK_RE = re.compile(
    r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)\s*"
    r"(?:\(WARNING: must use F16 due to unusual shape\)\s*)?-> falling back to\s+(\S+)")


def parse_fallbacks(log: str) -> list[dict]:
    """llama.cpp's own per-tensor fallback lines -> [{tensor, width, block, wanted, used}]."""
    return [{"tensor": m[0], "width": int(m[1]), "block": int(m[2]), "wanted": m[3], "used": m[4]}
            for m in _FALLBACK_RE.findall(log)]


# ---------------------------------------------------------------- describing a GGUF

def describe(path: Path, qtype: str | None = None, log: str | None = None) -> dict:
    """Size, bits per weight, tensor type counts, file type check and fallbacks of one GGUF file."""
    from edgesmith.gguf_read import read

    path = Path(path)
    g = read(path)
    fields, tensors = g.fields, g.tensors
    types = Counter(t["type"] for t in tensors)
    n_el = sum(t["n_elements"] for t in tensors)
    n_bytes = sum(t["n_bytes"] for t in tensors)
    ft = fields.get("general.file_type")
    table = ftype_table()
    want = table.get(qtype.upper()) if qtype else None
    out = {
        "size_bytes": path.stat().st_size,
        "bits_per_weight": round(8 * n_bytes / max(n_el, 1), 3),
        "params": n_el,
        "tensor_types": dict(types.most_common()),
        "file_type": ft,
        "file_type_name": next((k for k, v in table.items() if v == ft), str(ft)),
    }
    if qtype:
        out["file_type_ok"] = ft == want
    if log is not None:
        fb = parse_fallbacks(log)
        m = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", log)
        n = int(m.group(1)) if m else len(fb)
        widths = sorted({f["width"] for f in fb})
        out["fallbacks"] = {
            "count": n,
            "widths": widths,
            "by_type": dict(Counter(f"{f['wanted']}->{f['used']}" for f in fb).most_common()),
        }
        m = re.search(r"have importance matrix data with (\d+) entries", log)
        if m:  # llama.cpp's own word that it took the imatrix, and for how many tensors it had none
            # (token_embd is a row lookup, not a matmul: llama-imatrix has no data for it either)
            out["imatrix"] = {"entries": int(m.group(1)), "tensors_without_data": re.findall(r"did not find weights for (\S+)", log)}
    return out


def fallback_warning(name: str, d: dict) -> str | None:
    fb = d.get("fallbacks") or {}
    if not fb.get("count"):
        return None
    kinds = ", ".join(f"{k} x{v}" for k, v in fb["by_type"].items())
    ws = ", ".join(str(w) for w in fb["widths"])
    return (f"{name}: {fb['count']} tensors fell back to other types ({kinds}) because their widths ({ws}) "
            "are not multiples of the type's block size (256 for K-quants, 32 for legacy quants)")


def tokenizer_fields(path: Path) -> dict:
    """The tokenizer.* keys of a GGUF, arrays included (for comparing files)."""
    from edgesmith.gguf_read import metadata

    return {k: v for k, v in metadata(path).items() if k.startswith("tokenizer.")}


@functools.lru_cache(maxsize=4)
def hf_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)


def check_tokenizer_metadata(gguf_path: Path, hf_dir: Path) -> dict:
    """The GGUF's tokenizer metadata agrees with the HF tokenizer (and with the source GGUF, if any)."""
    f = tokenizer_fields(gguf_path)
    tok = hf_tokenizer(Path(hf_dir))
    vocab = tok.get_vocab()
    tokens = f.get("tokenizer.ggml.tokens") or []
    checks = {
        "tokenizer_model": f.get("tokenizer.ggml.model"),
        "pre_tokenizer": f.get("tokenizer.ggml.pre"),
        "vocab_matches_hf": len(tokens) >= len(vocab) and all(tokens[i] == t for t, i in vocab.items() if i < len(tokens)),
        "bos_matches_hf": tok.bos_token_id is None or f.get("tokenizer.ggml.bos_token_id") == tok.bos_token_id,
        "eos_matches_hf": f.get("tokenizer.ggml.eos_token_id") == tok.eos_token_id,
        "add_bos_matches_hf": bool(f.get("tokenizer.ggml.add_bos_token", False)) == bool(getattr(tok, "add_bos_token", False)),
        "chat_template_matches_hf": (f.get("tokenizer.chat_template") or None) == (tok.chat_template or None),
    }
    if tok.pad_token_id is not None:
        checks["pad_matches_hf"] = f.get("tokenizer.ggml.padding_token_id") == tok.pad_token_id
    src = _source_gguf(hf_dir)
    if src is not None:
        s = tokenizer_fields(src)
        same = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                            "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                            "tokenizer.chat_template") if s.get(k) == f.get(k)]
        checks["matches_source_gguf"] = len(same) == 8
    checks["ok"] = bool(checks["pre_tokenizer"] not in (None, "default") and all(
        v for k, v in checks.items() if k.endswith("_hf") or k == "matches_source_gguf"))
    return checks


# ---------------------------------------------------------------- llama.cpp runs (child processes)


def _load_check(path: str, samples: list[str], expected: list[list[int]], threads: int | None) -> dict:
    """Child: loads in llama.cpp, tokenises like HF, produces finite logits on a short prompt."""
    import numpy as np

    from edgesmith.llamacpp import open_llama

    llm = open_llama(path, n_ctx=128, threads=threads)
    try:
        got = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in samples]
        ids = expected[-1][:32]
        llm.eval(ids)
        logits = np.asarray(llm.scores[len(ids) - 1])
        return {"loads": True, "tokenizer_ids_match_hf": got == expected, "finite_logits": bool(np.isfinite(logits).all())}
    finally:
        llm.close()


def tokenizer_samples(hf_dir: Path) -> tuple[list[str], list[list[int]]]:
    """Texts (plain ones + a rendered chat with special tokens) and the HF tokenizer's ids for them."""
    tok = hf_tokenizer(Path(hf_dir))
    texts = list(TOKENIZER_SAMPLES)
    if tok.chat_template:
        texts.append(tok.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}],
            tokenize=False, add_generation_prompt=True))
    return texts, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def load_check(path: Path, hf_dir: Path, threads: int | None = None, samples=None) -> dict:
    from edgesmith.native import run_isolated

    texts, ids = samples or tokenizer_samples(hf_dir)
    return run_isolated(_load_check, str(path), texts, ids, threads, what=f"llama.cpp loading {Path(path).name}")


# ---------------------------------------------------------------- the whole GGUF half of `edgesmith export`


def export_gguf(hf_dir: Path, out_dir: Path, name: str, types: list[str] | str = DEFAULT_TYPES, *,
                base: str = "F16", imatrix: Path | None = None, source_model: str | None = None,
                recipe_hash: str | None = None, check: bool = True, threads: int | None = None, jobs: int = 2,
                say: Callable[[str], None] = print) -> list[dict]:
    """Write OUT/NAME-<TYPE>.gguf for every requested type; return their export.json entries.

    Quants are made from the `base` conversion (F16 by default, as llama.cpp's docs do; kept as
    NAME-<base>.gguf when that type is requested too, else a temporary file). `imatrix`: calibration
    text (an imatrix is computed and saved as NAME.imatrix.gguf) or an existing llama.cpp imatrix.
    `jobs`: quantisations run at a time (each in its own child process).
    """
    from edgesmith.modelio import facts

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    types = parse_types(types)
    if base.upper() not in FLOAT_TYPES:
        raise EdgesmithError(f"base type {base!r}: expected one of {', '.join(FLOAT_TYPES)}")
    fx = facts(hf_dir)
    floats = [t for t in types if t.upper() in FLOAT_TYPES]
    quants = [t for t in types if t.upper() not in FLOAT_TYPES]
    # every float file + a temporary base + quants at most ~8.5 bits per weight
    bytes_per = {"F32": 4.0, "F16": 2.0, "BF16": 2.0}
    need = fx.params_total * (sum(bytes_per[t.upper()] for t in floats) + 1.1 * len(quants) + bytes_per[base.upper()])
    check_free_space(out_dir, int(need), "the GGUF files")
    samples = tokenizer_samples(hf_dir) if check else None
    entries: list[dict] = []

    def entry(path: Path, qtype: str, t0: float, log: str | None = None) -> dict:
        d = describe(path, qtype, log)
        checks: dict[str, Any] = {"file_type_ok": d["file_type_ok"]}
        if log is None:  # converter output: its tokenizer metadata against the HF tokenizer
            checks["tokenizer_metadata"] = check_tokenizer_metadata(path, hf_dir)
            if not checks["tokenizer_metadata"]["ok"]:
                bad = [k for k, v in checks["tokenizer_metadata"].items() if v is False]
                say(f"warning: {path.name}: tokenizer metadata differs from the HF tokenizer: {', '.join(bad)}")
        if check:
            checks.update(load_check(path, hf_dir, threads, samples))
        checks["seconds"] = round(time.perf_counter() - t0, 1)
        checks["ok"] = all(checks.get(k, True) for k in ("file_type_ok", "loads", "tokenizer_ids_match_hf", "finite_logits")) \
            and checks.get("tokenizer_metadata", {}).get("ok", True)
        warn = fallback_warning(path.name, d)
        if warn:
            say(f"warning: {warn}")
        return {"path": str(path), "type": f"gguf-{qtype}", "size_bytes": d["size_bytes"], "gguf": d, "checks": checks}

    base_req = next((t for t in floats if t.upper() == base.upper()), None)
    src = out_dir / f"{name}-{base_req}.gguf" if base_req else out_dir / f".{name}-{base.upper()}.source.gguf"
    try:
        for t in ([base_req] if base_req else []) + [t for t in floats if t is not base_req]:
            t0 = time.perf_counter()
            p = out_dir / f"{name}-{t}.gguf"
            say(f"converting {hf_dir} -> {p.name} (llama.cpp convert_hf_to_gguf)")
            convert(hf_dir, p, t, name, source_model, recipe_hash)
            entries.append(entry(p, t, t0))
        if quants and not base_req:
            say(f"converting {hf_dir} -> {base.upper()} (quantisation source, not kept)")
            convert(hf_dir, src, base, name, source_model, recipe_hash)
        imx = None
        if quants and imatrix is not None:
            imatrix = Path(imatrix)
            if not imatrix.is_file():
                raise EdgesmithError(f"{imatrix}: no such calibration text or imatrix file")
            if is_imatrix_file(imatrix):
                imx = imatrix
            else:
                imx = compute_imatrix(hf_dir, imatrix, out_dir / f"{name}.imatrix.gguf", say=say)
                entries.append({"path": str(imx), "type": "imatrix", "size_bytes": imx.stat().st_size,
                                "checks": {"entries": load_imatrix(imx)[1]["entries"], "calibration": str(imatrix)}})
        def one_quant(q: str) -> dict:
            t0 = time.perf_counter()
            p = out_dir / f"{name}-{q}.gguf"
            say(f"quantising {src.name if base_req else base.upper()} -> {p.name}" + (" (with imatrix)" if imx else ""))
            log = quantize(src, p, q, imx, threads)
            e = entry(p, q, t0, log)
            e["checks"]["imatrix"] = str(imx) if imx else None
            return e

        # each quantisation (and its check) is its own child process: `jobs` of them at a time overlap one
        # child's start-up, file reading and writing with another's multi-threaded quantising
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(quants) or 1))) as pool:
            entries += list(pool.map(one_quant, quants))
    finally:
        if not base_req:
            src.unlink(missing_ok=True)
    return entries
