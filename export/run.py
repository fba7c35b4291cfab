"""`edgesmith export`: one model -> the files an edge runtime loads, in one directory.

    DIR/NAME-F16.gguf, DIR/NAME-Q4_K_M.gguf, ...   llama.cpp / Ollama (export/gguf.py)
    DIR/onnx/, DIR/onnx-int8/, DIR/onnx-int4/      onnxruntime, KV cache (export/onnx.py)
    DIR/Modelfile.Q4_K_M, ...                      `ollama create NAME -f DIR/Modelfile.Q4_K_M` (export/ollama.py)
    DIR/export.json                                every file: size, type, the checks it passed

MODEL is an HF directory, `default`, or a LoRA adapter directory: adapters are merged into their
base in float32 first (never onto a quantised base), then exported like any HF directory.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgesmith import __version__
from edgesmith.config import ConfigError
from edgesmith.errors import EdgesmithError
from edgesmith.fsutil import check_free_space, ensure_writable_dir, write_json

from .quantize import DEFAULT_TYPES, FLOAT_TYPES, parse_types

ONNX_QUANTS = ("int8", "int4")


@dataclass
class ExportConfig:
    """Settings of `edgesmith export`."""

    model: str = "default"
    """HF directory, 'default', or a LoRA adapter directory (merged into its base in float32 first)."""
    out: str = "out/export"
    """Output directory (files are named NAME-<TYPE>.gguf, onnx/, Modelfile.<TYPE>, export.json)."""
    name: str = ""
    """File name stem; empty = the model's name (smollm2-135m-instruct for default)."""
    gguf: list[str] = field(default_factory=lambda: list(DEFAULT_TYPES))
    """GGUF types: F16/F32/BF16 (converted) and any llama.cpp quant (Q4_0, Q4_K_M, Q5_K_M, Q8_0, ...); [] for none."""
    base: str = "F16"
    """Float GGUF the quants are made from (F16, BF16 or F32); kept only if also listed in gguf."""
    onnx: bool = False
    """Also export ONNX (fp32 decoder with KV cache) to DIR/onnx/."""
    onnx_quant: list[str] = field(default_factory=list)
    """ONNX weight-only quantisations: int8 (dynamic), int4 (MatMulNBits); each in DIR/onnx-<q>/ (implies onnx)."""
    modelfile: bool = False
    """Write an Ollama Modelfile next to every GGUF file (DIR/Modelfile.<TYPE>)."""
    gguf_lora: bool = False
    """MODEL is a LoRA adapter: also write the adapter itself as DIR/NAME-lora-F16.gguf (llama.cpp --lora, Ollama ADAPTER)."""
    imatrix: str = ""
    """Calibration text (an importance matrix is computed) or an existing llama.cpp imatrix file, for the quants."""
    adapter_base: str = ""
    """Base model of a LoRA adapter MODEL; empty = the base recorded in the adapter."""
    recipe_hash: str = ""
    """Recipe hash recorded in the GGUF metadata (edgesmith.recipe_hash); set by `edgesmith run`."""
    check: bool = True
    """Run the fidelity checks (llama.cpp load + tokenisation vs HF, ONNX parity) on every file."""
    threads: int = 0
    """Threads for the quantiser and checks; 0 = all cores."""
    jobs: int = 2
    """Work run side by side: the GGUF and ONNX halves, and this many quantisations at a time (1 = one after another)."""

    def __post_init__(self):
        try:
            self.gguf = parse_types(self.gguf)
        except EdgesmithError as e:
            raise ConfigError("gguf", str(e)) from None
        if self.base.upper() not in FLOAT_TYPES:
            raise ConfigError("base", f"expected one of {', '.join(FLOAT_TYPES)}, got {self.base!r}")
        bad = [q for q in self.onnx_quant if q not in ONNX_QUANTS]
        if bad:
            raise ConfigError("onnx_quant", f"unknown ONNX quantisation {bad[0]!r}; valid: {', '.join(ONNX_QUANTS)}")
        if self.threads < 0:
            raise ConfigError("threads", "expected >= 0")
        if self.jobs < 1:
            raise ConfigError("jobs", "expected >= 1")
        if self.gguf_lora and not is_adapter_dir(Path(str(self.model)).expanduser()):
            raise ConfigError("gguf_lora", f"expected MODEL to be a LoRA adapter directory (with adapter_config.json), got {self.model!r}")
        if self.modelfile and not self.gguf:
            raise ConfigError("modelfile", "Modelfiles point at GGUF files: list at least one gguf type")


