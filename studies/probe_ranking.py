"""Does a short distillation probe rank pruned shapes better than the loss right after the cut?

    .venv/bin/python studies/probe_ranking.py [--target 97M] [--finalists 3] [--probe-steps 30] [--steps 60]

1. `edgesmith prune default --target-params TARGET --probe-steps P`: the search's shapes with their calibration loss
   right after the cut, and the finalists' loss after P distillation steps (compress/probe.py).
2. Every finalist pruned alone at its shape, then distilled from the teacher for the same fixed number of steps
   (`--steps`, not a time budget: the comparison must not depend on how busy the machine was), on Alpaca
   instructions from ../shared/data, and its WikiText-2 perplexity measured by `edgesmith bench` (HF, 10 windows).
3. Which ranking (right after the cut, after the probe) puts the shapes in the order of their perplexity after
   recovery -> studies/results/probe-ranking.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ES = [sys.executable, "-m", "edgesmith"]


def sh(*args) -> None:
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run(list(map(str, args)), check=True, cwd=REPO)


def ranks(xs: list[float]) -> list[int]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0] * len(xs)
    for k, i in enumerate(order):
        r[i] = k + 1
    return r


def spearman(a: list[float], b: list[float]) -> float | None:
    n = len(a)
    if n < 2:
        return None
    ra, rb = ranks(a), ranks(b)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="97M")
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--finalists", type=int, default=3)
    ap.add_argument("--probe-steps", type=int, default=30)
    ap.add_argument("--steps", type=int, default=60, help="distillation steps per finalist after pruning")
    ap.add_argument("--rows", type=int, default=None, help="recover only the first N finalists (the rest are listed, unmeasured)")
    ap.add_argument("--work", default="out/study-probe")
    ap.add_argument("--out", default="studies/results/probe-ranking.json")
    a = ap.parse_args()
    work = REPO / a.work
    data = REPO.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
    t0 = time.time()
    if not (work / "search" / "prune_report.json").is_file():  # resumable: every finished step is kept under --work
        sh(*ES, "prune", "default", "--out", work / "search", "--target-params", a.target, "--search-candidates", a.candidates,
           "--probe-steps", a.probe_steps, "--probe-finalists", a.finalists)
    report = json.loads((work / "search" / "prune_report.json").read_text())
    rows = [r for r in report["search"] if "probe_loss" in r]
    for j, r in enumerate(rows[: a.rows]):
        d = r["dims"]
        s_dir, d_dir = work / f"s{j}", work / f"d{j}"
        if (work / f"b{j}.json").is_file():
            r["wikitext_ppl_after"] = json.loads((work / f"b{j}.json").read_text())["results"][0]["perplexity"]["value"]
            continue
        sh(*ES, "prune", "default", "--out", s_dir, "--num-layers", d["num_layers"], "--intermediate-size", d["intermediate_size"],
           "--num-attention-heads", d["num_attention_heads"], "--num-key-value-heads", d["num_key_value_heads"],
           "--hidden-size", d["hidden_size"], "--eval-windows", 0)
        sh(*ES, "distill", "--teacher", "default", "--student", s_dir, "--out", d_dir, "--data", data, "--max-steps", a.steps,
           "--batch-size", 8, "--max-length", 256, "--lr", 5e-4, "--warmup-steps", 5, "--seed", 0)
        sh(*ES, "bench", d_dir, "--max-chunks", 10, "--json", work / f"b{j}.json")
        r["wikitext_ppl_after"] = json.loads((work / f"b{j}.json").read_text())["results"][0]["perplexity"]["value"]
    done = [r for r in rows if r.get("wikitext_ppl_after") is not None]
    calib, probe, after = ([r[k] for r in done] for k in ("calib_loss", "probe_loss", "wikitext_ppl_after"))
    pick = lambda key: min(rows, key=lambda r: r[key])["dims"]  # noqa: E731
    doc = {"target_params": a.target, "probe_steps": a.probe_steps, "distill_steps": a.steps, "data": str(data.name),
           "search": report["search"],
           "rows": [{k: r.get(k) for k in ("dims", "params", "calib_loss", "probe_loss", "probe_kl_first", "probe_kl_last",
                                           "probe_seconds", "wikitext_ppl_after", "chosen")} for r in rows],
           "recovered": f"{len(done)} of {len(rows)} finalists",
           "spearman_calib_vs_after": spearman(calib, after), "spearman_probe_vs_after": spearman(probe, after),
           "best_after": min(done, key=lambda r: r["wikitext_ppl_after"])["dims"] if len(done) == len(rows) else None,
           "chosen_by_calib": pick("calib_loss"), "chosen_by_probe": pick("probe_loss"),
           "seconds": round(time.time() - t0)}
    out = REPO / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    fmt = lambda d: f"{d['num_layers']} / {d['hidden_size']} / {d['intermediate_size']} / {d['num_attention_heads']}:{d['num_key_value_heads']}"  # noqa: E731
    md = [f"# Probe ranking: {a.target} shapes of SmolLM2-135M-Instruct", "",
          f"The {len(rows)} best shapes right after the cut (of {a.candidates} searched), each probed for {a.probe_steps} "
          f"distillation steps (compress/probe.py), then pruned alone and distilled for {a.steps} steps (Alpaca, batch 8x256, "
          "lr 5e-4) and measured on WikiText-2 (10 windows, HF).", "",
          "| shape (layers / hidden / MLP / heads) | params | loss after cut | loss after probe | WikiText ppl after recovery |",
          "|---|---|---|---|---|"]
    md += [f"| {fmt(r['dims'])} | {r['params'] / 1e6:.1f}M | {r['calib_loss']:.3f} | {r['probe_loss']:.3f} | "
           + (f"{r['wikitext_ppl_after']:.2f} |" if r.get("wikitext_ppl_after") is not None else "not measured |") for r in rows]
    sc, sp = doc["spearman_calib_vs_after"], doc["spearman_probe_vs_after"]
    md += [""]
    if sc is not None:
        md += [f"Rank correlation with perplexity after recovery: loss after the cut {sc:+.2f}, loss after the probe {sp:+.2f}; "
               f"best after recovery: {fmt(doc['best_after']) if doc['best_after'] else '(not all recovered)'}."]
    else:
        md += [f"Only {doc['recovered']} recovered so far: which ranking predicts quality after recovery is not shown yet."]
    md += [f"Chosen by the loss after the cut: {fmt(doc['chosen_by_calib'])}; by the probe: {fmt(doc['chosen_by_probe'])}.", "",
           "Reproduce: `.venv/bin/python studies/probe_ranking.py` (resumable: finished steps are kept under --work; about 10 min "
           "per finalist on 2 quiet cores, plus 10 min for the probed search)."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
