"""What `edgesmith export --imatrix CALIB` buys: WikiText-2 perplexity of the default model's Q4_0 and
Q4_K_M GGUF files quantised without and with an importance matrix, next to F16.

    nice -n 10 .venv/bin/python studies/imatrix_effect.py [--windows 20] [--calib-chunks 32] [--threads 2]

- Evaluation: the first `--windows` non-overlapping 512-token windows of wiki.test.raw (the whole file
  tokenised once by the HF tokenizer; scored like llama-perplexity: the second half of every window).
- Calibration: text from the second half of the same file, which starts well after the last evaluation
  token (the script checks that the two character ranges are disjoint); `--imatrix` computes the mean of
  x^2 per input column of every linear layer over `--calib-chunks` x 512 tokens of it.
- Every file is exported by `edgesmith.export.gguf.export_gguf` (llama.cpp converter + quantiser, the
  same code `edgesmith export` runs) and scored by llama.cpp itself in a child process.

Writes studies/results/imatrix-effect.json and .md. CPU heavy (~5 min on 2 cores): run it alone.
"""
from __future__ import annotations

import argparse
import math
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
CTX = 512


def perplexity(path: Path, windows: list[list[int]], threads: int) -> float:
    """llama-perplexity style: mean NLL of the second half of every window, from llama.cpp's logits."""
    import numpy as np

    from edgesmith import llamacpp
    from edgesmith.native import run_isolated

    r = run_isolated(llamacpp.score, str(path), windows, threads, what=f"llama.cpp perplexity of {path.name}")
    nll = np.concatenate([np.asarray(w["nll"])[CTX // 2:] for w in r])  # nll[t] scores token t+1 (as llama-perplexity)
    return round(math.exp(float(nll.mean())), 4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=20, help="512-token WikiText-2 evaluation windows")
    ap.add_argument("--calib-chunks", type=int, default=32, help="512-token calibration chunks for the imatrix")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "imatrix-effect.json"))
    args = ap.parse_args(argv)

    from edgesmith.export import gguf as G
    from edgesmith.export.gguf_checks import hf_tokenizer
    from edgesmith.export.imatrix import compute_imatrix
    from edgesmith.fsutil import write_json, write_text
    from edgesmith.modelio import resolve

    t_start = time.perf_counter()
    hf = resolve("default")
    tok = hf_tokenizer(hf)
    wiki = DATA / "lm" / "wikitext-2-raw" / "wiki.test.raw"
    text = wiki.read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i * CTX:(i + 1) * CTX] for i in range(args.windows)]
    eval_chars = len(tok.decode(ids[: args.windows * CTX]))   # the evaluation text is text[:eval_chars]
    calib_start = len(text) // 2
    assert calib_start > eval_chars, "calibration text would overlap the evaluation windows"

    res: dict = {
        "command": "nice -n 10 .venv/bin/python studies/imatrix_effect.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "default (SmolLM2-135M-Instruct, from its Q4_1 GGUF, materialised fp32)",
        "eval": f"wiki.test.raw, first {args.windows} x {CTX}-token windows (characters 0..{eval_chars}), "
                "llama-perplexity scoring (second half of each window)",
        "calibration": f"wiki.test.raw characters {calib_start}..{len(text)} (disjoint from the evaluation text), "
                       f"{args.calib_chunks} x {CTX} tokens",
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                    "load_average_at_start": round(os.getloadavg()[0], 2)},
    }
    with tempfile.TemporaryDirectory(prefix="imatrix-effect-") as d:
        root = Path(d)
        calib = root / "calib-wikitext-second-half.txt"
        calib.write_text(text[calib_start:], encoding="utf-8")
        quiet = lambda m: None  # noqa: E731
        plain = G.export_gguf(hf, root / "plain", "m", ["F16", "Q4_0", "Q4_K_M"], check=False, threads=args.threads, say=quiet)
        t0 = time.perf_counter()
        # export_gguf computes the imatrix from the calibration text exactly like `--imatrix CALIB`
        imx_path = compute_imatrix(hf, calib, root / "m.imatrix.gguf", max_chunks=args.calib_chunks, say=print)
        imatrix_seconds = time.perf_counter() - t0
        with_imx = G.export_gguf(hf, root / "imatrix", "m", ["Q4_0", "Q4_K_M"], imatrix=imx_path, check=False,
                                 threads=args.threads, say=quiet)
        rows = {}
        for label, entries in (("", plain), ("+imatrix", with_imx)):
            for e in entries:
                q = e["type"][len("gguf-"):]
                p = perplexity(Path(e["path"]), windows, args.threads)
                rows[q + label] = {"ppl": p, "size_mib": round(e["size_bytes"] / 2**20, 2),
                                   "bits_per_weight": e["gguf"]["bits_per_weight"],
                                   "imatrix_entries": (e["gguf"].get("imatrix") or {}).get("entries")}
                print(f"{q + label:16s} ppl {p:.3f}", flush=True)
    f16 = rows["F16"]["ppl"]
    for r in rows.values():
        r["ppl_vs_F16_pct"] = round(100 * (r["ppl"] / f16 - 1), 2)
    res["imatrix_seconds"] = round(imatrix_seconds, 1)
    res["results"] = rows
    res["effect"] = {q: {"ppl_without": rows[q]["ppl"], "ppl_with": rows[q + "+imatrix"]["ppl"],
                         "gap_to_F16_closed_pct": round(100 * (rows[q]["ppl"] - rows[q + "+imatrix"]["ppl"])
                                                        / max(rows[q]["ppl"] - f16, 1e-9), 1)}
                     for q in ("Q4_0", "Q4_K_M")}
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    write_json(out, res)
    md = [f"# --imatrix effect on the default model (SmolLM2-135M-Instruct)", "",
          f"Command: `{res['command'].strip()}`", "", f"- Evaluation: {res['eval']}", f"- Calibration: {res['calibration']}",
          f"- imatrix computed in {res['imatrix_seconds']} s; whole run {res['seconds']} s on {os.cpu_count()} cores", "",
          "| file | WikiText-2 ppl | vs F16 | MiB | bits/weight |", "|---|---|---|---|---|"]
    for q, r in rows.items():
        md.append(f"| {q} | {r['ppl']:.3f} | {r['ppl_vs_F16_pct']:+.2f}% | {r['size_mib']} | {r['bits_per_weight']} |")
    md += ["", "| quant | without imatrix | with imatrix | share of the gap to F16 closed |", "|---|---|---|---|"]
    for q, r in res["effect"].items():
        md.append(f"| {q} | {r['ppl_without']:.3f} | {r['ppl_with']:.3f} | {r['gap_to_F16_closed_pct']}% |")
    write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
