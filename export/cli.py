"""`edgesmith export MODEL --out DIR [--gguf F16,Q4_0,Q4_K_M,Q5_K_M,Q8_0] [--onnx [--onnx-quant int8,int4]]
[--modelfile] [--name NAME] [--imatrix CALIB] [--gguf-lora]`: GGUF files (llama.cpp's converter and quantiser),
ONNX with KV cache, Ollama Modelfiles, and DIR/export.json with every file's size, type and checks."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgesmith.errors import EdgesmithError

DEFAULT_GGUF = "F16,Q4_0,Q4_K_M,Q5_K_M,Q8_0"
# exporter (export/run.py EXPORTERS) -> the flag that turns it on
EXPORTER_FLAGS = {"gguf": "--gguf", "onnx": "--onnx", "ollama": "--modelfile", "gguf_lora": "--gguf-lora"}


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def config_from_args(args):
    from .run import ExportConfig

    gguf = [] if args.gguf.strip().lower() in ("", "none") else _csv(args.gguf)
    try:
        return ExportConfig(
            model=args.model, out=args.out, name=args.name or "", gguf=gguf, base=args.base,
            onnx=args.onnx, onnx_quant=_csv(args.onnx_quant or ""), modelfile=args.modelfile,
            gguf_lora=args.gguf_lora, imatrix=args.imatrix or "", adapter_base=args.adapter_base or "", check=not args.no_check,
            threads=args.threads, jobs=args.jobs,
        )
    except EdgesmithError as e:  # ConfigError "gguf: unknown GGUF type ..." -> drop the key for the CLI
        raise EdgesmithError(getattr(e, "detail", str(e))) from None


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
    p.add_argument("model", help="HF model directory, 'default', or a LoRA adapter directory (merged in float32 first)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--gguf", default=DEFAULT_GGUF, metavar="TYPES",
                   help=f"comma-separated GGUF types: F16/BF16/F32 and any llama.cpp quant (default {DEFAULT_GGUF}; 'none' to skip)")
    p.add_argument("--base", default="F16", choices=["F16", "BF16", "F32"], help="float GGUF the quants are made from (default F16)")
    p.add_argument("--onnx", action="store_true", help="also export ONNX (fp32, KV cache) to OUT/onnx/")
    p.add_argument("--onnx-quant", metavar="Q", default="", help="ONNX weight quantisations: int8,int4 (into OUT/onnx-int8/ ...)")
    p.add_argument("--modelfile", action="store_true", help="write an Ollama Modelfile per GGUF file (OUT/Modelfile.<TYPE>)")
    p.add_argument("--name", help="file name stem (default: the model's name, e.g. smollm2-135m-instruct)")
    p.add_argument("--imatrix", metavar="CALIB", help="calibration text (an importance matrix is computed) or a llama.cpp imatrix file")
    p.add_argument("--gguf-lora", action="store_true",
                   help="MODEL is a LoRA adapter: also write it as OUT/NAME-lora-F16.gguf (llama.cpp --lora, Ollama ADAPTER); "
                        "with --gguf none only the adapter is converted")
    p.add_argument("--adapter-base", help="base model of a LoRA adapter MODEL (default: the one recorded in the adapter)")
    p.add_argument("--threads", type=int, default=0, help="threads for quantising and checks (default: all cores)")
    p.add_argument("--jobs", type=int, default=2,
                   help="run the GGUF and ONNX halves side by side and this many quantisations at a time (default 2; 1 = sequential)")
    p.add_argument("--no-check", action="store_true", help="skip the llama.cpp / onnxruntime fidelity checks")
    p.add_argument("--json", action="store_true", help="print export.json instead of the table")
    p.set_defaults(func=cmd_export)
