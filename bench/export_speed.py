"""Speed of `edgesmith export` on the default model (SmolLM2-135M-Instruct), and what --imatrix buys.

    .venv/bin/python bench/export_speed.py [--no-check] [--imatrix-effect] [--windows 4]

1. Times the full export the README shows (`make export`): GGUF F16 + Q4_0, Q4_K_M, Q5_K_M, Q8_0
   (llama.cpp converter + quantiser), ONNX fp32 (KV cache) + int8, Modelfiles, with the default
   fidelity checks on every file (llama.cpp load + tokenisation vs HF; ONNX parity). Per-file
   seconds come from export.json. Target: under 2 minutes on 2 cores.
2. --imatrix-effect: WikiText-2 perplexity of Q4_0 / Q4_K_M quantised without and with an
   importance matrix (computed by `--imatrix` from calibration text that is NOT the evaluation text:
   the Alpaca demo answers), next to F16, on the same 512-token windows of wiki.test.raw.

Writes bench/results/export-speed.json. CPU heavy: run it alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA = Path(os.environ.get("EDGESMITH_DATA", REPO.parent / "shared" / "data"))
TARGET_SECONDS = 120


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average_at_start": round(os.getloadavg()[0], 2)}


def time_export(out: Path, check: bool) -> dict:
    from edgesmith.export.run import ExportConfig, run

    cfg = ExportConfig(model="default", out=str(out), gguf=["F16", "Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0"],
                       onnx=True, onnx_quant=["int8"], modelfile=True, check=check)
    t0, c0 = time.perf_counter(), os.times()
    run(cfg, say=lambda m: print(m, file=sys.stderr))
    wall = time.perf_counter() - t0
    c1 = os.times()
    rep = json.loads((out / "export.json").read_text())
    return {
        "command": "edgesmith export default --out DIR --gguf F16,Q4_0,Q4_K_M,Q5_K_M,Q8_0 --onnx --onnx-quant int8 --modelfile"
                   + ("" if check else " --no-check"),
        "checks": check,
        "wall_seconds": round(wall, 1),
        # children (converter, quantiser, checks) included: CPU seconds spent by the whole export
        "cpu_seconds": round((c1.user + c1.system + c1.children_user + c1.children_system)
                             - (c0.user + c0.system + c0.children_user + c0.children_system), 1),
        "target_seconds": TARGET_SECONDS,
        "under_target": wall < TARGET_SECONDS,
        "load_average_after": round(os.getloadavg()[0], 2),
        "files": [{"path": e["path"], "type": e["type"], "size_mib": round(e["size_bytes"] / 2**20, 1),
                   "seconds": e.get("checks", {}).get("seconds"), "failed_checks": e["failed_checks"]} for e in rep["files"]],
        "all_checks_ok": rep["all_checks_ok"],
    }


def imatrix_effect(root: Path, n_windows: int) -> dict:
    import numpy as np

    from edgesmith.export import gguf as G
    from edgesmith.modelio import resolve
    from edgesmith.native import run_isolated

    hf = resolve("default")
    calib = root / "calib-alpaca.txt"
    rows = json.loads((DATA / "instruct" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    calib.write_text("\n\n".join(f"{r['instruction']}\n{r['input']}\n{r['output']}".strip() for r in rows), encoding="utf-8")
    tok = G.hf_tokenizer(hf)
    ids = tok((DATA / "lm/wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")[:400_000], add_special_tokens=False)["input_ids"]
    windows = [ids[i * 512:(i + 1) * 512] for i in range(n_windows)]
    plain = G.export_gguf(hf, root / "plain", "m", ["F16", "Q4_0", "Q4_K_M"], check=False, say=lambda m: None)
    t0 = time.perf_counter()
    imx = G.export_gguf(hf, root / "imatrix", "m", ["Q4_0", "Q4_K_M"], imatrix=calib, check=False, say=lambda m: None)
    imatrix_seconds = time.perf_counter() - t0

    def ppl(path: str) -> float:
        r = run_isolated(G.llama_score, path, windows, what="llama.cpp perplexity")
        return round(math.exp(float(np.mean(np.concatenate([w["nll"] for w in r])))), 3)

    res = {"eval": f"WikiText-2 test, {n_windows} x 512-token windows", "calibration": "alpaca_en_demo.json (999 rows)",
           "seconds_export_with_imatrix": round(imatrix_seconds, 1), "ppl": {}}
    for e in plain:
        res["ppl"][e["type"][5:]] = ppl(e["path"])
    for e in imx:
        if e["type"].startswith("gguf-"):
            res["ppl"][e["type"][5:] + "+imatrix"] = ppl(e["path"])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-check", action="store_true", help="time the export without the fidelity checks")
    ap.add_argument("--imatrix-effect", action="store_true", help="also measure Q4_0/Q4_K_M perplexity with/without imatrix")
    ap.add_argument("--windows", type=int, default=4, help="512-token WikiText windows for --imatrix-effect")
    ap.add_argument("--json", default=str(RESULTS / "export-speed.json"))
    args = ap.parse_args(argv)
    result = {"model": "default (SmolLM2-135M-Instruct)", "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="export-bench-") as d:
        result["export"] = time_export(Path(d) / "export", check=not args.no_check)
        print(json.dumps(result["export"], indent=2))
        if args.imatrix_effect:
            result["imatrix_effect"] = imatrix_effect(Path(d), args.windows)
            print(json.dumps(result["imatrix_effect"], indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    from edgesmith.fsutil import write_json

    write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
