"""Quality evidence for `edgesmith prune` on the default model (SmolLM2-135M-Instruct).

    .venv/bin/python studies/prune_quality.py [--windows 40] [--skip-gguf]

1. WikiText-2 test perplexity (first N non-overlapping windows of 512 tokens) after
   - MLP pruning of 33% (1536 -> 1024 channels), ranked random vs magnitude vs activation
   - dropping 6 of 30 layers, ranked random vs magnitude vs block influence
   The informed criteria must beat random. Calibration: the default (16 x 256 tokens of
   ../shared/data/instruct/alpaca_en_demo.json), never WikiText.
2. Wall time of the full `edgesmith prune --recipe recipes/prune-default.yaml` stage (load,
   calibration, scoring, surgery, held-out perplexity, save) on this machine's CPU.
3. The recipe's quantisation-friendly shape: its WikiText perplexity, then (when
   edgesmith.export.gguf is present) GGUF F16 + Q4_K_M export of it and of the same shape with 4/2 heads
   (attention rows 256 wide: zero fallback tensors): fallback counts, and llama.cpp's greedy tokens from
   each F16 file against HF's on three chat prompts, for both raw pruned shapes and for the 4/2 shape after
   a short distillation (--recover-budget; a raw pruned model's greedy path runs through near-ties).

    .venv/bin/python studies/prune_quality.py --only-gguf   # redo 2. and 3., keep the committed tables of 1.

Writes studies/results/prune-quality.json and .md. CPU heavy: run it alone, one process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PROMPTS = ["What is the capital of France?", "Give three tips for staying healthy.",
           "Write a short poem about the sea."]


def say(*a) -> None:
    print(*a, flush=True)


def wikitext_windows(tok, data: Path, n: int, seq_len: int = 512):
    import torch

    text = (data / "lm" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = tok(text[: 200_000 * max(1, n // 40 + 1)], add_special_tokens=False)["input_ids"]
    if len(ids) < n * seq_len:
        ids = tok(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=40, help="WikiText windows of 512 tokens (the spec: 40)")
    ap.add_argument("--skip-gguf", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--recover-budget", default="4m",
                    help="distillation budget for the 4/2-head variant before its second greedy check ('' skips it)")
    ap.add_argument("--only-gguf", action="store_true",
                    help="keep the perplexity tables of the committed JSON; redo the stage timing and the GGUF checks")
    args = ap.parse_args()
    if args.only_gguf:
        result = json.loads((RESULTS / "prune-quality.json").read_text())
        result["machine"]["load_average_at_start"] = os.getloadavg()[0]
        result["gguf_rerun"] = time.strftime("%Y-%m-%d %H:%M")  # perplexity tables from the earlier full run
        return stage_and_gguf(result, args, time.perf_counter(), "gguf_rerun_seconds")

    import torch

    from edgesmith.compress import importance as imp
    from edgesmith.compress.calibration import calibration_loss, calibration_texts, pack
    from edgesmith.compress.prune import PruneConfig
    from edgesmith.compress.surgery import plan_keep, prune_model
    from edgesmith.config import from_dict, load_yaml
    from edgesmith.modelio import load_model, load_tokenizer

    from edgesmith.fsutil import data_dir

    data = data_dir()
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
        # every position scored (the method the committed numbers were measured with)
        return math.exp(calibration_loss(prune_model(model, plan_keep(scores, layer_scores, src, tgt), tgt), wt, cfg.batch_size))

    result = {
        "model": "default (SmolLM2-135M-Instruct, dequantised Q4_1 GGUF, fp32)",
        "eval": f"WikiText-2 raw test, first {args.windows} non-overlapping windows of 512 tokens",
        "calibration": f"{len(calib)} x {cfg.calib_seq_len} tokens of {source}",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": os.getloadavg()[0]},
    }
    result["baseline_ppl"] = math.exp(calibration_loss(model, wt, cfg.batch_size))
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
    return stage_and_gguf(result, args, t0, "total_seconds")


def stage_and_gguf(result: dict, args, t0: float, seconds_key: str) -> int:
    from edgesmith.compress.prune import PruneConfig, run
    from edgesmith.config import from_dict, load_yaml
    from edgesmith.fsutil import write_json, write_text

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
        result["gguf"] = gguf_check(out, args.skip_gguf or args.skip_timing, args.recover_budget)
    result[seconds_key] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "prune-quality.json", result)
    write_text(RESULTS / "prune-quality.md", render_md(result))
    print(render_md(result))
    return 0


def greedy_parity(hf_dir: Path, gguf_path: Path, new_tokens: int = 32) -> list[dict]:
    """HF greedy continuation of each chat prompt vs llama.cpp on the F16 file, teacher-forced: llama.cpp scores
    prompt + HF's greedy tokens in one pass and its argmax must equal HF's next token at every generated
    position; then llama.cpp's own greedy chat run (incremental decode, the GGUF's chat template) must give
    HF's text. HF runs on the weights the F16 file
    holds (fp32 rounded to fp16), so only the runtimes differ (llama.cpp also rounds activations and the KV
    cache to fp16). At the first disagreement both logit margins are recorded: a margin near zero is a
    near-tie flipped by rounding, not a conversion bug."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgesmith import llamacpp
    from edgesmith.native import run_isolated

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(prm.half().float())
    rows = []
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        seq, n = out.sequences[0].tolist(), ids.shape[1]
        hf_next = seq[n:]
        logits = run_isolated(llamacpp.logits, str(gguf_path), seq, what="llama.cpp logits")  # [T, vocab]
        ll = torch.as_tensor(logits[n - 1: n - 1 + len(hf_next)])                               # [new, vocab]
        ll_next = ll.argmax(-1).tolist()
        first = next((i for i, (a, b) in enumerate(zip(hf_next, ll_next)) if a != b), None)
        hf_text = tok.decode(hf_next, skip_special_tokens=True)
        ll_text = run_isolated(llamacpp.chat, str(gguf_path), [{"role": "user", "content": prompt}], new_tokens,
                               what="llama.cpp greedy chat")["text"]
        row = {"prompt": prompt, "tokens": len(hf_next), "text": hf_text, "llama_cpp_text": ll_text,
               "agree": sum(a == b for a, b in zip(hf_next, ll_next)), "first_divergence": first, "match": first is None,
               "greedy_text_equal": same_text(hf_text, ll_text)}
        if first is not None:
            h, g = out.logits[first][0], ll[first]  # [vocab] each: HF's and llama.cpp's logits at the flip
            a, b = hf_next[first], ll_next[first]
            row["margin_hf"] = round(float(h[a] - h[b]), 4)      # how much HF preferred its token
            row["margin_llama"] = round(float(g[b] - g[a]), 4)   # how much llama.cpp preferred its own
        rows.append(row)
    return rows


