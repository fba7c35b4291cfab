"""What to keep and the tensor surgery that keeps it: the top-scored units per axis (`plan_keep`), the state dict
cut to them with the Llama/Qwen/Gemma 3 couplings explicit (`prune_state_dict`), and the pruned config and model.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

from edgesmith.errors import EdgesmithError

from .importance import Dims, Scores


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


def _span(units: list[int], width: int):
    """Head indices -> row/column indices: [h] -> [h*hd .. h*hd+hd-1] for every h."""
    import torch

    return torch.tensor([u * width + i for u in units for i in range(width)], dtype=torch.long)


# the RMSNorms over the hidden channels in a decoder layer (Gemma 3 also normalises before and after the MLP)
HIDDEN_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


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
            elif module in HIDDEN_NORMS:
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


@contextmanager
def acting_pruned(model, keep: Keep, rescale_norms: bool = True):
    """Within the block, `model` computes what `prune_model(model, keep, ...)` would, with no weight copied: the dropped
    layers are out of its layer list, and removed units are zeroed by hooks where they enter or write: MLP channels at
    down_proj's input, query heads at o_proj's input, hidden channels wherever the residual stream is written
    (embeddings, o_proj, down_proj). Exact up to RMSNorm's epsilon, which is added to the mean of x^2 over all channels
    instead of the kept ones (the rescaled norms of the real surgery compensate the rest exactly). The --target-params
    search scores each candidate this way, so its memory stays one copy of the model however many shapes it tries."""
    import torch

    src = Dims.of(model.config)
    dec = model.model
    layers = dec.layers

    def mask(n: int, kept: list[int], width: int = 1):  # [n * width] of 1 (kept unit) / 0 (removed unit)
        m = torch.zeros(n, width)
        m[kept] = 1
        return m.flatten()

    def on_input(m):
        return lambda mod, args: (args[0] * m.to(args[0].dtype), *args[1:])

    def on_output(m):
        return lambda mod, args, out: out * m.to(out.dtype)

    handles = []
    try:
        hid = mask(src.hidden_size, keep.hidden) if len(keep.hidden) < src.hidden_size else None
        if hid is not None:
            handles.append(dec.embed_tokens.register_forward_hook(on_output(hid)))
        for new, old in enumerate(keep.layers):
            attn, mlp = layers[old].self_attn, layers[old].mlp
            if len(keep.heads[new]) < src.num_attention_heads:
                handles.append(attn.o_proj.register_forward_pre_hook(on_input(mask(src.num_attention_heads, keep.heads[new], src.head_dim))))
            if len(keep.mlp[new]) < src.intermediate_size:
                handles.append(mlp.down_proj.register_forward_pre_hook(on_input(mask(src.intermediate_size, keep.mlp[new]))))
            if hid is not None:
                handles += [attn.o_proj.register_forward_hook(on_output(hid)), mlp.down_proj.register_forward_hook(on_output(hid))]
        if hid is not None and not rescale_norms:  # the surgery then leaves every hidden-wide RMSNorm sqrt(D'/D) weaker
            f = torch.tensor(math.sqrt(len(keep.hidden) / src.hidden_size))
            norms = [dec.norm] + [getattr(layers[l], n) for l in keep.layers for n in HIDDEN_NORMS if hasattr(layers[l], n)]
            handles += [norm.register_forward_hook(on_output(f)) for norm in norms]
        dec.layers = torch.nn.ModuleList([layers[i] for i in keep.layers])  # each keeps its own attention type
        yield model
    finally:
        dec.layers = layers
        for h in handles:
            h.remove()
