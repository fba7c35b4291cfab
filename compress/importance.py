"""How `edgesmith prune` ranks what to remove: calibration statistics and the scoring math.

Everything here works on a Llama-family state dict (Llama, Mistral, Qwen2 share the key names)
plus, for the data-driven criteria, statistics gathered by `collect_stats` in ONE forward pass over
calibration windows. Scores are higher = more important; pruning keeps the top ones.

Coupled groups (what must be removed together so the model stays a plain Llama):
    MLP channel j of layer l:  gate_proj.weight[j, :], up_proj.weight[j, :], down_proj.weight[:, j]
    query head h of layer l:   q_proj rows h*hd:(h+1)*hd, o_proj columns h*hd:(h+1)*hd
    KV group k of layer l:     k_proj/v_proj rows k*hd:(k+1)*hd + the query heads k*g .. k*g+g-1
    hidden channel c:          embedding column c, every projection's input column c (q, k, v, gate,
                               up), every output row c (o, down), every RMSNorm weight c, lm_head column c
    layer l:                   everything under model.layers.l
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def lkey(layer: int, name: str) -> str:
    """State-dict key of a decoder-layer weight: lkey(3, 'mlp.up_proj') -> model.layers.3.mlp.up_proj.weight."""
    return f"model.layers.{layer}.{name}.weight"


@dataclass
class Dims:
    """The shape of a Llama-family decoder (what pruning changes)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def of(cls, config) -> "Dims":
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )


@dataclass
class Scores:
    """Importance of every prunable unit (higher = keep)."""

    mlp: Any     # torch.Tensor [L, I]  per MLP channel
    heads: Any   # torch.Tensor [L, H]  per query head
    kv: Any      # torch.Tensor [L, KV] per KV group (its K/V heads and all its query heads)
    hidden: Any  # torch.Tensor [D]     per residual-stream channel


# ---------------------------------------------------------------- calibration statistics


def collect_stats(model, windows, batch_size: int = 4, gram: bool = False) -> dict:
    """One pass over `windows` [N, T] token ids with hooks; returns running sums (float64):

    mlp_sq   [L, I]     sum of x^2 of the down_proj input   (Wanda's ||X_j||^2 for MLP channel j)
    attn_sq  [L, H*hd]  sum of x^2 of the o_proj input      (Wanda's ||X_c||^2 per head column)
    norm_abs [D]        sum of |x| of every RMSNorm output  (Minitron's hidden-channel activation)
    bi       [L]        sum over tokens of 1 - cos(layer input, layer output)   (block influence)
    tokens   int        tokens seen (the denominator of every mean)
    down_gram [L, I, I] sum of x xᵀ of the down_proj input (only with gram=True: least-squares reconstruction)
    """
    import torch

    dims = Dims.of(model.config)
    L, D = dims.num_layers, dims.hidden_size
    base = model.model  # skip lm_head: calibration never needs logits (saves ~20% on small models)
    st = {
        "mlp_sq": torch.zeros(L, dims.intermediate_size, dtype=torch.float64),
        "attn_sq": torch.zeros(L, dims.num_attention_heads * dims.head_dim, dtype=torch.float64),
        "norm_abs": torch.zeros(D, dtype=torch.float64),
        "bi": torch.zeros(L, dtype=torch.float64),
        "tokens": 0,
    }
    if gram:
        st["down_gram"] = torch.zeros(L, dims.intermediate_size, dims.intermediate_size, dtype=torch.float64)
    hooks = []

    def flat(x):  # [B, T, C] -> [B*T, C] float64
        return x.reshape(-1, x.shape[-1]).double()

    def norm_out(mod, args, out):  # hooks must return None, or they replace the module's output
        st["norm_abs"] += flat(out).abs().sum(0)

    for i, layer in enumerate(base.layers):
        def down_in(mod, args, i=i):
            x = flat(args[0])                                  # [B*T, I]
            st["mlp_sq"][i] += x.pow(2).sum(0)
            if gram:
                st["down_gram"][i] += (x.float().T @ x.float()).double()  # fp32 matmul: 10x faster, sums stay fp64

        def o_in(mod, args, i=i):
            st["attn_sq"][i] += flat(args[0]).pow(2).sum(0)

        def layer_io(mod, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            st["bi"][i] += (1 - torch.nn.functional.cosine_similarity(flat(x), flat(y), dim=-1)).sum()

        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(down_in))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(o_in))
        hooks.append(layer.register_forward_hook(layer_io, with_kwargs=True))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hooks.append(norm.register_forward_hook(norm_out))
    hooks.append(base.norm.register_forward_hook(norm_out))
    try:
        with torch.no_grad():
            for b in range(0, len(windows), batch_size):
                ids = windows[b:b + batch_size]
                base(input_ids=ids, use_cache=False)
                st["tokens"] += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return st