def same_text(hf: str, llama: str) -> bool:
    """HF decodes a token holding part of a UTF-8 character as U+FFFD, llama-cpp-python drops the bytes."""
    return hf.replace("\ufffd", "").strip() == llama.replace("\ufffd", "").strip()


def recover(variant: Path, budget: str) -> tuple[Path, dict]:
    """A short distillation of the pruned variant (the demo recipe's distill stage, time budget `budget`):
    the untrained pruned model is near-uniform garbage whose greedy path runs through near-ties, so greedy
    parity is checked again on the same shape once it predicts something."""
    from edgesmith.config import from_dict, load_yaml
    from edgesmith.distill.distill import DistillConfig, run as distill

    stage = dict(load_yaml(REPO / "recipes" / "smollm2-edge-cpu.yaml")["stages"]["distill"])
    stage["train"] = {**stage["train"], "time_budget": budget}
    out = variant.parent / f"{variant.name}-distilled"
    t0 = time.perf_counter()
    distill(from_dict(DistillConfig, {**stage, "student": str(variant), "out": str(out)}))
    return out, {"recipe": "recipes/smollm2-edge-cpu.yaml stages.distill", "time_budget": budget,
                 "wall_seconds": round(time.perf_counter() - t0, 1)}


def gguf_check(out: Path, skip: bool, recover_budget: str) -> dict:
    """Export the recipe shape (6/2 heads) and the zero-fallback shape (4/2 heads) to F16 + Q4_K_M; greedy
    parity of llama.cpp's F16 file with HF for both, and for the 4/2 shape after a short recovery."""
    try:
        from edgesmith.export import gguf
    except ImportError:
        return {"status": "pending: edgesmith.export.gguf is not available"}
    if skip or not (out / "config.json").is_file():
        return {"status": "skipped"}
    from edgesmith.compress.prune import PruneConfig, run
    from edgesmith.config import from_dict, load_yaml

    variant = out.parent / "pruned-4-2"
    run(from_dict(PruneConfig, {**load_yaml(REPO / "recipes" / "prune-default.yaml"), "out": str(variant),
                                "num_attention_heads": 4, "num_key_value_heads": 2, "eval_windows": 0}))
    res = {"status": "done", "files": {}, "greedy": {}}
    shapes = [("recipe 6/2 heads", out), ("variant 4/2 heads", variant)]
    if recover_budget:
        recovered, res["recovery"] = recover(variant, recover_budget)
        shapes.append((f"variant 4/2 heads after {recover_budget} distillation", recovered))
    for label, hf_dir in shapes:
        entries = gguf.export_gguf(hf_dir, out.parent / f"gguf-{hf_dir.name}", "pruned", ["F16", "Q4_K_M"], check=True)
        for e in entries:
            fb = (e.get("gguf") or {}).get("fallbacks")
            res["files"][f"{label}: {Path(e['path']).name}"] = {"size_mib": round(e["size_bytes"] / 2**20, 1), "fallbacks": fb,
                                                                "checks_ok": e["checks"].get("ok")}
        f16 = next(e["path"] for e in entries if e["type"] == "gguf-F16")
        res["greedy"][label] = greedy_parity(hf_dir, Path(f16))
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
                  f"{t['load_average_after']:.1f} after); phases {json.dumps({k: round(v, 1) for k, v in t['report_seconds'].items()})}."]
    g = r.get("gguf", {})
    lines += ["", f"GGUF check: {g.get('status')}" + (f" (rerun {r['gguf_rerun']} with --only-gguf, with the stage timing)" if r.get("gguf_rerun") else "")]
    for name, v in (g.get("files") or {}).items():
        fb = v["fallbacks"]
        lines.append(f"- {name}: {v['size_mib']} MiB, fallback tensors: {fb['count'] if fb else 0}"
                     + (f" (widths {fb['widths']}, {fb['by_type']})" if fb and fb.get("count") else "") + f", checks ok: {v['checks_ok']}")
    if g.get("recovery"):
        rc = g["recovery"]
        lines.append(f"- recovery of the 4/2-head variant: {rc['recipe']}, time budget {rc['time_budget']}, {rc['wall_seconds']:.0f} s wall")
    if g.get("greedy"):
        lines += ["", "Greedy parity (32 new tokens per chat prompt; HF on the F16 file's weights vs llama.cpp on the F16 file, "
                  "teacher-forced; margins are logit gaps at the first flip; last column: llama.cpp's own greedy chat run gives HF's text):", "",
                  "| model | prompt | agree | match | first flip | HF margin | llama.cpp margin | greedy text equal |",
                  "|---|---|---:|---|---:|---:|---:|---|"]
        for label, rows in g["greedy"].items():
            for gr in rows:
                lines.append(f"| {label} | {gr['prompt']} | {gr['agree']}/{gr['tokens']} | {gr['match']} | "
                             f"{'' if gr['match'] else gr['first_divergence']} | {gr.get('margin_hf', '')} | {gr.get('margin_llama', '')} | {gr.get('greedy_text_equal', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
