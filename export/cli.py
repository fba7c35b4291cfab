"""`edgesmith export MODEL --out DIR [--gguf F16,Q4_0,Q4_K_M,Q5_K_M,Q8_0] [--onnx [--onnx-quant int8,int4]]
[--modelfile] [--name NAME] [--imatrix CALIB] [--gguf-lora]`: GGUF files (llama.cpp's converter and quantiser),
ONNX with KV cache, Ollama Modelfiles, and DIR/export.json with every file's size, type and checks."""
from __future__ import annotations

import argparse
import json
import sys


DEFAULT_GGUF = "F16,Q4_0,Q4_K_M,Q5_K_M,Q8_0"
# exporter (export/run.py EXPORTERS) -> the flag that turns it on
EXPORTER_FLAGS = {"gguf": "--gguf", "onnx": "--onnx", "ollama": "--modelfile", "gguf_lora": "--gguf-lora"}


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


# flags written by hand: the positional model, --out, and the two lists given as CSV; recipe_hash is set by `edgesmith run`
CUSTOM = ("model", "out", "gguf", "onnx_quant", "recipe_hash")


def config_from_args(args):
    from edgesmith.config import config_from_args as from_args

    from .run import ExportConfig

    given = {"model": args.model, "out": args.out, "onnx_quant": _csv(args.onnx_quant) if args.onnx_quant else None,
             "gguf": None if args.gguf is None else [] if args.gguf.strip().lower() in ("", "none") else _csv(args.gguf)}
    return from_args(ExportConfig, args, given)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def render_table(report: dict) -> str:
    """One row per file: size, bits per weight, tensor types, fallbacks, checks."""
    rows = [("file", "type", "MiB", "bpw", "tensor types", "fallbacks", "checks")]
    for e in report["files"]:
        g = e.get("gguf") or {}
        types = ", ".join(f"{k}x{v}" for k, v in list(g.get("tensor_types", {}).items())[:4]) or "-"
        fb = g.get("fallbacks")
        fbs = "-" if fb is None else (f"{fb['count']} (w {','.join(map(str, fb['widths']))})" if fb["count"] else "0")
        failed = e.get("failed_checks", [])
        checks = "ok" if not failed else "FAIL: " + ", ".join(failed)
        bpw = f"{g['bits_per_weight']:.2f}" if "bits_per_weight" in g else "-"
        rows.append((e["path"], e["type"], _mib(e["size_bytes"]), bpw, types, fbs, checks))
    w = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(str(c).ljust(w[i]) if i < len(w) else str(c) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w) + "  ------")
    return "\n".join(lines)


def cmd_export(args) -> int:
    from .run import run

    cfg = config_from_args(args)
    out = run(cfg, say=lambda m: print(m, file=sys.stderr))
    report = json.loads((out / "export.json").read_text())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_table(report))
        print(f"\n{len(report['files'])} files in {out} ({report['seconds']:.0f}s); details: {out / 'export.json'}")
    if not report["all_checks_ok"]:
        print("edgesmith export: warning: some checks failed (see the table / export.json)", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export GGUF (F16 + llama.cpp quants), ONNX with KV cache, Ollama Modelfiles",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from edgesmith.config import add_config_args

    from .run import ExportConfig

    p.add_argument("model", nargs="?", default=None,
                   help="HF model directory, 'default', or a LoRA adapter directory (merged in float32 first); default: "
                        "the recipe's, else 'default'")
    p.add_argument("--out", default=None, help="output directory (default: the recipe's, else out/export)")
    p.add_argument("--gguf", default=None, metavar="TYPES",
                   help=f"comma-separated GGUF types: F16/BF16/F32 and any llama.cpp quant (default {DEFAULT_GGUF}; 'none' to skip)")
    p.add_argument("--onnx-quant", metavar="Q", default=None, help="ONNX weight quantisations: int8,int4 (into OUT/onnx-int8/ ...)")
    add_config_args(p, ExportConfig, skip=CUSTOM)  # --recipe, --set, --onnx, --modelfile, --name, --imatrix, --jobs, ...
    p.add_argument("--json", action="store_true", help="print export.json instead of the table")
    p.set_defaults(func=cmd_export)