# ---------------------------------------------------------------- exporters
# Each takes (cfg, hf_dir, out, name, entries so far, say) and returns its export.json entries.
# Order matters: Modelfiles point at the GGUF files written before them.


def _gguf(cfg: ExportConfig, hf_dir: Path, out: Path, name: str, done: list[dict], say) -> list[dict]:
    if not cfg.gguf:
        return []
    from .gguf import export_gguf

    return export_gguf(hf_dir, out, name, cfg.gguf, base=cfg.base, imatrix=Path(cfg.imatrix) if cfg.imatrix else None,
                       source_model=str(cfg.model), recipe_hash=cfg.recipe_hash or None, check=cfg.check,
                       threads=cfg.threads or None, jobs=cfg.jobs, say=say)


def _onnx(cfg: ExportConfig, hf_dir: Path, out: Path, name: str, done: list[dict], say) -> list[dict]:
    if not (cfg.onnx or cfg.onnx_quant):
        return []
    from .onnx import export_onnx

    t = cfg.threads or None
    say(f"exporting ONNX fp32 (KV cache) -> {out / 'onnx'}")
    entries = [export_onnx(hf_dir, out / "onnx", None, check=cfg.check, threads=t)]
    for q in cfg.onnx_quant:
        say(f"quantising ONNX {q} -> {out / f'onnx-{q}'}")
        entries.append(export_onnx(hf_dir, out / f"onnx-{q}", q, check=cfg.check, fp32_dir=out / "onnx", threads=t))
    return entries


def _ollama(cfg: ExportConfig, hf_dir: Path, out: Path, name: str, done: list[dict], say) -> list[dict]:
    if not cfg.modelfile:
        return []
    from .ollama import write_modelfile

    entries = []
    for e in done:
        if e["type"].startswith("gguf-"):
            q = e["type"][len("gguf-"):]
            entries.append(write_modelfile(Path(e["path"]), hf_dir, out / f"Modelfile.{q}", q))
    return entries


def _gguf_lora(cfg: ExportConfig, hf_dir: Path, out: Path, name: str, done: list[dict], say) -> list[dict]:
    if not cfg.gguf_lora:
        return []
    from edgesmith.gguf_read import read

    from .gguf_convert import adapter_base_dir, convert_lora

    src = Path(str(cfg.model)).expanduser()
    base = adapter_base_dir(src, cfg.adapter_base or None)
    p = out / f"{name}-lora-F16.gguf"
    say(f"converting adapter {src} -> {p.name} (llama.cpp convert_lora_to_gguf, base {base})")
    convert_lora(src, base, p, "F16", source_model=str(cfg.model))
    g = read(p)
    fields, tensors = g.fields, g.tensors
    checks = {"general_type_adapter": fields.get("general.type") == "adapter",
              "adapter_type_lora": fields.get("adapter.type") == "lora",
              "lora_tensor_pairs": sum(t["name"].endswith(".lora_a") for t in tensors)}
    checks["ok"] = checks["general_type_adapter"] and checks["adapter_type_lora"] and checks["lora_tensor_pairs"] > 0
    return [{"path": str(p), "type": "gguf-lora-F16", "size_bytes": p.stat().st_size, "base": str(base),
             "lora_alpha": fields.get("adapter.lora.alpha"), "checks": checks}]


def _onnx_child(cfg: ExportConfig, hf_dir: Path, out: Path, name: str) -> list[dict]:
    """_onnx in a child process (run_isolated); its progress goes to stderr."""
    import sys

    return _onnx(cfg, hf_dir, out, name, [], lambda m: print(m, file=sys.stderr, flush=True))


EXPORTERS: dict[str, Callable] = {"gguf": _gguf, "onnx": _onnx, "ollama": _ollama, "gguf_lora": _gguf_lora}


# ---------------------------------------------------------------- run


def is_adapter_dir(p: Path) -> bool:
    return p.is_dir() and (p / "adapter_config.json").is_file()


def _estimate_bytes(cfg: ExportConfig, hf_dir: Path) -> int:
    from edgesmith.facts import facts

    per = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "int8": 1.1, "int4": 0.7}  # bytes per parameter
    g = sum(per.get(t.upper(), 1.1) for t in cfg.gguf) + (per[cfg.base.upper()] if cfg.gguf else 0)
    o = (per["F32"] + sum(per[q] for q in cfg.onnx_quant)) if (cfg.onnx or cfg.onnx_quant) else 0
    return int(facts(hf_dir).params_total * (g + o))


