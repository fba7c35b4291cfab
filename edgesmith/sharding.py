"""sharding: fsdp for the training loop (edgesmith/trainloop.py): torch's FSDP2 over every `accelerate launch`
process, each holding 1/N of the weights, gradients and AdamW states; and the gathering that keeps a sharded run's
output and checkpoints exactly what one process writes (whole tensors, the single-process layout).

Every function that gathers (`gathered`, `trainable_state`, `optimizer_state`, `unshard_into`) is collective: all
processes must call it, in the same order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from edgesmith.errors import EdgesmithError

if TYPE_CHECKING:
    from edgesmith.trainconfig import TrainConfig


def shard_or_not(cfg: TrainConfig, acc, model) -> bool:
    """Whether this run shards (sharding: fsdp with several processes; one process has nothing to split). Refuses,
    in one line, a setup FSDP2 cannot shard."""
    import torch
    from accelerate.utils import DistributedType

    if cfg.sharding == "none" or acc.num_processes == 1:
        return False
    if acc.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise EdgesmithError(f"sharding: fsdp shards the model itself and needs accelerate's plain multi-process launch, "
                             f"not {acc.distributed_type.value} (drop FSDP/DeepSpeed from the accelerate config)")
    if any(not p.is_floating_point() for p in model.parameters()):
        raise EdgesmithError("sharding: fsdp needs floating-point weights; quantized ones (QLoRA) cannot be sharded")
    try:
        from torch.distributed import fsdp
    except ImportError:  # a torch built without distributed support
        fsdp = None
    if not hasattr(fsdp, "fully_shard"):
        raise EdgesmithError(f"sharding: fsdp needs torch.distributed's fully_shard (torch >= 2.6), not torch {torch.__version__}")
    return True


def shard_model(model, extra_modules: dict, device, world: int):
    """sharding: fsdp. torch's FSDP2 (`fully_shard`) over all processes: each decoder layer, then the rest of the model,
    is cut into 1/world slices, so a process keeps 1/world of the weights, gradients and AdamW states; a layer is whole
    only while it runs (all-gathered) and its gradients are reduce-scattered back into slices, averaged like DDP's.
    accelerate 1.15 turns its own FSDP on only for GPUs (on CPU its Accelerator stays plain multi-process), so the loop
    calls torch directly: the same code over gloo on CPU and nccl on GPU.

    fully_shard changes the module it is given for good (class, hooks, DTensor parameters), yet the stages save and
    merge the model they passed in. So it shards a copy that shares the caller's parameter objects (no weight is
    copied) and releases each whole tensor once its slices exist; `unshard_into` gives the caller whole weights back.
    The extra modules are used through the loss' closure, so they are sharded in place, per module owning weights.
    -> the sharded model, the one the loss is given."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(device.type, (world,))
    work = copy.deepcopy(model, {id(p): p for p in model.parameters()})
    # transformers names the blocks that must stay whole on one device (_no_split_modules): the units of sharding
    blocks = {n for m in work.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    for unit in [m for m in work.modules() if type(m).__name__ in blocks] + [work]:
        whole = [p for p in unit.parameters() if not isinstance(p, DTensor)]
        fully_shard(unit, mesh=mesh)
        for p in whole:  # the caller's tensor (moved to the device by fully_shard): its memory back, unit by unit
            p.data = p.data.new_empty(0)
    for mod in extra_modules.values():
        for m in mod.modules():
            if next(m.parameters(recurse=False), None) is not None:
                fully_shard(m, mesh=mesh)
    return work


def shard_frozen(model, device) -> tuple[int, int]:
    """sharding: fsdp for a model that only runs forward while another trains, distill's teacher: FSDP2 in place over
    all processes, per decoder layer and then the rest (as `shard_model`), so each process keeps 1/N of its layers' weights
    and a layer is whole only while it runs. The rest (embeddings, output head, final norm: FSDP's root unit) stays
    whole from the first forward on, as a root does without a backward: the distillation loss applies the teacher's
    head to its hidden states after the forward, and again where activation checkpoints recompute. Every forward is
    collective: all processes run each one. -> (weights this process holds, weights in the model)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise EdgesmithError("sharding: fsdp needs torch.distributed's fully_shard (torch >= 2.6)") from None
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    for unit in [m for m in model.modules() if type(m).__name__ in blocks] + [model]:
        fully_shard(unit, mesh=mesh)
    ps = list(model.parameters())
    return sum(p.to_local().numel() for p in ps), sum(p.numel() for p in ps)


def unshard_into(model, work) -> None:
    """The trained weights, whole, back into the caller's model on every process (one all-gather per tensor): the stage
    then saves and merges exactly what a single-process run hands it."""
    sharded = dict(work.named_parameters())
    for n, p in model.named_parameters():
        p.data = gathered(sharded[n].detach())


def gathered(t):
    """A sharded (DTensor) tensor made whole: an all-gather, so every process must call it. Others come back as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def sliced_like(t, p):
    """A whole tensor `t` cut the way parameter `p` is held: this process' slice when p is sharded, else t itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    return distribute_tensor(t.to(p.device), p.device_mesh, p.placements) if isinstance(p, DTensor) else t


def optimizer_state(opt, keep: bool = True) -> dict:
    """opt.state_dict() with every state tensor whole (sharded: all-gathers, every process calls it; only those with
    `keep` hold them, on the CPU): a sharded run's checkpoint is the one a single process writes."""
    sd = opt.state_dict()
    state: dict = {}
    for i, s in sd["state"].items():
        for k, v in s.items():
            t = gathered(v)
            if keep:
                state.setdefault(i, {})[k] = t.cpu() if hasattr(t, "cpu") else t  # bitsandbytes keeps `step` as an int
    return {**sd, "state": state}


def load_optimizer_state(opt, sd: dict) -> None:
    """The inverse of optimizer_state: each whole state tensor cut the way its parameter is held."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {i: {k: v if k == "step" else sliced_like(v, params[i]) for k, v in s.items()} for i, s in sd["state"].items()}
    opt.load_state_dict({**sd, "state": state})


def trainable_state(model, extra_modules: dict, keep: bool = True) -> dict:
    """Trainable tensors only (LoRA adapters stay small, full fine-tuning saves everything), whole, on the CPU.
    Sharded, every process must call it (one all-gather per tensor); only those with `keep` hold the result."""
    named = [(f"model.{n}", p) for n, p in model.named_parameters() if p.requires_grad]
    for key, mod in extra_modules.items():
        named += [(f"{key}.{n}", p) for n, p in mod.named_parameters()]
    out = {}
    for k, p in named:
        t = gathered(p.detach())
        if keep:
            out[k] = t.cpu().clone()
    return out


def load_trainable_state(model, extra_modules: dict, state: dict) -> None:
    import torch

    params = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    for key, mod in extra_modules.items():
        params.update({f"{key}.{n}": p for n, p in mod.named_parameters()})
    missing = set(params) - set(state)
    if missing:
        raise EdgesmithError(f"checkpoint does not match the model (missing {sorted(missing)[:3]} ...)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(sliced_like(state[k].to(p.device, p.dtype), p))