# ---------------------------------------------------------------- unit importance (MLP, heads, hidden)


def _head_cols(w, hd: int) -> Any:
    """o_proj-style [D, H*hd] -> [H, D, hd] view of each head's columns."""
    D, HH = w.shape
    return w.reshape(D, HH // hd, hd).permute(1, 0, 2)


def _head_rows(w, hd: int) -> Any:
    """q/k/v-style [H*hd, D] -> [H, hd, D] view of each head's rows."""
    return w.reshape(w.shape[0] // hd, hd, w.shape[1])


def magnitude_scores(sd: dict, dims: Dims, stats: dict | None = None, seed: int = 0) -> Scores:
    """Weight magnitude of each coupled group (no data needed).

    Heads: L2 norm of the head's q rows and o columns. MLP and hidden channels: the LARGEST |w| of
    the group (L-inf), because in small Llamas a few channels with modest L2 norm carry outlier
    weights that produce the model's massive activations. Measured on SmolLM2-135M (held-out ppl 7.3):
    MLP 1536->1024 by L2 norm gives ppl ~4e5, worse than random (~1.3e3); by max |w| ~61.
    Hidden 576->512 by L2 ~2.4e3 (random ~8e2); by max |w| of what writes the channel ~17.
    """
    import torch

    L, hd, g = dims.num_layers, dims.head_dim, dims.group
    mlp, heads, kv = [], [], []
    # hidden channel c is written by the embedding column c and every o/down output row c: [V, D] -> [D]
    hidden = sd["model.embed_tokens.weight"].abs().amax(0).double()  # |.| and max are exact: no [V, D] fp64 copy
    for l in range(L):
        w = {n: sd[lkey(l, n)].double() for n in LINEARS}
        # MLP channel j: up row j as the block sees it (RMSNorm weight folded in) times down column j
        pre_ff = f"model.layers.{l}.pre_feedforward_layernorm.weight"  # Gemma: the pre-MLP norm, scaling by (1 + w)
        norm_w = sd[pre_ff].double() + 1 if pre_ff in sd else sd[f"model.layers.{l}.post_attention_layernorm.weight"].double()  # [D]
        mlp.append((w["mlp.up_proj"] * norm_w).abs().amax(1) * w["mlp.down_proj"].abs().amax(0))  # [I]
        # query head h: its q rows and o columns
        h_sq = _head_rows(w["self_attn.q_proj"], hd).pow(2).sum((1, 2)) + _head_cols(w["self_attn.o_proj"], hd).pow(2).sum((1, 2))
        heads.append(h_sq.sqrt())
        # KV group k: its k/v rows plus all its query heads
        kv_sq = _head_rows(w["self_attn.k_proj"], hd).pow(2).sum((1, 2)) + _head_rows(w["self_attn.v_proj"], hd).pow(2).sum((1, 2))
        kv.append((kv_sq + h_sq.reshape(-1, g).sum(1)).sqrt())
        for n in ("self_attn.o_proj", "mlp.down_proj"):  # [D, in] -> [D]
            hidden = torch.maximum(hidden, w[n].abs().amax(1))
    return Scores(torch.stack(mlp).float(), torch.stack(heads).float(), torch.stack(kv).float(), hidden.float())


def activation_scores(sd: dict, dims: Dims, stats: dict, seed: int = 0) -> Scores:
    """Data-driven scores from `collect_stats`.

    MLP channels and heads, Wanda-style: sum over the weights that READ the unit of |W_ij| * ||X_j||
    (down_proj columns for a channel, o_proj columns for a head), i.e. how much of the output the
    unit actually carries on real text. Hidden channels, Minitron-style: the mean |activation| of
    the channel after every RMSNorm (what each block sees of it).
    """
    import torch

    L, hd, g = dims.num_layers, dims.head_dim, dims.group
    mlp, heads = [], []
    for l in range(L):
        x_mlp = stats["mlp_sq"][l].sqrt()   # [I]     ||X_j||_2 over calibration tokens
        x_att = stats["attn_sq"][l].sqrt()  # [H*hd]
        down = sd[lkey(l, "mlp.down_proj")].double().abs()  # [D, I]
        o = sd[lkey(l, "self_attn.o_proj")].double().abs()   # [D, H*hd]
        mlp.append(down.sum(0) * x_mlp)                                        # [I]
        heads.append((o.sum(0) * x_att).reshape(-1, hd).sum(1))              # [H*hd] -> [H]
    heads_t = torch.stack(heads)
    kv = heads_t.reshape(L, -1, g).sum(2)  # [L, H] -> [L, KV]: a group is worth its query heads
    hidden = stats["norm_abs"] / max(1, stats["tokens"])
    return Scores(torch.stack(mlp).float(), heads_t.float(), kv.float(), hidden.float())


def random_scores(sd: dict, dims: Dims, stats: dict | None = None, seed: int = 0) -> Scores:
    """Seeded uniform noise: the baseline every informed criterion must beat."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    L = dims.num_layers
    return Scores(
        torch.rand(L, dims.intermediate_size, generator=gen), torch.rand(L, dims.num_attention_heads, generator=gen),
        torch.rand(L, dims.num_key_value_heads, generator=gen), torch.rand(dims.hidden_size, generator=gen),
    )


# name -> fn(state_dict, dims, stats, seed) -> Scores   (the CLI's --importance choices)
IMPORTANCE = {"magnitude": magnitude_scores, "activation": activation_scores, "random": random_scores}
NEEDS_DATA = {"activation"}


# ---------------------------------------------------------------- layer importance (depth)


def block_influence(sd: dict, dims: Dims, stats: dict, seed: int = 0) -> Any:
    """1 - mean cosine(layer input, layer output) per layer (ShortGPT's Block Influence): a layer
    that barely turns the residual stream can go. [L]"""
    return (stats["bi"] / max(1, stats["tokens"])).float()


def layer_magnitude(sd: dict, dims: Dims, stats: dict | None = None, seed: int = 0) -> Any:
    """Sum of the Frobenius norms of a layer's projections: a data-free stand-in for block
    influence (on SmolLM2-135M it beats random but loses clearly to block influence). [L]"""
    import torch

    return torch.stack([sum(sd[lkey(l, n)].double().norm() for n in LINEARS) for l in range(dims.num_layers)]).float()


def layer_random(sd: dict, dims: Dims, stats: dict | None = None, seed: int = 0) -> Any:
    import torch

    return torch.rand(dims.num_layers, generator=torch.Generator().manual_seed(seed + 1))


# name -> fn(state_dict, dims, stats, seed) -> [L]   (the CLI's --layer-importance choices)
LAYER_IMPORTANCE = {"block-influence": block_influence, "magnitude": layer_magnitude, "random": layer_random}
LAYER_NEEDS_DATA = {"block-influence"}
