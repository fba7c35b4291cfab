"""ONNX export of the real Gemma 3 270M: KV-cache parity with HF transformers past the 512-token sliding window, and
the size / perplexity / export time of the fp32, int8 and int4 exports -> studies/results/gemma3-270m-onnx.json.

    .venv/bin/python studies/gemma3_onnx.py [--hf-dir DIR] [--work /tmp/onnx270m] [--prompt-tokens 800]
                                            [--new-tokens 32] [--chunks 10] [--threads 1] [--clean]

What it measures (everything through the project's own code: `export_onnx`, `OnnxLM`, `hf_greedy`, the bench's
backends and perplexity arithmetic):

1. Exports. `export_onnx(hf_dir, work/onnx)` (fp32, KV cache), then int8 and int4 from that fp32 export
   (`fp32_dir=`), each with check=False so the wall time is the export/quantisation alone (the measurements below
   are stricter than the built-in checks). Model bytes (`onnx_model_bytes`), ratio to fp32 and the issue's target
   (`MAX_SIZE_RATIO`: int8 < 0.40, int4 < 0.25), with the 262144 x 640 embedding included.
2. Parity past the window (Gemma 3: `sliding_window` 512 on 5 of every 6 layers). A WikiText-2 test prompt of
   --prompt-tokens tokens (BOS + text from an article after the perplexity windows):
   - prefill: HF fp32 logits vs onnxruntime fp32 logits at every position: max |diff| overall, at positions
     >= sliding_window, at the last 8 positions; top-1 agreement overall and past the window. As a yardstick of how
     much the window matters: the same HF model with the window disabled vs with it, at positions >= the window.
   - the cache across the window: ONNX prefill of the first window-64 tokens, then one-token steps through the
     cache up to window+64, vs HF's full-prompt logits at the same positions.
   - decoding: `hf_greedy` (HF fp32, its KV cache) vs `OnnxLM.generate` (ONNX KV cache) for --new-tokens tokens from
     the whole prompt: identical or the first divergence; and, teacher-forced on HF's tokens, the max |diff| of the
     per-step logits through both caches.
3. Perplexity of HF fp32 and each ONNX export on WikiText-2 test, the bench's method (bench/metrics.py: the first
   --chunks windows of --ctx tokens, BOS first, second half scored), with KL(HF fp32 || export) and top-1 agreement
   with HF fp32 at the scored positions.

Resumable: exports already in --work (with their provenance) and timed in the results JSON are reused (--reexport to
redo them). CPU heavy and ~1-2 GB per fp32 logits pass: run it alone; --clean deletes --work at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "studies" / "results" / "gemma3-270m-onnx.json"
HF_DIR = Path.home() / ".cache" / "edgesmith" / "models" / "gemma-3-270m-q4-k-m-82f9af4a92d21cee"
VARIANTS = {"fp32": None, "int8": "int8", "int4": "int4"}
PROMPT_ARTICLE = " = Dick Rifenburg = "  # a WikiText-2 test article well after the perplexity windows


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def wikitext() -> str:
    """wiki.test.raw joined the usual way (GPTQ/SparseGPT/Wanda: blank lines -> "", rows joined by blank lines)."""
    from edgesmith.fsutil import data_dir

    d = data_dir()
    if d is None:
        raise SystemExit("../shared/data not found (needs lm/wikitext-2-raw/wiki.test.raw)")
    raw = (d / "lm" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    return "\n\n".join("" if not r.strip() else r for r in raw.split("\n"))


# ---------------------------------------------------------------- exports


def exports(args, res: dict, save) -> dict[str, Path]:
    from edgesmith.export.onnx import MAX_SIZE_RATIO, PROVENANCE, export_onnx, onnx_model_bytes

    work, hf_dir = Path(args.work), Path(args.hf_dir)
    work.mkdir(parents=True, exist_ok=True)
    dirs = {v: work / ("onnx" if q is None else f"onnx-{q}") for v, q in VARIANTS.items()}
    ex = res.setdefault("exports", {})
    for v, q in VARIANTS.items():
        d = dirs[v]
        if not args.reexport and (d / PROVENANCE).is_file() and "export_s" in ex.get(v, {}):
            print(f"[{v}] reusing {d}", flush=True)
            continue
        free = shutil.disk_usage(work).free
        if free < 8 * 2**30 + 2 * 2**30:
            raise SystemExit(f"{work}: only {free / 2**30:.1f} GiB free; want > 10 GiB before an export")
        print(f"[{v}] export_onnx -> {d}", flush=True)
        l0, t = load1(), time.perf_counter()
        entry = export_onnx(hf_dir, d, quant=q, check=False, fp32_dir=None if q is None else dirs["fp32"],
                            threads=args.threads)
        rec = {"export_s": round(time.perf_counter() - t, 1), "load_1m_before": l0, "load_1m_after": load1(),
               "from": "HF dir (optimum-onnx)" if q is None else "the fp32 export above (quantisation only)"}
        rec.update({k: entry["checks"][k] for k in ("method", "untied_lm_head") if k in entry["checks"]})
        ex[v] = rec
        save()
    fp32 = onnx_model_bytes(dirs["fp32"])
    # the fp32 weights once (HF safetensors, embedding tied to lm_head): the export may hold the table twice
    hf_bytes = sum(p.stat().st_size for p in hf_dir.iterdir() if p.suffix == ".safetensors")
    res["hf_fp32_weights_bytes"] = hf_bytes
    res["fp32_export_vocab_tables"] = _vocab_tables(dirs["fp32"] / "model.onnx", *res["embedding"])
    for v, q in VARIANTS.items():
        b = onnx_model_bytes(dirs[v])
        ex[v].update({"model_bytes": b, "model_mib": round(b / 2**20, 1), "dir_bytes": _dir_bytes(dirs[v]),
                      "ratio_vs_fp32": round(b / fp32, 4), "ratio_vs_hf_fp32_weights": round(b / hf_bytes, 4)})
        if q:
            ex[v].update({"target_ratio": MAX_SIZE_RATIO[q], "target_met": b / fp32 < MAX_SIZE_RATIO[q],
                          "target_met_vs_hf_fp32_weights": b / hf_bytes < MAX_SIZE_RATIO[q]})
    save()
    return dirs


def _vocab_tables(model: Path, vocab: int, hidden: int) -> list[dict]:
    """Initializers of the fp32 graph shaped like the embedding or its transpose (2 = lm_head stored untied)."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    return [{"name": t.name, "dims": list(t.dims), "mib": round(vocab * hidden * 4 / 2**20, 1)}
            for t in m.graph.initializer if sorted(t.dims) == sorted([vocab, hidden])]


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


