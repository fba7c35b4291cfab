"""`edgesmith prune MODEL --out DIR`: structured pruning that yields a plain Hugging Face model.

What can shrink (any combination; every layer keeps the same shape so GGUF export works):
    MLP channels      intermediate_size   gate/up rows + down columns
    attention heads   num_attention_heads / num_key_value_heads, GQA-valid: whole KV groups with
                      their query heads, and/or the same number of query heads in every group
                      (head_dim is kept, so RoPE is untouched)
    hidden channels   hidden_size         embeddings, every projection's in/out side, all RMSNorms,
                                          a tied or untied lm_head
    depth             num_layers          whole decoder layers

The stage, top to bottom:
    1. resolve the target shape (absolute sizes, per-axis ratios, or a --target-params search; compress/shape.py),
       rounding widths to multiples that quantise cleanly (--round-to, default 256)
    2. calibration text (only when a criterion needs data; compress/calibration.py) and one hooked forward pass
    3. score every unit (compress/importance.py) and choose what to keep (compress/surgery.py)
    4. held-out perplexity of the source, then tensor surgery (compress/surgery.py; the couplings are explicit)
       written one decoder layer at a time into the safetensors files save_pretrained would write (compress/checkpoint.py),
       the source freed as it goes; optional unstructured / N:M magnitude sparsity (compress/sparsity.py; dense files: size and speed do
       not change) on the way
    5. the pruned model loaded back from those files for its held-out perplexity; prune_report.json, a printed
       table; the whole directory replaced atomically

Memory: the checkpoint's precision is kept (bf16 stays bf16, no fp32 copy), so the peak is about one copy of the
source plus one layer and the calibration activations (1.07B bf16 Llama: 3.1 GiB for a 2.0 GiB checkpoint, 3.0B:
6.7 GiB for 5.5 GiB; studies/results/scaling/).

Heavy libraries are imported inside functions: `edgesmith --help` must stay fast.
"""
from __future__ import annotations

import copy
import gc
import json
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from edgesmith.config import to_dict
from edgesmith.errors import ConfigError, EdgesmithError
from edgesmith.fsutil import atomic_dir, check_free_space, data_dir, write_json

from . import checkpoint
from .checkpoint import checkpoint_dtype, write_pruned
from .calibration import calibration_loss, calibration_texts, held_out_perplexity, pack, teacher_texts
from .importance import IMPORTANCE, LAYER_IMPORTANCE, LAYER_NEEDS_DATA, NEEDS_DATA, Dims
from .shape import MIN_ROUND, count_params, dims_dict, fill_dims, pick_candidates, proxy_damage, requested_dims, search_space
from .speed import speed_filter
from .surgery import PRUNABLE_MODEL_TYPES, acting_pruned, fixed_hidden, new_config, plan_keep, prune_model

