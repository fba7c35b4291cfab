"""Speed of `edgesmith export` on the default model (SmolLM2-135M-Instruct).

    .venv/bin/python studies/export_speed.py [--no-check | --both]

Times the full export the README shows (`make export`): GGUF F16 + Q4_0, Q4_K_M, Q5_K_M, Q8_0
(llama.cpp converter + quantiser), ONNX fp32 (KV cache) + int8, Modelfiles, with the default fidelity
checks on every file (llama.cpp load + tokenisation vs HF; ONNX greedy parity with HF fp32). Per-file
seconds (conversion/quantisation + that file's checks) come from export.json. `--both` also times the
same export with --no-check, so the cost of the checks is visible. Target: under 2 minutes on 2 cores.
What --imatrix buys is measured by studies/imatrix_effect.py.

Writes studies/results/export-speed.json. CPU heavy: run it alone (the load average is recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from edgesmith.fsutil import data_dir

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA = data_dir() or REPO.parent / "shared" / "data"
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-check", action="store_true", help="time the export without the fidelity checks")
    ap.add_argument("--both", action="store_true", help="time the export with and without the checks")
    ap.add_argument("--json", default=str(RESULTS / "export-speed.json"))
    args = ap.parse_args(argv)
    result = {"command": "nice -n 10 .venv/bin/python studies/export_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": "default (SmolLM2-135M-Instruct)", "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="export-bench-") as d:
        result["export"] = time_export(Path(d) / "export", check=not args.no_check)
        print(json.dumps(result["export"], indent=2))
        if args.both and not args.no_check:
            result["export_no_check"] = time_export(Path(d) / "export-no-check", check=False)
            print(json.dumps(result["export_no_check"], indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    from edgesmith.fsutil import write_json

    write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
