"""Reference for exact-surgery tests (test_prune, test_gemma3): the original model with every removed unit zeroed."""
from __future__ import annotations

import copy

import torch


def zero_eps(model):
    """RMSNorm's eps is added to mean(x^2), which depends on the channel count: without it, zeroed
    hidden channels and removed ones are mathematically identical."""
    for mod in model.modules():
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = 0.0
    return model


def masked_reference(model, keep, src):
    """The original model with every removed unit zeroed where it WRITES, so it contributes nothing: hidden channels
    (embeddings and every writer into the residual), MLP channels (down_proj columns), query heads (o_proj columns),
    layers (o_proj and down_proj: a block writing zeros is the identity; Gemma's post-norms map zero to zero)."""
    m = copy.deepcopy(model)
    hd = src.head_dim
    gone_hidden = [c for c in range(src.hidden_size) if c not in keep.hidden]
    with torch.no_grad():
        m.model.embed_tokens.weight[:, gone_hidden] = 0
        for l, layer in enumerate(m.model.layers):
            o, down = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
            o[gone_hidden] = 0
            down[gone_hidden] = 0
            if l not in keep.layers:  # a layer whose writes are zero is the identity (residual)
                o.zero_()
                down.zero_()
                continue
            i = keep.layers.index(l)
            down[:, [j for j in range(src.intermediate_size) if j not in keep.mlp[i]]] = 0
            for h in range(src.num_attention_heads):
                if h not in keep.heads[i]:
                    o[:, h * hd:(h + 1) * hd] = 0
    return m
