"""Quality evidence for `edgesmith prune` on the default model (SmolLM2-135M-Instruct).

    .venv/bin/python bench/prune_quality.py [--windows 40] [--skip-gguf]

1. WikiText-2 test perplexity (first N non-overlapping windows of 512 tokens) after
   - MLP pruning of 33% (1536 -> 1024 channels), ranked random vs magnitude vs activation
   - dropping 6 of 30 layers, ranked random vs magnitude vs block influence
   The informed criteria must beat random. Calibration: the default (16 x 256 tokens of
   ../shared/data/instruct/alpaca_en_demo.json), never WikiText.
2. Wall time of the full `edgesmith prune --recipe recipes/prune-default.yaml` stage (load,
   calibration, scoring, surgery, held-out perplexity, save) on this machine's CPU.
3. The recipe's quantisation-friendly shape: its WikiText perplexity, then (when
   edgesmith.export.gguf is present) GGUF F16 + Q4_K_M export: fallback tensor count and
   llama.cpp's greedy answer from F16 against HF's.

Writes bench/results/prune-quality.json and .md. CPU heavy: run it alone, one process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def wikitext_windows(tok, data: Path, n: int, seq_len: int = 512):
    import torch

    text = (data / "lm" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = tok(text[: 200_000 * max(1, n // 40 + 1)], add_special_tokens=False)["input_ids"]
    if len(ids) < n * seq_len:
        ids = tok(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def hf_greedy(model, tok, max_new_tokens: int = 32) -> str:
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=40, help="WikiText windows of 512 tokens (the spec: 40)")
    ap.add_argument("--skip-gguf", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()

    import torch

    from edgesmith.compress import importance as imp
    from edgesmith.compress.prune import (
        PruneConfig, calibration_texts, pack, perplexity, plan_keep, prune_model, run, shared_data_dir,
    )
    from edgesmith.config import from_dict, load_yaml
    from edgesmith.fsutil import write_json, write_text
    from edgesmith.modelio import load_model, load_tokenizer

    data = shared_data_dir()
    if data is None:
        print("needs ../shared/data (WikiText-2 and the calibration text)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model, tok = load_model("default"), load_tokenizer("default")
    src = imp.Dims.of(model.config)
    wt = wikitext_windows(tok, data, args.windows)
    cfg = PruneConfig()
    texts, source = calibration_texts(cfg, tok)
    random.Random(cfg.seed).shuffle(texts)
    calib = pack(tok, texts[: len(texts) - len(texts) // 10], cfg.calib_seq_len, cfg.calib_windows)
    stats = imp.collect_stats(model, calib, cfg.batch_size)
    sd = model.state_dict()
    unit = {k: fn(sd, src, stats, 0) for k, fn in imp.IMPORTANCE.items()}
    layer = {k: fn(sd, src, stats, 0) for k, fn in imp.LAYER_IMPORTANCE.items()}

    def ppl_of(scores, layer_scores, tgt) -> float:
        return perplexity(prune_model(model, plan_keep(scores, layer_scores, src, tgt), tgt), wt, cfg.batch_size)

    result = {
        "model": "default (SmolLM2-135M-Instruct, dequantised Q4_1 GGUF, fp32)",
        "eval": f"WikiText-2 raw test, first {args.windows} non-overlapping windows of 512 tokens",
        "calibration": f"{len(calib)} x {cfg.calib_seq_len} tokens of {source}",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": os.getloadavg()[0]},
    }
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    result["baseline_ppl"] = perplexity(model, wt, cfg.batch_size)
    say("baseline", result["baseline_ppl"])

    mlp_t = imp.Dims(30, 576, 1024, 9, 3, 64)
    result["mlp_33"] = {"shape": "intermediate 1536 -> 1024, all else kept", "ppl": {}}
    for k in ("random", "magnitude", "activation"):
        result["mlp_33"]["ppl"][k] = ppl_of(unit[k], layer["magnitude"], mlp_t)
        say("mlp", k, result["mlp_33"]["ppl"][k])
    depth_t = imp.Dims(24, 576, 1536, 9, 3, 64)
    result["drop_6_layers"] = {"shape": "30 -> 24 layers, all else kept", "ppl": {}, "dropped": {}}
    for k in ("random", "magnitude", "block-influence"):
        keep = plan_keep(unit["magnitude"], layer[k], src, depth_t)
        result["drop_6_layers"]["dropped"][k] = [l for l in range(30) if l not in keep.layers]
        result["drop_6_layers"]["ppl"][k] = ppl_of(unit["magnitude"], layer[k], depth_t)
        say("layers", k, result["drop_6_layers"]["ppl"][k])
    result["informed_beats_random"] = {
        "mlp_33": all(result["mlp_33"]["ppl"][k] < result["mlp_33"]["ppl"]["random"] for k in ("magnitude", "activation")),
        "drop_6_layers": all(result["drop_6_layers"]["ppl"][k] < result["drop_6_layers"]["ppl"]["random"] for k in ("magnitude", "block-influence")),
    }

    # the recipe shape (and the 4-head variant whose attention rows are 256 wide)
    recipe = from_dict(PruneConfig, load_yaml(REPO / "recipes" / "prune-default.yaml"))
    shapes = {
        "recipe (24 layers, hidden 512, MLP 1024, 6/2 heads)": imp.Dims(recipe.num_layers, recipe.hidden_size, recipe.intermediate_size,
                                                                       recipe.num_attention_heads, recipe.num_key_value_heads, 64),
        "variant (24 layers, hidden 512, MLP 1024, 4/2 heads)": imp.Dims(24, 512, 1024, 4, 2, 64),
    }
    result["quant_friendly"] = {}
    for name, d in shapes.items():
        result["quant_friendly"][name] = {k: ppl_of(unit[k], layer["block-influence"], d) for k in ("activation", "magnitude")}
        say(name, result["quant_friendly"][name])
    del model, unit

    with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
        out = Path(tmp) / "pruned"
        if not args.skip_timing:
            t = time.perf_counter()
            run(from_dict(PruneConfig, {**load_yaml(REPO / "recipes" / "prune-default.yaml"), "out": str(out)}))
            rep = json.loads((out / "prune_report.json").read_text())
            result["stage_timing"] = {"wall_seconds": time.perf_counter() - t, "report_seconds": rep["seconds"],
                                      "load_average_after": os.getloadavg()[0], "held_out_ppl": rep["perplexity"],
                                      "params": rep["after"]["params"], "width_warnings": rep["width_warnings"]}
            say("stage timing", result["stage_timing"])
        result["gguf"] = gguf_check(out, args.skip_gguf or args.skip_timing)
    result["total_seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "prune-quality.json", result)
    write_text(RESULTS / "prune-quality.md", render_md(result))
    print(render_md(result))
    return 0


def gguf_check(out: Path, skip: bool) -> dict:
    try:
        from edgesmith.export import gguf
    except ImportError:
        return {"status": "pending: edgesmith.export.gguf is not available"}
    if skip or not (out / "config.json").is_file():
        return {"status": "skipped"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgesmith.native import run_isolated

    entries = gguf.export_gguf(out, out.parent / "gguf", "pruned", ["F16", "Q4_K_M"], check=True)
    res = {"status": "done", "files": {}}
    for e in entries:
        fb = (e.get("gguf") or {}).get("fallbacks")
        res["files"][Path(e["path"]).name] = {"size_mib": round(e["size_bytes"] / 2**20, 1), "fallbacks": fb,
                                               "checks_ok": e["checks"].get("ok")}
    f16 = next(e["path"] for e in entries if e["type"] == "gguf-F16")
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    hf = hf_greedy(model, tok, 32)
    ll = run_isolated(gguf.llama_chat, f16, PROMPT, 32, what="llama.cpp greedy chat")["text"]
    res["greedy"] = {"prompt": PROMPT[0]["content"], "hf": hf, "llama_cpp_f16": ll, "match": hf.strip() == ll.strip()}
    return res


def render_md(r: dict) -> str:
    f = lambda x: f"{x:,.2f}"  # noqa: E731
    lines = ["# Pruning quality: SmolLM2-135M-Instruct (default model)", "",
             f"{r['eval']}; calibration {r['calibration']}. Baseline perplexity **{f(r['baseline_ppl'])}**.", "",
             "| experiment | random | magnitude | activation / block influence |", "|---|---:|---:|---:|"]
    m, d = r["mlp_33"]["ppl"], r["drop_6_layers"]["ppl"]
    lines.append(f"| MLP 33% (1536 -> 1024) | {f(m['random'])} | {f(m['magnitude'])} | {f(m['activation'])} (activation) |")
    lines.append(f"| drop 6 of 30 layers | {f(d['random'])} | {f(d['magnitude'])} | {f(d['block-influence'])} (block influence) |")
    lines += ["", f"Informed beats random: MLP {r['informed_beats_random']['mlp_33']}, layers {r['informed_beats_random']['drop_6_layers']}.",
              f"Dropped layers: {r['drop_6_layers']['dropped']}.", "", "Quantisation-friendly shapes (layers by block influence), WikiText perplexity:", "",
              "| shape | activation | magnitude |", "|---|---:|---:|"]
    for name, v in r["quant_friendly"].items():
        lines.append(f"| {name} | {f(v['activation'])} | {f(v['magnitude'])} |")
    if r.get("stage_timing"):
        t = r["stage_timing"]
        lines += ["", f"Full stage (`edgesmith prune --recipe recipes/prune-default.yaml`): **{t['wall_seconds']:.0f} s** wall on "
                  f"{r['machine']['cpus']} CPUs (load average {r['machine']['load_average_at_start']:.1f} at start, "
                  f"{t['load_average_after']:.1f} after: the machine was shared); phases {json.dumps({k: round(v, 1) for k, v in t['report_seconds'].items()})}."]
    g = r.get("gguf", {})
    lines += ["", f"GGUF check: {g.get('status')}"]
    for name, v in (g.get("files") or {}).items():
        fb = v["fallbacks"]
        lines.append(f"- {name}: {v['size_mib']} MiB, fallback tensors: {fb['count'] if fb else 0}"
                     + (f" (widths {fb['widths']}, {fb['by_type']})" if fb and fb.get("count") else "") + f", checks ok: {v['checks_ok']}")
    if g.get("greedy"):
        gr = g["greedy"]
        lines += [f"- greedy '{gr['prompt']}': HF `{gr['hf']!r}` vs llama.cpp F16 `{gr['llama_cpp_f16']!r}`: match {gr['match']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