@dataclass
class PruneConfig:
    """Settings of `edgesmith prune` (a recipe file holds these keys)."""

    model: str = "default"
    """Model to prune: HF directory, .gguf file or 'default'."""
    out: str = "out/prune"
    """Output directory (an HF checkpoint + prune_report.json); replaced atomically."""
    intermediate_size: int | None = None
    """Target MLP width (channels per layer)."""
    num_layers: int | None = None
    """Target number of decoder layers."""
    num_attention_heads: int | None = None
    """Target query heads (GQA-valid with num_key_value_heads)."""
    num_key_value_heads: int | None = None
    """Target KV heads (whole KV groups are removed with their query heads)."""
    hidden_size: int | None = None
    """Target residual-stream width."""
    mlp_ratio: float | None = None
    """Fraction of MLP channels to REMOVE (0.33 removes a third)."""
    head_ratio: float | None = None
    """Fraction of query heads to remove (rounded to the nearest GQA-valid count)."""
    hidden_ratio: float | None = None
    """Fraction of hidden channels to remove."""
    layer_ratio: float | None = None
    """Fraction of decoder layers to remove."""
    target_params: str | None = None
    """Total parameter budget like 90M or 1.2B: a small search picks the axes that hurt least."""
    importance: str = "activation"
    """How MLP channels, heads and hidden channels are ranked: activation (|W|·‖x‖ on calibration text; MLP 1536->1024
    WikiText ppl 101 vs 362 for magnitude in studies/results/prune-quality.md), magnitude or random."""
    layer_importance: str = "block-influence"
    """How layers are ranked for dropping: block-influence, magnitude or random."""
    round_to: int = 256
    """Round hidden/intermediate widths to this multiple (halved down to 32 when it cannot fit)."""
    calib: str | None = None
    """Calibration text (.txt/.jsonl/.json, any `edgesmith data` layout); default: ../shared/data or teacher text."""
    calib_windows: int = 16
    """Calibration windows (token sequences) for activation statistics, block influence and the search."""
    calib_seq_len: int = 256
    """Tokens per calibration window."""
    eval_windows: int = 4
    """Held-out windows for perplexity before/after (0 = skip; only when real data is available)."""
    search_candidates: int = 6
    """Shapes the --target-params search evaluates by calibration loss."""
    target_speedup: float | None = None
    """With --target-params: keep only search shapes whose Q4_K_M decodes at least this many times as fast as the
    teacher's Q4_K_M, measured on this machine (compress/speed.py; ~20 s per shape), then pick by calibration loss."""
    probe_steps: int = 0
    """With --target-params: distil each of the `probe_finalists` shapes with the lowest calibration loss for this many
    steps from the unpruned model and choose by next-token loss after (compress/probe.py; loss right after the cut is a
    weak predictor of quality after recovery). 0 = choose by calibration loss after the cut."""
    probe_finalists: int = 3
    """Shapes the --probe-steps probe distils (the best by calibration loss)."""
    probe_lr: float = 2e-4
    """AdamW learning rate of the probe (constant: a short probe has no room for a schedule)."""
    reconstruct: str = "none"
    """After the cut: none, or ls (refit each kept down_proj in closed form so the layer's output on calibration text
    stays closest to the unpruned one; compress/reconstruct.py). Off by default: on the demo's student it helps right after
    pruning (WikiText ppl 281 -> 238) but hurts after the same distillation (93.3 vs 78.8): studies/results/distill-ablation.md."""
    reconstruct_ridge: float = 0.01
    """Ridge strength of --reconstruct ls, relative to the mean activation energy of the kept channels."""
    rescale_norms: bool = True
    """Scale RMSNorm weights by sqrt(old/new hidden) so normalised activations keep their size."""
    sparsity: str | None = None
    """After structured pruning: unstructured magnitude sparsity like 0.5, or N:M like "2:4" (quote it in YAML)."""
    seed: int = 0
    """Seed for random ranking, calibration sampling and teacher text."""
    batch_size: int = 4
    """Windows per forward pass during calibration and evaluation."""

    def __post_init__(self):
        if self.importance not in IMPORTANCE:
            raise ConfigError("importance", f"expected one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.layer_importance not in LAYER_IMPORTANCE:
            raise ConfigError("layer_importance", f"expected one of {', '.join(LAYER_IMPORTANCE)}, got {self.layer_importance!r}")
        for name in ("intermediate_size", "num_layers", "num_attention_heads", "num_key_value_heads", "hidden_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(name, f"expected a positive integer, got {v}")
        for name in ("mlp_ratio", "head_ratio", "hidden_ratio", "layer_ratio"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 1:
                raise ConfigError(name, f"expected the fraction to remove, in [0, 1), got {v}")
        for a, b in (("intermediate_size", "mlp_ratio"), ("num_attention_heads", "head_ratio"),
                     ("num_key_value_heads", "head_ratio"), ("hidden_size", "hidden_ratio"), ("num_layers", "layer_ratio")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ConfigError(b, f"give either {a} or {b}, not both")
        if self.round_to < MIN_ROUND or self.round_to % MIN_ROUND:
            raise ConfigError("round_to", f"expected a multiple of {MIN_ROUND} (GGUF quant blocks), got {self.round_to}")
        if self.target_params is not None:
            parse_count(self.target_params, "target_params")
        if self.sparsity is not None:
            parse_sparsity(self.sparsity)
        if self.target_speedup is not None:
            if self.target_speedup <= 0:
                raise ConfigError("target_speedup", f"expected a ratio > 0 like 1.4, got {self.target_speedup}")
            if self.target_params is None:
                raise ConfigError("target_speedup", "needs target_params: the speed budget chooses among the shapes of that size")
        for name in ("calib_windows", "calib_seq_len", "search_candidates", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"expected a positive integer, got {getattr(self, name)}")
        if self.probe_steps < 0 or self.probe_finalists < 1 or self.probe_lr <= 0:
            bad = "probe_steps" if self.probe_steps < 0 else "probe_finalists" if self.probe_finalists < 1 else "probe_lr"
            raise ConfigError(bad, f"expected {'>= 0' if bad == 'probe_steps' else '> 0'}, got {getattr(self, bad)}")
        if self.probe_steps and self.target_params is None:
            raise ConfigError("probe_steps", "needs target_params: the probe ranks the shapes of that size")
        if self.reconstruct not in ("none", "ls"):
            raise ConfigError("reconstruct", f"expected none or ls, got {self.reconstruct!r}")
        if self.reconstruct_ridge <= 0:
            raise ConfigError("reconstruct_ridge", f"expected > 0, got {self.reconstruct_ridge}")
        if self.eval_windows < 0:
            raise ConfigError("eval_windows", f"expected 0 or more, got {self.eval_windows}")


# ---------------------------------------------------------------- parsing small values


def parse_count(text, key: str = "target_params") -> int:
    """'90M' -> 90_000_000; also K, B and plain integers."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", str(text))
    if not m:
        raise ConfigError(key, f"expected a parameter count like 90M, 1.2B or 90000000, got {text!r}")
    n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    if n < 1:
        raise ConfigError(key, f"expected a positive parameter count, got {text!r}")
    return int(n)


def parse_sparsity(text) -> tuple:
    """'0.5' -> ('unstructured', 0.5); '2:4' -> ('n:m', 2, 4)."""
    s = str(text).strip()
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        n, k = int(m.group(1)), int(m.group(2))
        if not 0 < n < k:
            raise ConfigError("sparsity", f"N:M needs 0 < N < M (keep N of every M weights), got {s!r}")
        return ("n:m", n, k)
    try:
        p = float(s)
    except ValueError:
        p = -1.0
    if not 0 < p < 1:
        raise ConfigError("sparsity", f'expected a fraction in (0, 1) like 0.5 or N:M like "2:4" (quote it in YAML), got {text!r}')
    return ("unstructured", p)


# ---------------------------------------------------------------- report


def param_counts(model) -> dict:
    """Exact counts from the tensors (tied weights once), non-embedding as in `edgesmith info`."""
    seen, total = set(), 0
    for p in model.parameters():
        ptr = id(p) if p.device.type == "meta" else p.data_ptr()  # a meta skeleton has no storage to tell apart
        if ptr not in seen:
            seen.add(ptr)
            total += p.numel()
    c = model.config
    emb = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return {"total": total, "non_embedding": total - emb}


def render_report(r: dict) -> str:
    b, a = r["before"], r["after"]

    def m(n):
        return f"{n / 1e6:.1f}M"

    rows = [("", "before", "after"),
            ("parameters", m(b["params"]["total"]), m(a["params"]["total"]) + f"  ({a['params']['total'] / b['params']['total']:.0%})"),
            ("non-embedding", m(b["params"]["non_embedding"]), m(a["params"]["non_embedding"]) + f"  ({a['params']['non_embedding'] / b['params']['non_embedding']:.0%})")]
    for k in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        rows.append((k, str(b["dims"][k]), str(a["dims"][k])))
    ppl = r.get("perplexity")
    if ppl:
        rows.append((f"perplexity ({ppl['windows']}x{ppl['seq_len']} held-out)", f"{ppl['before']:.2f}", f"{ppl['after']:.2f}"))
    w0, w1 = max(len(x[0]) for x in rows), max(len(x[1]) for x in rows)
    lines = [f"{x:<{w0}}  {y:>{w1}}  {z}" for x, y, z in rows]
    lines.append(f"ranking: units by {r['importance']}, layers by {r['layer_importance']}"
                 + (f"; dropped layers {r['dropped_layers']}" if r["dropped_layers"] else ""))
    if r.get("calibration"):
        c = r["calibration"]
        lines.append(f"calibration: {c['windows']}x{c['seq_len']} tokens from {c['source']}")
    if r.get("search"):
        best = [s for s in r["search"] if s["chosen"]][0]
        why = "the lowest calibration loss"
        if best.get("speedup") is not None:
            fast = sum(1 for x in r["search"] if x["speedup"] >= r["config"]["target_speedup"])
            why += (f" among the {fast} reaching {r['config']['target_speedup']}x the teacher's Q4_K_M decode here "
                    f"({best['speedup']:.2f}x: {best['decode_tok_s']:.1f} vs {best['teacher_decode_tok_s']:.1f} tok/s)")
        if best.get("chosen_by") == "probe_loss":
            probed = [x for x in r["search"] if "probe_loss" in x]
            lowest = min(r["search"], key=lambda x: x["calib_loss"])
            why = (f"the lowest loss after {r['config']['probe_steps']} distillation steps among the {len(probed)} best right "
                   f"after the cut ({best['probe_loss']:.3f}; right after the cut {best['calib_loss']:.3f}"
                   + (", also the lowest)" if lowest is best else f", vs {lowest['calib_loss']:.3f} for {lowest['dims']})")
                   + (f"; {best['speedup']:.2f}x the teacher's Q4_K_M decode here" if best.get("speedup") is not None else ""))
            lines.append(f"search: {len(r['search'])} shapes evaluated, chose {best['dims']}: {why}")
        else:
            lines.append(f"search: {len(r['search'])} shapes evaluated, chose {best['dims']}: {why} ({best['calib_loss']:.3f})")
    for note in r["adjusted"]:
        lines.append(f"adjusted: {note}")
    if r.get("sparsity"):
        s = r["sparsity"]
        lines.append(f"sparsity {s['pattern']}: {s['achieved']:.1%} of decoder weights zero. Note: {s['note']}")
    for w in r["width_warnings"]:
        lines.append(f"warning: {w}")
    lines.append(f"time: {r['seconds']['total']:.1f}s   output: {r['out']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the stage


def run(cfg: PruneConfig, quiet: bool = False) -> Path:
    """Prune `cfg.model` into `cfg.out`; returns the output directory."""
    import torch

    from edgesmith.facts import facts, width_warnings
    from edgesmith.hfdir import read_hf_config
    from edgesmith.modelio import load_model, load_tokenizer, model_license, model_name, resolve

    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    out = Path(cfg.out)
    src_dir = resolve(cfg.model)
    dtype_name = checkpoint_dtype(read_hf_config(src_dir))  # a bf16 checkpoint stays bf16: in memory and on output
    dtype = getattr(torch, dtype_name)
    model = load_model(cfg.model, dtype=dtype_name)
    tok = load_tokenizer(cfg.model)
    src = Dims.of(model.config)
    if getattr(model.config, "model_type", None) not in PRUNABLE_MODEL_TYPES:
        raise EdgesmithError(f"{src_dir}: pruning supports Llama, Mistral, Qwen2, Qwen3 and Gemma 3 (text) decoders")
    if src.num_attention_heads % src.num_key_value_heads:
        raise EdgesmithError(f"{src_dir}: {src.num_attention_heads} heads do not split into {src.num_key_value_heads} kv groups")
    vocab, tied = model.config.vocab_size, bool(model.config.tie_word_embeddings)
    want, notes = requested_dims(cfg, src)
    fixed_hidden(model.config, src, want, pin=bool(cfg.target_params))
    target = parse_count(cfg.target_params) if cfg.target_params else None
    if target is None and all(v is None for v in want.values()) and not cfg.sparsity:
        raise EdgesmithError("nothing to prune: give target sizes (e.g. --intermediate-size 1024), ratios "
                             "(--mlp-ratio 0.33), --target-params 90M or --sparsity")
    check_free_space(out.parent if out.parent != Path("") else Path("."), 2 * sum(p.numel() * p.element_size() for p in model.parameters()),
                     "the pruned model")
    seconds = {"load": time.perf_counter() - t0}

    # -- calibration data: needed by activation ranking, block influence (when layers go) and the search
    drops_layers = target is not None or (want["num_layers"] or src.num_layers) < src.num_layers
    need_data = (cfg.importance in NEEDS_DATA or (drops_layers and cfg.layer_importance in LAYER_NEEDS_DATA)
                 or target is not None or cfg.reconstruct != "none")
    t = time.perf_counter()
    calib = held_out = None
    calib_info = None
    found = calibration_texts(cfg, tok) if (need_data or cfg.eval_windows) else None
    if found:
        texts, source = found
        random.Random(cfg.seed).shuffle(texts)
        n_eval = max(1, len(texts) // 10) if cfg.eval_windows else 0  # last 10% of rows: never calibrated on
        held_out = pack(tok, texts[len(texts) - n_eval:], cfg.calib_seq_len, cfg.eval_windows) if n_eval else None
        calib = pack(tok, texts[: len(texts) - n_eval], cfg.calib_seq_len, cfg.calib_windows)
        if len(calib) == 0:
            raise EdgesmithError(f"{source}: not enough text for one calibration window of {cfg.calib_seq_len} tokens")
    elif need_data:
        say(f"no calibration data given and {data_dir() or '../shared/data'} not found: the model writes some")
        # ~1 window per answer: prompt + up to 160 sampled tokens, packed
        texts = teacher_texts(model, tok, max(8, cfg.calib_windows), max_new_tokens=160, seed=cfg.seed)
        source = "teacher-generated (the model's own sampled answers)"
        calib = pack(tok, texts, cfg.calib_seq_len, cfg.calib_windows)
        if len(calib) == 0:
            raise EdgesmithError("the model wrote too little text for one calibration window; give --calib FILE")
    stats = None
    if need_data and calib is not None:
        from .importance import collect_stats

        say(f"calibrating on {len(calib)} windows of {cfg.calib_seq_len} tokens ...")
        stats = collect_stats(model, calib, cfg.batch_size, gram=cfg.reconstruct == "ls")
        calib_info = {"source": source, "windows": len(calib), "seq_len": cfg.calib_seq_len, "tokens": int(calib.numel())}
    seconds["calibration"] = time.perf_counter() - t

    # -- scores
    t = time.perf_counter()
    sd = model.state_dict()
    scores = IMPORTANCE[cfg.importance](sd, src, stats, cfg.seed)
    if stats is None and cfg.layer_importance in LAYER_NEEDS_DATA:  # no layer is dropped: nothing to rank
        layer_scores, layer_ranked = torch.ones(src.num_layers), False
    else:
        layer_scores, layer_ranked = LAYER_IMPORTANCE[cfg.layer_importance](sd, src, stats, cfg.seed), True

    # -- the target shape (search when a parameter budget is given)
    search = None
    if target is not None:
        cands = pick_candidates(search_space(src, want, cfg.round_to, vocab, tied, target), src, scores, layer_scores, cfg.search_candidates)
        search_windows = calib[: max(2, min(8, len(calib)))]
        search = []
        for d in cands:
            with acting_pruned(model, plan_keep(scores, layer_scores, src, d), cfg.rescale_norms):  # no second copy of the model
                loss = calibration_loss(model, search_windows, cfg.batch_size)
            search.append({"dims": dims_dict(d), "params": count_params(d, vocab, tied)[0],
                           "proxy": proxy_damage(d, scores, layer_scores), "calib_loss": loss, "chosen": False})
            say(f"  search: {dims_dict(d)} -> {search[-1]['params'] / 1e6:.1f}M params, calibration loss {loss:.3f}")
        allowed = list(range(len(search)))
        if cfg.target_speedup:
            allowed = speed_filter(cfg, model, tok, src_dir, cands, search, scores, layer_scores, out, say)
        key = "calib_loss"
        if cfg.probe_steps:  # the few best right after the cut, ranked by loss after a short distillation
            from .probe import probe

            n_eval = max(1, min(8, len(calib) // 2))
            train_w, eval_w = calib[n_eval:] if len(calib) > n_eval else calib, calib[:n_eval]
            for j in sorted(allowed, key=lambda j: search[j]["calib_loss"])[: cfg.probe_finalists]:
                student = prune_model(model, plan_keep(scores, layer_scores, src, cands[j]), cands[j], cfg.rescale_norms)
                search[j].update(probe(student, model, train_w, eval_w, cfg.probe_steps, cfg.probe_lr, cfg.batch_size, cfg.seed))
                del student
                say(f"  probe: {search[j]['dims']} -> loss {search[j]['probe_loss']:.3f} after {cfg.probe_steps} distillation "
                    f"steps (KL {search[j]['probe_kl_first']:.3f} -> {search[j]['probe_kl_last']:.3f}, {search[j]['probe_seconds']:.0f} s)")
            allowed, key = [j for j in allowed if "probe_loss" in search[j]], "probe_loss"
        i = min(allowed, key=lambda j: search[j][key])
        search[i]["chosen"] = True
        search[i]["chosen_by"] = key
        tgt = cands[i]
    else:
        tgt = fill_dims(src, want)
    keep = plan_keep(scores, layer_scores, src, tgt)
    seconds["prune"] = time.perf_counter() - t  # the plan; the surgery itself happens while saving, shard by shard

    # -- the source's quality on held-out text, while it is in memory (the pruned model is measured from its files)
    t = time.perf_counter()
    ppl_before = None
    if held_out is not None and len(held_out):
        say(f"perplexity on {len(held_out)} held-out windows ...")
        ppl_before = held_out_perplexity(model, held_out)
    seconds["eval"] = time.perf_counter() - t
    before = {"dims": dims_dict(src), "params": param_counts(model)}
    new_cfg, gen_cfg, model_cls = new_config(model.config, src, tgt, keep), copy.deepcopy(model.generation_config), type(model)
    new_cfg._name_or_path = f"{model_name(cfg.model)}-pruned"
    grams = stats["down_gram"] if cfg.reconstruct == "ls" else None
    # from here on the state dict is the only reference to the source weights: write_pruned frees them as it goes
    src_sd = sd
    del model, sd
    gc.collect()

    # -- save: a plain HF checkpoint, atomically, shard by shard
    t = time.perf_counter()
    with atomic_dir(out) as tmp:
        written = write_pruned(src_sd, src, keep, new_cfg, model_cls, gen_cfg, tmp, dtype, cfg.rescale_norms, grams=grams,
                               ridge=cfg.reconstruct_ridge, sparsity=parse_sparsity(cfg.sparsity) if cfg.sparsity else None,
                               max_shard_size=checkpoint.MAX_SHARD_SIZE)
        del src_sd, grams
        stats = None
        gc.collect()
        reconstruction = None
        if cfg.reconstruct == "ls":
            layers = written["reconstruction"]
            mean = lambda k: sum(r[k] for r in layers) / len(layers)  # noqa: E731
            reconstruction = {"method": "ls", "ridge": cfg.reconstruct_ridge, "layers": layers,
                              "mean_error_cut": round(mean("error_cut"), 6), "mean_error_refit": round(mean("error_refit"), 6)}
            say(f"reconstruct ls: down_proj output error on calibration text {mean('error_cut'):.4f} -> {mean('error_refit'):.4f} "
                f"(mean over {len(layers)} layers, relative)")
        sparsity = written["sparsity"]
        tok.save_pretrained(tmp)
        for extra in ("chat_template.jinja", "chat_template.json"):  # older tokenizers keep it beside
            if (src_dir / extra).is_file() and not (tmp / extra).exists():
                shutil.copy(src_dir / extra, tmp / extra)
        (tmp / "edgesmith.json").write_text(json.dumps({
            "name": f"{model_name(cfg.model)}-pruned", "source": str(src_dir), "stage": "prune",
            "license": model_license(src_dir),
            "note": "structured pruning by edgesmith; see prune_report.json",
        }, indent=2))
        seconds["save"] = time.perf_counter() - t

        # -- the pruned model's quality, loaded from what was written (the source is gone by now)
        t = time.perf_counter()
        ppl = None
        if ppl_before is not None:
            pruned = load_model(str(tmp), dtype=dtype_name)
            ppl = {"before": ppl_before, "after": held_out_perplexity(pruned, held_out),
                   "windows": len(held_out), "seq_len": cfg.calib_seq_len, "scored": "second half of each window (as edgesmith bench)",
                   "source": f"{source} (held-out 10% of rows)"}
            del pruned
        seconds["eval"] += time.perf_counter() - t

        report = {
            "model": cfg.model, "source_dir": str(src_dir), "out": str(out), "config": to_dict(cfg),
            "before": before,
            "after": {"dims": dims_dict(tgt), "params": written["params"]},
            "adjusted": notes, "importance": cfg.importance, "layer_importance": cfg.layer_importance,
            "calibration": calib_info, "search": search, "sparsity": sparsity, "perplexity": ppl, "reconstruction": reconstruction,
            "layer_scores": [float(x) for x in layer_scores] if layer_ranked else None, "kept_layers": keep.layers,
            "dropped_layers": [l for l in range(src.num_layers) if l not in keep.layers],
            "per_layer": [
                {"layer": l, "importance": float(layer_scores[l]) if layer_ranked else None, "kept": l in keep.layers,
                 "mlp_score_mean": float(scores.mlp[l].mean()), "head_scores": [float(x) for x in scores.heads[l]],
                 "kv_scores": [float(x) for x in scores.kv[l]]}
                for l in range(src.num_layers)
            ],
            "kept_units": {
                "hidden": keep.hidden,
                "layers": [{"layer": l, "heads": h, "kv_heads": k, "mlp_channels": m}
                           for l, h, k, m in zip(keep.layers, keep.heads, keep.kv, keep.mlp)],
            },
        }
        report["width_warnings"] = width_warnings(facts(tmp))
        seconds["total"] = time.perf_counter() - t0
        report["seconds"] = seconds
        write_json(tmp / "prune_report.json", report)
    say(render_report(report))
    return out
