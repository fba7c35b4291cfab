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
    1. resolve the target shape (absolute sizes, per-axis ratios, or a --target-params search),
       rounding widths to multiples that quantise cleanly (--round-to, default 256)
    2. calibration text (only when a criterion needs data) and one hooked forward pass
    3. score every unit (compress/importance.py) and choose what to keep
    4. held-out perplexity of the source, then tensor surgery (Llama coupling is explicit, see importance.py)
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
import math
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgesmith.config import to_dict
from edgesmith.errors import ConfigError, EdgesmithError
from edgesmith.fsutil import atomic_dir, check_free_space, data_dir, write_json

from . import checkpoint
from .checkpoint import checkpoint_dtype, write_pruned
from .importance import IMPORTANCE, LAYER_IMPORTANCE, LAYER_NEEDS_DATA, NEEDS_DATA, Dims, Scores

MIN_ROUND = 32  # legacy GGUF quants tile rows in blocks of 32: never round to anything finer


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


# ---------------------------------------------------------------- target shape


def round_width(requested: int, orig: int, round_to: int) -> tuple[int, int]:
    """Nearest width below `orig` that is a multiple of `round_to`, halving the multiple (never below
    32) when no such width exists. Returns (width, multiple used)."""
    if requested >= orig:
        return orig, 0
    m = round_to
    while m >= MIN_ROUND:
        options = list(range(m, orig, m))  # multiples of m strictly below orig
        if options:
            return min(options, key=lambda w: (abs(w - requested), w)), m
        m //= 2
    raise ConfigError("round_to", f"width {orig} cannot shrink to a multiple of {MIN_ROUND} (requested {requested})")


def width_options(orig: int, low: int, round_to: int) -> list[int]:
    """Candidate widths for the search: orig, then multiples of round_to (halved if needed) >= low."""
    m = round_to
    while m >= MIN_ROUND:
        opts = [w for w in range(m, orig, m) if w >= low]
        if opts:
            return [orig] + sorted(opts, reverse=True)
        m //= 2
    return [orig]


def head_choices(heads: int, kv: int) -> list[tuple[int, int]]:
    """Every GQA-valid (query heads, kv heads) reachable by pruning: keep kv' <= kv groups, each with
    g' <= g query heads (the same number in every group)."""
    g = heads // kv
    return sorted({(k * gg, k) for k in range(1, kv + 1) for gg in range(1, g + 1)}, reverse=True)


def check_heads(want_h: int | None, want_kv: int | None, src: Dims) -> tuple[int, int]:
    """Resolve a head request to a GQA-valid (H', KV') or raise naming the nearest valid choices."""
    valid = head_choices(src.num_attention_heads, src.num_key_value_heads)
    if want_h is None and want_kv is None:
        return src.num_attention_heads, src.num_key_value_heads
    if want_h is not None and want_kv is None:  # keep as many KV groups as possible
        hits = [c for c in valid if c[0] == want_h]
        if hits:
            return max(hits, key=lambda c: c[1])
    elif want_h is None:  # remove whole KV groups with their query heads
        hits = [c for c in valid if c[1] == want_kv and c[0] == want_kv * src.group]
        if hits:
            return hits[0]
    elif (want_h, want_kv) in valid:
        return want_h, want_kv
    h, k = want_h if want_h is not None else (want_kv or 1) * src.group, want_kv or 0
    near = sorted(valid, key=lambda c: (abs(c[0] - h), abs(c[1] - k), -c[0]))[:4]
    asked = f"{want_h if want_h is not None else '?'} heads / {want_kv if want_kv is not None else '?'} kv heads"
    raise ConfigError(
        "num_attention_heads",
        f"{asked} is not reachable from {src.num_attention_heads}/{src.num_key_value_heads} with GQA grouping kept "
        f"(every kv head serves the same number of query heads, at most {src.group}); nearest valid choices: "
        + ", ".join(f"{a}/{b}" for a, b in near),
    )


