"""Writing a pruned checkpoint the way save_pretrained would, one decoder layer at a time (`edgesmith prune`'s output).

The pruned model is never materialised: its shapes come from a meta-device skeleton, each safetensors file's header is
computed from them first, then every group of tensors is cut from the source (compress/surgery.py), refit and
sparsified on the way, appended and freed. Memory stays near one copy of the source plus one layer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from edgesmith.errors import EdgesmithError

from .importance import Dims
from .sparsity import sparsify_, sparsity_summary

# Largest safetensors file of the pruned checkpoint (save_pretrained's default): a model above it is written as
# model-0000k-of-0000n.safetensors + model.safetensors.index.json. Memory does not depend on it: every source tensor is
# freed as soon as its pruned copy exists (write_pruned).
MAX_SHARD_SIZE = "5GB"


def checkpoint_dtype(hf_config: dict) -> str:
    """The precision a checkpoint is stored in (config.json's dtype). bfloat16/float16 checkpoints are pruned and
    written in it (an fp32 upcast would double the memory for nothing); anything else is float32."""
    d = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return d if d in ("bfloat16", "float16") else "float32"


def source_key(name: str, keep) -> str:
    """Pruned key -> the source key it is cut from (decoder layers are renumbered: new i <- keep.layers[i])."""
    if name.startswith("model.layers."):
        i, rest = name[len("model.layers."):].split(".", 1)
        return f"model.layers.{keep.layers[int(i)]}.{rest}"
    return name


def shard_plan(skeleton, dtype, max_shard_size=MAX_SHARD_SIZE):
    """save_pretrained's own split of a model into safetensors files (huggingface_hub's: tensors in module order, a
    tied copy left out by the model's _tied_weights_keys, a new file when the next tensor would pass max_shard_size),
    planned on a meta-device skeleton, so nothing is materialised to plan it. Returns (split, {name: meta tensor})."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    sd = {k: torch.empty(v.shape, dtype=dtype, device="meta") for k, v in skeleton.state_dict().items()}
    shared: dict = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    patterns = getattr(skeleton, "_tied_weights_keys", None) or []
    for names in shared.values():  # save_pretrained's rule: of names sharing one tensor, drop the declared tied ones
        drop = [n for n in sorted(names) if any(re.search(pat, n) for pat in patterns)][: len(names) - 1]
        for n in drop:
            sd.pop(n, None)
    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    return split, sd


SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def safetensors_header(tensors: list, metadata: dict) -> tuple[bytes, list]:
    """The header safetensors' save_file writes for `tensors` [(name, meta tensor)] of ONE dtype: tensors ordered by
    name, data back to back in that order, compact JSON ({"__metadata__": ..., name: {dtype, shape, data_offsets}}) padded
    with spaces to a multiple of 8 bytes, after its length as a little-endian u64. Returns (header bytes, names in
    file order), so a file can be written one tensor at a time with the bytes save_file would produce."""
    order = sorted(tensors, key=lambda nt: nt[0])
    head, offset = {"__metadata__": metadata}, 0
    for name, t in order:
        n = t.numel() * t.element_size()
        head[name] = {"dtype": SAFETENSORS_DTYPES[str(t.dtype).split(".")[1]], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, [name for name, _ in order]


def write_pruned(src_sd: dict, src: Dims, keep, config, model_cls, generation_config, dest: Path, dtype,
                 rescale_norms: bool = True, grams=None, ridge: float = 0.01, sparsity: tuple | None = None,
                 max_shard_size=MAX_SHARD_SIZE) -> dict:
    """Write the pruned checkpoint into `dest` byte for byte as save_pretrained would (config.json,
    generation_config.json, then model.safetensors, or shards + model.safetensors.index.json), one layer at a time:
    each file's header is computed from the pruned shapes first, then every group of tensors (one decoder layer, or one
    embedding/norm/head) is cut from `src_sd` by prune_state_dict, refit (grams: --reconstruct ls) and sparsified,
    appended and freed. Source tensors leave `src_sd` as they are used (dropped layers at once), so memory stays near
    one copy of the source model plus one layer. Returns {"params", "reconstruction": per-layer rows, "sparsity"}."""
    import torch

    from .importance import LINEARS
    from .prune import param_counts  # prune imports this module at its top
    from .surgery import prune_state_dict
    from .reconstruct import refit_layer

    if str(dtype).split(".")[1] not in SAFETENSORS_DTYPES:
        raise EdgesmithError(f"cannot write a pruned checkpoint in {dtype}")
    with torch.device("meta"):  # shapes, key order, tying and parameter counts of the pruned model: no memory
        skeleton = model_cls(config)
    plan, metas = shard_plan(skeleton, dtype, max_shard_size)
    # what save_pretrained records in config.json
    config.dtype = str(dtype).split(".")[1]
    config.architectures = [model_cls.__name__]
    if skeleton.can_generate():
        for k, v in config._get_non_default_generation_parameters().items():
            setattr(generation_config, k, v)
            setattr(config, k, None)
    config.save_pretrained(dest)
    if skeleton.can_generate():
        generation_config.save_pretrained(dest)

    needed = {source_key(n, keep) for names in plan.filename_to_tensors.values() for n in names}
    for k in [k for k in src_sd if k not in needed]:  # dropped layers, a tied copy: free them before anything is cut
        del src_sd[k]
    linears = {f"{n}.weight" for n in LINEARS}
    refits, zeros, total = {}, 0, 0

    def group_of(name):  # tensors cut together: a decoder layer's, or a single top-level tensor
        return name.split(".")[2] if name.startswith("model.layers.") else name

    for fname, names in plan.filename_to_tensors.items():
        header, order = safetensors_header([(n, metas[n]) for n in names], {"format": "pt"})
        with open(dest / fname, "wb") as f:
            f.write(header)
            i = 0
            while i < len(order):
                j = i
                while j < len(order) and group_of(order[j]) == group_of(order[i]):
                    j += 1
                group = order[i:j]  # sorted names keep a layer's tensors together ("layers.1." < "layers.10.")
                sub = {source_key(n, keep): src_sd.pop(source_key(n, keep)) for n in group}
                cut = prune_state_dict(sub, src, keep, rescale_norms)
                if set(cut) != set(group):
                    raise EdgesmithError(f"pruned tensors do not fit the pruned config ({sorted(set(cut) ^ set(group))[:3]})")
                for n in group:
                    layer, _, rest = n[len("model.layers."):].partition(".") if n.startswith("model.layers.") else ("", "", "")
                    t = cut.pop(n)
                    if grams is not None and rest == "mlp.down_proj.weight":
                        new = int(layer)
                        w_new, before, after = refit_layer(sub[source_key(n, keep)], grams[keep.layers[new]], keep.hidden,
                                                           keep.mlp[new], ridge)
                        t = w_new
                        refits[new] = {"layer": keep.layers[new], "error_cut": round(before, 6), "error_refit": round(after, 6)}
                    t = t.to(dtype).contiguous()
                    if sparsity is not None and rest in linears:
                        sparsify_(t, sparsity)
                        zeros += int((t == 0).sum())
                        total += t.numel()
                    if tuple(t.shape) != tuple(metas[n].shape):
                        raise EdgesmithError(f"pruned tensor {n}: shape {tuple(t.shape)}, the pruned config expects {tuple(metas[n].shape)}")
                    f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
                    del t
                del sub, cut
                i = j
    if plan.is_sharded:  # the index exactly as save_pretrained writes it
        index = {"metadata": {"total_parameters": skeleton.num_parameters(), **plan.metadata},
                 "weight_map": plan.tensor_to_filename}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"params": param_counts(skeleton), "reconstruction": [refits[i] for i in sorted(refits)] if grams is not None else None,
            "sparsity": sparsity_summary(sparsity, zeros, total) if sparsity is not None else None}
