"""Unstructured and N:M magnitude sparsity after structured pruning (`prune --sparsity 0.5|2:4`), stored dense."""
from __future__ import annotations

from edgesmith.errors import EdgesmithError


def apply_sparsity(model, spec: tuple) -> dict:
    """Zero the smallest-magnitude weights of every decoder linear layer, in place.

    ('unstructured', p): the p fraction of smallest |w| in each output row (every row stays alive).
    ('n:m', n, m): in each run of m consecutive inputs, keep the n largest (the 2:4 pattern GPUs
    accelerate). Embeddings and lm_head are left dense.
    """
    import torch

    zeros = total = 0
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                sparsify_(lin.weight, spec)
                zeros += int((lin.weight == 0).sum())
                total += lin.weight.numel()
    return sparsity_summary(spec, zeros, total)


def sparsify_(w, spec: tuple) -> None:
    """Zero the smallest |w| of one weight [out, in] in place, by apply_sparsity's rule."""
    if spec[0] == "unstructured":
        k = int(w.shape[1] * spec[1])
        if k:
            idx = w.abs().topk(k, dim=1, largest=False).indices  # [out, k]
            w.scatter_(1, idx, 0.0)
    else:
        n, m = spec[1], spec[2]
        if w.shape[1] % m:
            raise EdgesmithError(f"sparsity {n}:{m}: input width {w.shape[1]} is not a multiple of {m}")
        g = w.view(w.shape[0], -1, m)  # [out, in/m, m]
        idx = g.abs().topk(m - n, dim=2, largest=False).indices
        g.scatter_(2, idx, 0.0)


def sparsity_summary(spec: tuple, zeros: int, total: int) -> dict:
    return {
        "pattern": "unstructured" if spec[0] == "unstructured" else f"{spec[1]}:{spec[2]}",
        "target": spec[1] if spec[0] == "unstructured" else 1 - spec[1] / spec[2],
        "achieved": zeros / max(1, total),
        "zeros": zeros,
        "note": "weights are zeroed but stored dense: the safetensors/GGUF files keep the same size and CPU "
                "inference (llama.cpp, onnxruntime) runs at the same speed; only sparse kernels (e.g. 2:4 on "
                "NVIDIA GPUs) turn this into speed",
    }