def failed_checks(checks: dict, prefix: str = "") -> list[str]:
    """Dotted names of every check that is False (nested dicts included)."""
    bad = []
    for k, v in checks.items():
        if isinstance(v, dict):
            bad += failed_checks(v, f"{prefix}{k}.")
        elif v is False:
            bad.append(prefix + k)
    return bad


def run(cfg: ExportConfig, say: Callable[[str], None] = print) -> Path:
    """Export cfg.model into cfg.out; return the output directory (export.json inside lists every file)."""
    from edgesmith import modelio
    from edgesmith.facts import facts, width_warnings
    from edgesmith.hfdir import check_hf_dir

    t0 = time.perf_counter()
    created = not Path(cfg.out).expanduser().exists()  # a refused model must not leave an empty folder behind
    out = ensure_writable_dir(Path(cfg.out).expanduser()).resolve()
    src = Path(str(cfg.model)).expanduser()
    name = cfg.name or modelio.model_name(cfg.model)
    merged_tmp = None
    try:
        if is_adapter_dir(src) and not (cfg.gguf or cfg.onnx or cfg.onnx_quant):
            # only the adapter itself is exported (--gguf-lora --gguf none): nothing to merge
            hf_dir = modelio.resolve(cfg.adapter_base) if cfg.adapter_base else None
            from .gguf_convert import adapter_base_dir

            hf_dir = hf_dir or adapter_base_dir(src)
            source = f"{src} (LoRA adapter of {hf_dir})"
        elif is_adapter_dir(src):
            from edgesmith.finetune.merge import merge_adapter

            merged_tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=out))
            say(f"merging adapter {src} into its base (float32) before export")
            hf_dir = merge_adapter(src, merged_tmp / "model", base=cfg.adapter_base or None, dtype="float32")
            source = f"{src} (adapter merged into {cfg.adapter_base or 'its recorded base'})"
        else:
            hf_dir = modelio.resolve(cfg.model)
            check_hf_dir(hf_dir)
            source = str(cfg.model)
        check_free_space(out, _estimate_bytes(cfg, hf_dir), f"exporting {name}")
        for w in width_warnings(facts(hf_dir)):
            say(f"note: {w}")
        entries: list[dict] = []
        onnx_job = None
        if cfg.jobs > 1 and cfg.gguf and (cfg.onnx or cfg.onnx_quant):
            # the ONNX half runs in a child process (a thread would starve: torch tracing and protobuf hold
            # the GIL for long stretches) while this process drives the GGUF half, itself mostly child
            # processes (converter, quantiser, llama.cpp checks): on 2 cores neither keeps both busy alone
            from concurrent.futures import ThreadPoolExecutor

            from edgesmith.native import run_isolated

            pool = ThreadPoolExecutor(max_workers=1)
            onnx_job = pool.submit(run_isolated, _onnx_child, cfg, hf_dir, out, name, what="the ONNX export")
            pool.shutdown(wait=False)
        try:
            for kind, fn in EXPORTERS.items():
                if kind == "onnx" and onnx_job is not None:
                    entries += onnx_job.result()
                else:
                    entries += fn(cfg, hf_dir, out, name, entries, say)
        finally:
            if onnx_job is not None:
                onnx_job.exception()  # never leave the ONNX thread writing after an error in the GGUF half
    finally:
        if merged_tmp is not None:
            shutil.rmtree(merged_tmp, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    for e in entries:  # paths relative to DIR: the directory can be moved or copied to a device
        p = Path(e["path"]).resolve()
        e["path"] = str(p.relative_to(out)) if p.is_relative_to(out) else str(p)
        e["failed_checks"] = failed_checks(e.get("checks", {}))
    report = {
        "name": name,
        "model": source,
        "hf_dir": str(hf_dir) if merged_tmp is None else None,
        "edgesmith_version": __version__,
        "recipe_hash": cfg.recipe_hash or None,
        "settings": {k: getattr(cfg, k) for k in ("gguf", "base", "onnx", "onnx_quant", "modelfile", "imatrix", "check")},
        "files": entries,
        "all_checks_ok": not any(e["failed_checks"] for e in entries),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "export.json", report)
    return out
