"""The target shape of a pruned model: absolute sizes or per-axis ratios resolved against the source, widths
rounded to multiples that quantise cleanly, GQA-valid head counts, and the --target-params search space with its
cheap ranking (score mass removed) that picks the finalists prune then measures.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from edgesmith.errors import ConfigError

from .importance import Dims, Scores

if TYPE_CHECKING:
    from .prune import PruneConfig

MIN_ROUND = 32  # legacy GGUF quants tile rows in blocks of 32: never round to anything finer


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


def dims_dict(d: Dims) -> dict:
    return {"num_layers": d.num_layers, "hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size,
            "num_attention_heads": d.num_attention_heads, "num_key_value_heads": d.num_key_value_heads, "head_dim": d.head_dim}