# ---------------------------------------------------------------- parity past the sliding window


def _diff_stats(ref: np.ndarray, got: np.ndarray, window: int) -> dict:
    # ref, got: [T, vocab] logits of the same positions
    d = np.abs(ref - got).max(-1)  # [T]
    top = ref.argmax(-1) == got.argmax(-1)
    past = slice(window, None)
    return {"max_abs_diff": float(d.max()), "max_abs_diff_past_window": float(d[past].max()) if len(d) > window else None,
            "max_abs_diff_last8": float(d[-8:].max()), "mean_abs_diff_past_window": float(np.abs(ref - got)[past].mean()) if len(d) > window else None,
            "top1_agreement": round(float(top.mean()), 4),
            "top1_agreement_past_window": round(float(top[past].mean()), 4) if len(d) > window else None,
            "positions": len(d), "positions_past_window": max(0, len(d) - window),
            "max_abs_logit_hf": float(np.abs(ref).max())}


def parity(args, fp32_dir: Path, res: dict, save) -> None:
    import torch

    from edgesmith.export.onnx import _hf_model, hf_greedy
    from edgesmith.export.onnx_runtime import OnnxLM

    torch.set_num_threads(args.threads)
    lm = OnnxLM(fp32_dir, threads=args.threads)
    window = int(lm.config["sliding_window"])
    text = wikitext()
    start = text.index(PROMPT_ARTICLE)
    ids = lm.tokenize(text[start:])[: args.prompt_tokens]  # tokenizer.json adds BOS
    assert len(ids) == args.prompt_tokens and ids[0] == lm.config["bos_token_id"], (len(ids), ids[:2])
    if args.prompt_tokens <= window + 8:
        raise SystemExit(f"--prompt-tokens {args.prompt_tokens}: must exceed the sliding window {window} to test it")
    model = _hf_model(Path(args.hf_dir))  # the same cached fp32 model hf_greedy uses
    p = {"prompt": f"WikiText-2 test from {PROMPT_ARTICLE.strip()!r}, BOS + {len(ids) - 1} tokens",
         "prompt_tokens": len(ids), "prompt_text_start": lm.decode(ids[:24]),
         "sliding_window": window, "layer_types": _count(lm.config.get("layer_types", [])),
         "hf_attn_implementation": getattr(model.config, "_attn_implementation", None)}

    print(f"[parity] prefill of {len(ids)} tokens: HF fp32 vs onnxruntime fp32", flush=True)
    with torch.inference_mode():
        hf = model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
    t = time.perf_counter()
    ox = lm.logits(ids)
    p["onnx_prefill_s"] = round(time.perf_counter() - t, 2)
    p["prefill"] = _diff_stats(hf, ox, window)
    del ox
    # yardstick: what ignoring the window would do (HF with the window made longer than the prompt)
    sw = model.config.sliding_window
    try:
        model.config.sliding_window = 10 * len(ids)
        with torch.inference_mode():
            full = model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
    finally:
        model.config.sliding_window = sw
    y = np.abs(full[window:] - hf[window:]).max(-1)
    p["yardstick_hf_without_window_vs_with"] = {
        "max_abs_diff_past_window": float(y.max()),
        "top1_agreement_past_window": round(float((full[window:].argmax(-1) == hf[window:].argmax(-1)).mean()), 4),
        "note": "HF fp32 with sliding_window set past the prompt vs the real model: how far off an export that "
                "ignored the window would be"}
    del full
    save()

    print("[parity] ONNX cache across the window: prefill, then one-token steps", flush=True)
    a, b = window - 64, min(window + 64, len(ids))
    lg, past = lm._step(ids[:a], lm._empty_past(), 0)
    rows = [lg[-1]]
    for i in range(a, b - 1):
        lg, past = lm._step([ids[i]], past, i)
        rows.append(lg[-1])
    # rows[k] = logits at position a-1+k
    p["cached_steps_across_window"] = {"prefill_tokens": a, "steps": b - a, "position_range": [a - 1, b - 2],
                                       **_diff_stats(hf[a - 1:b - 1], np.asarray(rows), window - (a - 1))}
    p["cached_steps_across_window"].pop("max_abs_diff_last8")
    p["past_shapes_after"] = sorted({tuple(int(x) for x in v.shape) for v in past.values()})
    del rows, past
    save()

    print(f"[parity] greedy {args.new_tokens} tokens from the {len(ids)}-token prompt, KV cache on both sides", flush=True)
    ref = hf_greedy(Path(args.hf_dir), ids, args.new_tokens)
    got = lm.generate(ids, args.new_tokens, eos_ids=())
    first = next((i for i, (x, y_) in enumerate(zip(ref, got)) if x != y_), None)
    dec = {"new_tokens": args.new_tokens, "identical": ref == got, "first_divergence": first,
           "hf_text": lm.decode(ref), "onnx_text": lm.decode(got)}
    # the same steps teacher-forced on HF's tokens: per-step logits through both caches
    with torch.inference_mode():
        r = model(torch.tensor([ids]), use_cache=True)
        cache, hrows = r.past_key_values, [r.logits[0, -1].float().numpy()]
        for tok in ref[:-1]:
            r = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            cache = r.past_key_values
            hrows.append(r.logits[0, -1].float().numpy())
    lg, past = lm._step(ids, lm._empty_past(), 0)
    orows, pos = [lg[-1]], len(ids)
    for tok in ref[:-1]:
        lg, past = lm._step([tok], past, pos)
        orows.append(lg[-1])
        pos += 1
    dh, do = np.asarray(hrows), np.asarray(orows)
    dec["teacher_forced_steps"] = {"position_range": [len(ids) - 1, len(ids) + len(ref) - 2],
                                   "max_abs_diff": float(np.abs(dh - do).max()),
                                   "top1_agreement": round(float((dh.argmax(-1) == do.argmax(-1)).mean()), 4)}
    # smallest top-1 margin in HF's steps: how close a tie a divergence would need
    srt = np.sort(dh, -1)
    dec["teacher_forced_steps"]["min_top1_margin_hf"] = float((srt[:, -1] - srt[:, -2]).min())
    p["decode"] = dec
    res["parity"] = p
    save()