def count_params(d: Dims, vocab: int, tied: bool) -> tuple[int, int]:
    """(total, non-embedding) parameters of a bias-free Llama of shape `d` (for the search)."""
    D, hd = d.hidden_size, d.head_dim
    emb = vocab * D * (1 if tied else 2)
    attn = D * hd * (2 * d.num_attention_heads + 2 * d.num_key_value_heads)
    per_layer = attn + 3 * D * d.intermediate_size + 2 * D
    non_emb = d.num_layers * per_layer + D
    return emb + non_emb, non_emb


def requested_dims(cfg: PruneConfig, src: Dims) -> tuple[dict, list[str]]:
    """The per-axis targets named by sizes or ratios (None = axis free), and notes on rounding."""
    notes: list[str] = []
    want: dict = {}

    def width(name, size, ratio, orig):
        if size is None and ratio is None:
            return None
        if size is not None and size > orig:
            raise ConfigError(name, f"{size} is larger than the model's {orig}: pruning only removes")
        req = size if size is not None else max(1, round(orig * (1 - ratio)))
        got, m = round_width(req, orig, cfg.round_to)
        if got != req:
            notes.append(f"{name}: requested {req}, using {got} (a multiple of {m}, so GGUF quants tile the rows)")
        return got

    want["intermediate_size"] = width("intermediate_size", cfg.intermediate_size, cfg.mlp_ratio, src.intermediate_size)
    want["hidden_size"] = width("hidden_size", cfg.hidden_size, cfg.hidden_ratio, src.hidden_size)
    if cfg.num_layers is not None:
        if cfg.num_layers > src.num_layers:
            raise ConfigError("num_layers", f"{cfg.num_layers} is more than the model's {src.num_layers} layers")
        want["num_layers"] = cfg.num_layers
    elif cfg.layer_ratio is not None:
        want["num_layers"] = max(1, round(src.num_layers * (1 - cfg.layer_ratio)))
    else:
        want["num_layers"] = None
    if cfg.head_ratio is not None:
        req = max(1, round(src.num_attention_heads * (1 - cfg.head_ratio)))
        valid = head_choices(src.num_attention_heads, src.num_key_value_heads)
        h, kv = min(valid, key=lambda c: (abs(c[0] - req), -c[1]))
        if h != req:
            notes.append(f"num_attention_heads: requested {req}, using {h} ({kv} kv heads) to keep GQA groups equal")
        want["heads"] = (h, kv)
    elif cfg.num_attention_heads is not None or cfg.num_key_value_heads is not None:
        for name, v, o in (("num_attention_heads", cfg.num_attention_heads, src.num_attention_heads),
                           ("num_key_value_heads", cfg.num_key_value_heads, src.num_key_value_heads)):
            if v is not None and v > o:
                raise ConfigError(name, f"{v} is more than the model's {o}: pruning only removes")
        want["heads"] = check_heads(cfg.num_attention_heads, cfg.num_key_value_heads, src)
    else:
        want["heads"] = None
    return want, notes


def fill_dims(src: Dims, want: dict) -> Dims:
    h, kv = want.get("heads") or (src.num_attention_heads, src.num_key_value_heads)
    return Dims(
        num_layers=want.get("num_layers") or src.num_layers,
        hidden_size=want.get("hidden_size") or src.hidden_size,
        intermediate_size=want.get("intermediate_size") or src.intermediate_size,
        num_attention_heads=h, num_key_value_heads=kv, head_dim=src.head_dim,
    )