def _count(xs: list) -> dict:
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


# ---------------------------------------------------------------- perplexity


def perplexity(args, dirs: dict[str, Path], res: dict, save) -> None:
    """Every window through HF fp32 and each export in turn (one window's log-probs in memory at a time)."""
    from edgesmith.bench.backends import open_lm
    from edgesmith.bench.metrics import kl_top1, nll_of, ppl_record, ppl_windows, window_logprobs
    from edgesmith.fsutil import data_dir

    f = data_dir() / "lm" / "wikitext-2-raw" / "wiki.test.raw"
    lms = {"hf_fp32": open_lm(Path(args.hf_dir), args.threads)}
    lms.update({f"onnx_{v}": open_lm(d, args.threads) for v, d in dirs.items()})
    ref = lms["hf_fp32"]
    toks = ref.encode(f.read_text(encoding="utf-8"))  # read as-is, like the bench and llama-perplexity -f
    wins = ppl_windows(toks, args.ctx, args.chunks, ref.add_bos, ref.bos_id)
    nll = {k: [] for k in lms}
    kl = {k: [] for k in lms if k != "hf_fp32"}
    top = {k: [] for k in kl}
    secs = {k: 0.0 for k in lms}
    for i, w in enumerate(wins):
        print(f"[ppl] window {i + 1}/{len(wins)}", flush=True)
        t = time.perf_counter()
        lp_ref, targets = window_logprobs(ref, w)
        secs["hf_fp32"] += time.perf_counter() - t
        nll["hf_fp32"].append(nll_of(lp_ref, targets))
        for k, lm in lms.items():
            if k == "hf_fp32":
                continue
            t = time.perf_counter()
            lp, _ = window_logprobs(lm, w)
            secs[k] += time.perf_counter() - t
            nll[k].append(nll_of(lp, targets))
            a, b = kl_top1(lp_ref, lp)
            kl[k].append(a)
            top[k].append(b)
            del lp
        del lp_ref
    out = {}
    for k in lms:
        rec = ppl_record(np.concatenate(nll[k]), wins, args.ctx, str(f), len(toks))
        o = {"ppl": round(rec["value"], 4), "nll_stderr": round(rec["nll_stderr"], 5), "scoring_s": round(secs[k], 1)}
        if k in kl:
            o.update({"kl_vs_hf_fp32": round(float(np.concatenate(kl[k]).mean()), 6),
                      "top1_vs_hf_fp32": round(float(np.concatenate(top[k]).mean()), 4)})
        out[k] = o
        meta = {x: rec[x] for x in ("ctx", "chunks", "tokens_scored", "text_tokens", "windows", "text")}
    for lm in lms.values():
        lm.close()
    res["perplexity"] = {"method": "bench/metrics.py (llama-perplexity's: windows of ctx, BOS first, second half scored)",
                         **meta, "by_model": out}
    for v in dirs:
        res["exports"][v]["ppl"] = out[f"onnx_{v}"]["ppl"]
        res["exports"][v]["ppl_ratio_vs_hf_fp32"] = round(out[f"onnx_{v}"]["ppl"] / out["hf_fp32"]["ppl"], 4)
    save()


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", default=str(HF_DIR), help="HF dir of Gemma 3 270M (converted from the Q4_K_M GGUF)")
    ap.add_argument("--work", default="/tmp/onnx270m", help="where the three exports go")
    ap.add_argument("--prompt-tokens", type=int, default=800)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=10, help="WikiText windows for perplexity")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--reexport", action="store_true", help="redo the exports even if --work has them")
    ap.add_argument("--skip", action="append", default=[], choices=["parity", "perplexity"])
    ap.add_argument("--clean", action="store_true", help="delete --work at the end")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from edgesmith.fsutil import write_json
    from edgesmith.machine import machine_info, peak_rss_mb

    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    cfg = json.loads((Path(args.hf_dir) / "config.json").read_text())
    res.update({"model_dir": str(args.hf_dir), "source_gguf": "gemma-3-270m-q4_k_m.gguf (dequantised to fp32 HF)",
                "embedding": [cfg["vocab_size"], cfg["hidden_size"]], "sliding_window": cfg.get("sliding_window"),
                "threads": args.threads, "machine": machine_info(args.threads)})

    def save() -> None:
        write_json(out, res)  # tmp file + os.replace

    dirs = exports(args, res, save)
    if "parity" not in args.skip:
        parity(args, dirs["fp32"], res, save)
    if "perplexity" not in args.skip:
        perplexity(args, dirs, res, save)
    res["peak_rss_mb"] = peak_rss_mb()
    res["load_1m_at_end"] = load1()
    save()
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps({k: res[k] for k in ("exports", "parity", "perplexity") if k in res}, indent=1))


if __name__ == "__main__":
    main()