def search_space(src: Dims, want: dict, round_to: int, vocab: int, tied: bool, target: int) -> list[Dims]:
    """Shapes within ~5% under `target` params; the axes fixed by the request stay fixed.
    Bounds keep the search sane: at most half the layers, hidden and heads, 3/4 of the MLP go."""
    layers = [want["num_layers"]] if want.get("num_layers") else list(range(src.num_layers, math.ceil(src.num_layers / 2) - 1, -1))
    hidden = [want["hidden_size"]] if want.get("hidden_size") else width_options(src.hidden_size, src.hidden_size // 2, round_to)
    inter = [want["intermediate_size"]] if want.get("intermediate_size") else width_options(src.intermediate_size, src.intermediate_size // 4, round_to)
    heads = [want["heads"]] if want.get("heads") else [
        c for c in head_choices(src.num_attention_heads, src.num_key_value_heads) if c[0] * 2 >= src.num_attention_heads]
    fits = []
    for L in layers:
        for D in hidden:
            for I in inter:
                for h, kv in heads:
                    d = Dims(L, D, I, h, kv, src.head_dim)
                    n = count_params(d, vocab, tied)[0]
                    if n <= target:
                        fits.append((n, d))
    if not fits:
        smallest = min(count_params(Dims(layers[-1], hidden[-1], inter[-1], *heads[-1], src.head_dim), vocab, tied)[0], target * 10)
        raise ConfigError("target_params", f"{target / 1e6:.1f}M is below the smallest shape the search allows "
                                           f"({smallest / 1e6:.1f}M); give explicit sizes instead")
    best = max(n for n, _ in fits)
    floor = min(0.95 * target, 0.97 * best)  # close to the budget: a much smaller model wastes it
    return [d for n, d in fits if n >= floor]


def removed_mass(scores, keep: int) -> float:
    """Fraction of total (non-negative) importance that keeping the top `keep` units drops. scores: [..., N]"""
    s = scores.clamp(min=0).double()
    s = s / s.sum(-1, keepdim=True).clamp(min=1e-12)
    kept = s.sort(-1, descending=True).values[..., :keep].sum(-1)
    return float((1 - kept).mean())


def proxy_damage(d: Dims, scores: Scores, layer_scores) -> float:
    """Cheap ranking of candidate shapes: summed fraction of importance removed on every axis."""
    return (removed_mass(scores.mlp, d.intermediate_size) + removed_mass(scores.heads, d.num_attention_heads)
            + removed_mass(scores.hidden, d.hidden_size) + removed_mass(layer_scores, d.num_layers))


def pick_candidates(cands: list[Dims], src: Dims, scores: Scores, layer_scores, k: int) -> list[Dims]:
    """The best-proxy shape of every 'which axes shrink' pattern first (so layers vs widths vs heads
    are all tried), then the next best by proxy, up to k."""
    ranked = sorted(cands, key=lambda d: proxy_damage(d, scores, layer_scores))
    seen, out = set(), []
    for d in ranked:
        pattern = (d.num_layers < src.num_layers, d.hidden_size < src.hidden_size,
                   d.intermediate_size < src.intermediate_size, d.num_attention_heads < src.num_attention_heads)
        if pattern not in seen:
            seen.add(pattern)
            out.append(d)
    out = out[:k]
    for d in ranked:
        if len(out) >= k:
            break
        if d not in out:
            out.append(d)
    return out


# ---------------------------------------------------------------- what to keep


@dataclass
class Keep:
    """Original indices of everything that survives (sorted), per kept layer in new order."""

    layers: list[int]
    hidden: list[int]
    mlp: list[list[int]] = field(default_factory=list)      # [new layer] -> MLP channels
    heads: list[list[int]] = field(default_factory=list)    # [new layer] -> query heads, group-major
    kv: list[list[int]] = field(default_factory=list)       # [new layer] -> kv heads


def _top(scores, k: int) -> list[int]:
    """Indices of the k highest scores, in original order. scores: [N]"""
    return sorted(scores.topk(k).indices.tolist())


def plan_keep(scores: Scores, layer_scores, src: Dims, tgt: Dims) -> Keep:
    keep = Keep(layers=_top(layer_scores, tgt.num_layers), hidden=_top(scores.hidden, tgt.hidden_size))
    g, g_new = src.group, tgt.group
    for l in keep.layers:
        keep.mlp.append(_top(scores.mlp[l], tgt.intermediate_size))
        kv = _top(scores.kv[l], tgt.num_key_value_heads)
        heads = []
        for k in kv:  # the same number of query heads from every kept group, so GQA stays uniform
            group = scores.heads[l, k * g:(k + 1) * g]
            heads += [k * g + i for i in _top(group, g_new)]
        keep.kv.append(kv)
        keep.heads.append(heads)
    return keep


# ---------------------------------------------------------------- tensor surgery


def _span(units: list[int], width: int):
    """Head indices -> row/column indices: [h] -> [h*hd .. h*hd+hd-1] for every h."""
    import torch

    return torch.tensor([u * width + i for u in units for i in range(width)], dtype=torch.long)


def prune_state_dict(sd: dict, src: Dims, keep: Keep, rescale_norms: bool = True) -> dict:
    """New state dict holding only the kept units (the surgery). Weights are [out, in]."""
    import torch

    hid = torch.tensor(keep.hidden, dtype=torch.long)
    # RMSNorm divides by sqrt(mean(x^2)) over the hidden channels. Dropping low-energy channels keeps
    # the sum of squares but divides it by fewer channels, so every normalised activation would shrink
    # by sqrt(new/old); scaling the norm weights by sqrt(old/new) undoes that (exactly, when the removed
    # channels carry nothing).
    scale = math.sqrt(src.hidden_size / len(keep.hidden)) if rescale_norms else 1.0
    out = {}
    for key, t in sd.items():
        if not key.startswith("model.layers."):
            if key in ("model.embed_tokens.weight", "lm_head.weight"):  # [V, D]
                out[key] = t.index_select(1, hid)
            elif key == "model.norm.weight":
                out[key] = t.index_select(0, hid) * scale
            elif key == "lm_head.bias":
                out[key] = t
            else:
                raise EdgesmithError(f"tensor {key!r}: this architecture has weights pruning does not know how to couple")
    for new, old in enumerate(keep.layers):
        q = _span(keep.heads[new], src.head_dim)      # kept q rows / o columns
        kv = _span(keep.kv[new], src.head_dim)        # kept k/v rows
        mlp = torch.tensor(keep.mlp[new], dtype=torch.long)
        prefix = f"model.layers.{old}."
        for key in [k for k in sd if k.startswith(prefix)]:
            name, t = key[len(prefix):], sd[key]
            module, kind = name.rsplit(".", 1)
            if module == "self_attn.q_proj":
                t = t.index_select(0, q)
            elif module in ("self_attn.k_proj", "self_attn.v_proj"):
                t = t.index_select(0, kv)
            elif module in ("mlp.gate_proj", "mlp.up_proj"):
                t = t.index_select(0, mlp)
            elif module in ("self_attn.o_proj", "mlp.down_proj"):  # output side = hidden
                t = t.index_select(0, hid)
                if kind == "weight":
                    t = t.index_select(1, q if module == "self_attn.o_proj" else mlp)
            elif module in ("input_layernorm", "post_attention_layernorm",  # Gemma 3 also normalises before and
                            "pre_feedforward_layernorm", "post_feedforward_layernorm"):  # after the MLP
                t = t.index_select(0, hid) * scale
            elif module in ("self_attn.q_norm", "self_attn.k_norm"):  # Qwen3/Gemma 3: one [head_dim] norm for all heads
                pass
            else:
                raise EdgesmithError(f"tensor {key!r}: this architecture has weights pruning does not know how to couple")
            if kind == "weight" and t.dim() == 2 and module not in ("self_attn.o_proj", "mlp.down_proj"):
                t = t.index_select(1, hid)  # input side = hidden
            out[f"model.layers.{new}.{name}"] = t.contiguous()
    return out


PRUNABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def fixed_hidden(config, src: Dims, want: dict, pin: bool = False) -> None:
    """Gemma 3 keeps its hidden size: its RMSNorms scale by (1 + w), four per block, two of them on block outputs,
    and its embeddings are multiplied by sqrt(hidden_size), so the Llama recipe (drop channels, rescale the norm
    weights) does not carry over. Refuses a requested hidden size; `pin` fixes it for the --target-params search."""
    if getattr(config, "model_type", None) != "gemma3_text":
        return
    if want.get("hidden_size") not in (None, src.hidden_size):
        raise EdgesmithError(f"hidden-size pruning is not supported for Gemma 3 (hidden stays {src.hidden_size}); "
                             "prune the MLP (--intermediate-size), query heads (--num-attention-heads) or layers (--num-layers)")
    if pin:
        want["hidden_size"] = src.hidden_size


def new_config(config, src: Dims, tgt: Dims, keep: Keep):
    c = copy.deepcopy(config)
    c.hidden_size, c.intermediate_size = tgt.hidden_size, tgt.intermediate_size
    c.num_hidden_layers, c.num_attention_heads = tgt.num_layers, tgt.num_attention_heads
    c.num_key_value_heads = tgt.num_key_value_heads
    c.head_dim = src.head_dim  # explicit: hidden/heads no longer gives it
    if getattr(c, "layer_types", None):  # per-layer attention kinds (Qwen2 sliding window) follow the layers
        c.layer_types = [c.layer_types[i] for i in keep.layers]
    return c


def build_model(src_model, sd: dict, config):
    """A fresh model of the pruned config holding `sd` (no random init: every weight is given)."""
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = type(src_model)(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise EdgesmithError(f"pruned weights do not fit the pruned config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    model.generation_config = copy.deepcopy(src_model.generation_config)
    return model.eval()


def prune_model(model, keep: Keep, tgt: Dims, rescale_norms: bool = True):
    """Model -> pruned model (a new object; `model` is untouched)."""
    src = Dims.of(model.config)
    sd = prune_state_dict(model.state_dict(), src, keep, rescale_norms)
    return build_model(model, sd, new_config(model.config, src, tgt, keep))


# ---------------------------------------------------------------- data


TEACHER_PROMPTS = [
    "Explain how photosynthesis works.", "Write a short story about a lighthouse keeper.",
    "What are the main causes of inflation?", "Give three tips for learning a new language.",
    "Describe the water cycle to a ten-year-old.", "Write a Python function that reverses a string.",
    "Summarise the history of the Roman Empire in a paragraph.", "What is the difference between a virus and a bacterium?",
    "How do I make a cup of green tea?", "Write a polite email asking for a meeting next week.",
    "Why is the sky blue?", "List the planets of the solar system with one fact each.",
    "What is machine learning?", "Give advice for a first job interview.",
    "Describe a sunset over the ocean.", "How does a bicycle stay upright?",
]


def teacher_texts(model, tok, n: int, max_new_tokens: int, seed: int) -> list[str]:
    """Calibration text written by the model itself (when no data is at hand): sampled answers to
    varied prompts, rendered with the chat template so the statistics match how it is used. Sampled
    by the distill stage's one teacher sampler (its targets are not needed here: k=1)."""
    from edgesmith.distill.teacher_data import sample_with_targets

    prompts = [TEACHER_PROMPTS[i % len(TEACHER_PROMPTS)] for i in range(n)]
    if getattr(tok, "chat_template", None):
        seqs = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True) for p in prompts]
    else:
        seqs = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    out = []
    for b in range(0, len(seqs), 8):
        for r in sample_with_targets(model, seqs[b:b + 8], max_new_tokens, k=1, temperature=0.8, top_p=0.95,
                                     eos_ids=eos, pad_id=pad, seed=seed * 1_000_003 + b):
            out.append(tok.decode(r["ids"], skip_special_tokens=False))  # prompt + answer (+ eos when it stopped)
    return out


def calibration_texts(cfg: PruneConfig, tok) -> tuple[list[str], str] | None:
    """(texts, source) from --calib or the shared data, or None (then the teacher writes some)."""
    from edgesmith.data import read_records, render

    if cfg.calib:
        path = Path(cfg.calib)
        if not path.exists():
            raise EdgesmithError(f"{path}: calibration file not found")
        records, _ = read_records(path, skip_bad=True)
        return [render(r, tok) for r in records], str(path)
    root = data_dir()
    if root and (root / "instruct" / "alpaca_en_demo.json").is_file():
        path = root / "instruct" / "alpaca_en_demo.json"
        records, _ = read_records(path, skip_bad=True)
        return [render(r, tok) for r in records], str(path)
    return None


def pack(tok, texts: list[str], seq_len: int, limit: int):
    """Concatenate texts (eos between) and cut into full windows: [N, seq_len] token ids."""
    import torch

    ids: list[int] = []
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [eos]
        if len(ids) >= seq_len * limit:
            break
    n = min(limit, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def held_out_perplexity(model, windows) -> float:
    """The bench's perplexity (bench/metrics.py windows_nll: second half of each window scored, like llama-perplexity)
    of an in-memory model on held-out windows [N, T], so prune reports the number `edgesmith bench` would."""
    from edgesmith.bench.backends import HFLM
    from edgesmith.bench.metrics import windows_nll

    return math.exp(float(windows_nll(HFLM.wrap(model), [w.tolist() for w in windows]).mean()))


def calibration_loss(model, windows, batch_size: int = 4) -> float:
    """Mean next-token NLL over every position of the calibration windows [N, T]: how the shape search ranks
    candidates (a loss on the data they were calibrated on, not a reported perplexity)."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(windows), batch_size):
            ids = windows[b:b + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += ids[:, 1:].numel()
    return nll / max(1, count)


# ---------------------------------------------------------------- report


def speed_filter(cfg: PruneConfig, model, tok, src_dir: Path, cands: list, search: list[dict], scores, layer_scores,
                 out: Path, say) -> list[int]:
    """Time each candidate's Q4_K_M against the teacher's (compress/speed.py); record it in its search row and return
    the candidates at or above cfg.target_speedup. None reaching it is an error naming the fastest."""
    import tempfile

    from .speed import candidate_decode, q4km_decode

    with tempfile.TemporaryDirectory(prefix=".speed-", dir=out.parent if str(out.parent) else ".") as tmp:
        base = q4km_decode(src_dir, Path(tmp) / "teacher")
        say(f"  speed: teacher Q4_K_M decodes {base['decode_tok_s']:.1f} tok/s")
        for j, d in enumerate(cands):
            pr = prune_model(model, plan_keep(scores, layer_scores, Dims.of(model.config), d), d, cfg.rescale_norms)
            sp = candidate_decode(pr, tok, Path(tmp) / f"c{j}")
            search[j].update(decode_tok_s=sp["decode_tok_s"], file_mb=sp["file_mb"],
                             speedup=round(sp["decode_tok_s"] / base["decode_tok_s"], 3))
            say(f"  speed: {dims_dict(d)} -> {sp['decode_tok_s']:.1f} tok/s ({search[j]['speedup']:.2f}x the teacher)")
    for row in search:
        row["teacher_decode_tok_s"] = base["decode_tok_s"]
    ok = [j for j, row in enumerate(search) if row["speedup"] >= cfg.target_speedup]
    if not ok:
        best = max(search, key=lambda r: r["speedup"])
        raise EdgesmithError(f"--target-speedup {cfg.target_speedup}: no shape of {cfg.target_params} parameters reaches it on this "
                             f"machine (fastest {best['speedup']:.2f}x: {best['dims']}); lower --target-params or the speedup")
    return ok


def dims_dict(d: Dims) -> dict:
    return {"num_layers": d.num_layers, "hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size,
            "num_attention_heads": d.num_attention_heads, "num_key_value_heads": d.num_key_value_heads, "head_dim": d.head_dim}


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
            loss = calibration_loss(prune_model(model, plan_keep(scores, layer_scores, src, d), d, cfg.rescale_norms), search_windows, cfg.batch_size)
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
