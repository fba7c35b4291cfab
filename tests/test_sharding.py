"""train.sharding: fsdp (torch FSDP2 across `accelerate launch` processes): 2 CPU processes over gloo, each holding half
of the weights, gradients and AdamW states, reproduce a single-process run with the same global batch, its checkpoints
and its output files.

Run as a script (`accelerate launch ... tests/test_sharding.py --worker OUT MODEL`) it is the sharded worker of
test_fsdp_resume_after_sigint_matches_single_process.

Tolerances: the sharded and the single-process runs do the same fp32 arithmetic in another order (micro-batches of 1-2
examples instead of 2-4 block the matmuls' sums differently; a gradient is the sum of two processes' halves, averaged by
the reduce-scatter and scaled back by the loss). Measured here: the losses agree to the 6 decimals metrics.jsonl keeps
and the weights within 2e-6, after 3-6 AdamW steps at lr 3e-3 that move them up to 1.2e-2. The bounds (losses 1e-5
relative, weights 1e-4) are the DDP test's, which allows for other CPUs' fp32 kernels (~3e-5 seen); a missed
micro-batch, a gradient summed once or twice too often, or a slice loaded into the wrong place moves a weight by 1e-3
or more.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from edgesmith.errors import ConfigError, EdgesmithError
from edgesmith.trainconfig import TrainConfig
from multiproc import launch, two_processes

REPO = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-5    # per-step training and validation loss, relative
WEIGHT_ATOL = 1e-4  # every weight, absolute


def _held_lines(output: str) -> list[tuple[int, int]]:
    """(weights held, weights in the model) of each process, from train's `sharding fsdp: process r ...` lines."""
    import re

    return [(int(a), int(b)) for a, b in re.findall(r"sharding fsdp: process \d of 2 holds (\d+) of the model's (\d+) weights", output)]


def test_sharding_setting_and_refusals(capsys):
    """A typo is one line naming the key (exit 2); one process has nothing to split; with several, a setup FSDP2 cannot
    shard is refused in one line before anything is sharded."""
    from types import SimpleNamespace

    import torch
    from accelerate.utils import DistributedType

    from edgesmith.cli import main
    from edgesmith.sharding import shard_or_not

    with pytest.raises(ConfigError, match="sharding: expected one of none, fsdp"):
        TrainConfig(sharding="zero3")
    assert main(["distill", "--student", "nowhere", "--sharding", "zero3"]) == 2
    assert "sharding: expected one of none, fsdp, got 'zero3'" in capsys.readouterr().err
    fsdp, model = TrainConfig(sharding="fsdp"), torch.nn.Linear(4, 4)
    launched = lambda kind, n=2: SimpleNamespace(num_processes=n, distributed_type=kind)  # noqa: E731
    assert shard_or_not(fsdp, launched(DistributedType.MULTI_CPU), model)
    assert not shard_or_not(fsdp, launched(DistributedType.NO, 1), model)
    assert not shard_or_not(TrainConfig(), launched(DistributedType.MULTI_CPU), model)
    with pytest.raises(EdgesmithError, match="needs accelerate's plain multi-process launch, not DEEPSPEED"):
        shard_or_not(fsdp, launched(DistributedType.DEEPSPEED), model)
    model.register_parameter("packed", torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False))
    with pytest.raises(EdgesmithError, match="floating-point weights"):  # QLoRA's 4-bit weights are packed in uint8
        shard_or_not(fsdp, launched(DistributedType.MULTI_GPU), model)


# ---------------------------------------------------------------- the training loop: sharded resume after SIGINT


def _worker(out: str, model_dir: str) -> None:
    """Both processes: a sharded run that rank 0 alone interrupts during step 3, then its resume to step 6; writes what
    each process held while training and the final weights."""
    import torch
    from torch.distributed.tensor import DTensor

    from test_trainloop import _ce, _cfg, _run

    rank = int(os.environ["RANK"])  # set by the launcher
    held, calls = [], {"n": 0}

    def watching(model, batch):
        if model.training:  # between training forwards every weight is a DTensor of which this process holds half
            ps = list(model.parameters())
            held.append((all(isinstance(p, DTensor) for p in ps), sum(p.to_local().numel() for p in ps if isinstance(p, DTensor)),
                         sum(p.numel() for p in ps)))
        calls["n"] += model.training
        if rank == 0 and calls["n"] == 2 * 3:  # step 3 (2 micro-batches a step): SIGINT to this process only
            os.kill(os.getpid(), signal.SIGINT)
        return _ce(model, batch)

    cfg = dict(batch_size=1, grad_accum=2, sharding="fsdp", grad_checkpointing=True)
    try:
        _run(model_dir, Path(out), _cfg(**cfg), loss_fn=watching)
        raise AssertionError("not interrupted")
    except KeyboardInterrupt:
        pass
    model, res = _run(model_dir, Path(out), _cfg(resume=True, **cfg), loss_fn=watching)
    torch.save({"weights": {n: t.detach() for n, t in model.named_parameters()}, "held": held,
                "steps": res.steps, "world": res.world_size, "val": res.last_val_loss}, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).parent))
    _worker(sys.argv[2], sys.argv[3])


@pytest.mark.slow
def test_fsdp_resume_after_sigint_matches_single_process(tiny_llama, tmp_path):
    """2 sharded processes (batch 1 x 2 micro-batches each, gradient checkpointing, validation every 3 steps) that one
    SIGINT to rank 0 stops at step 3 and --resume finishes == one uninterrupted process with batch 2 x 2."""
    import torch

    from test_trainloop import _cfg, _run

    single, res = _run(tiny_llama, tmp_path / "single", _cfg(batch_size=2, grad_accum=2))
    p = launch(two_processes(str(Path(__file__)), "--worker", str(tmp_path / "fsdp"), str(tiny_llama)))
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "fsdp" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 6 and r0["world"] == 2
    assert r0["val"] == pytest.approx(res.last_val_loss, rel=LOSS_RTOL)
    for held in (r0["held"], r1["held"]):
        assert held and all(dt for dt, _, _ in held)
        assert all(local <= total // 2 + 64 * 8 for _, local, total in held)  # half, give or take a row
    assert sum(h[1] for h in r0["held"][:1] + r1["held"][:1]) == r0["held"][0][2]  # the halves make the whole
    # the checkpoint the sharded run wrote at step 3 resumed it: the metrics continue without duplicates
    losses = [m for m in map(json.loads, (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    ref = [m for m in map(json.loads, (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert [m["step"] for m in losses] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(losses, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (a, b)
    for n, t in single.named_parameters():
        assert torch.equal(r0["weights"][n], r1["weights"][n]), f"processes disagree at {n}"
        assert torch.allclose(r0["weights"][n], t, atol=WEIGHT_ATOL), f"{n}: {(r0['weights'][n] - t).abs().max()}"


# ---------------------------------------------------------------- the README's command: distill, sharded, as written


def _alpaca(path: Path, n: int = 24) -> Path:
    """n short Alpaca records (20 or more: distill holds out val_fraction of them for validation)."""
    import random

    rng = random.Random(0)
    words = "the cat dog runs sits on a mat under sun moon river stone bright quiet fast slow green blue house tree".split()
    say = lambda a, b: " ".join(rng.choice(words) for _ in range(rng.randint(a, b)))  # noqa: E731
    path.write_text(json.dumps([{"instruction": say(3, 8), "input": "", "output": say(5, 20)} for _ in range(n)]))
    return path


@pytest.mark.slow
def test_readme_fsdp_distill_command_matches_single_process(tiny_factory, tmp_path):
    """The README's sharded distill command, taken from the README, on a tiny teacher and a narrower student (so the
    hidden-state projection, an extra trained module, is sharded too), 3 steps of batch 2 in each of 2 processes ==
    the same command without launcher or sharding in one process with batch 4: per-step losses, validation loss, the
    saved model (same files, same tensors) and the resumable checkpoint (same layout, same values)."""
    import shlex

    import torch
    from safetensors.torch import load_file

    from edgesmith.cli import main

    teacher = tiny_factory("teacher")
    student = tiny_factory("student", hidden=32, intermediate=48, layers=2, seed=1)
    line = next(x for x in (REPO / "README.md").read_text().splitlines()
                if x.startswith(".venv/bin/accelerate launch") and "--sharding fsdp" in x)
    cmd = shlex.split(line)
    cmd[0] = str(Path(sys.executable).parent / "accelerate")
    cmd[cmd.index("--student") + 1] = str(student)
    cmd[cmd.index("--out") + 1] = str(tmp_path / "fsdp")
    tiny = [f"teacher={teacher}", f"data={_alpaca(tmp_path / 'data.json')}", "val_fraction=0.25", "max_length=64",
            "hidden_weight=0.1", "train.max_steps=3", "train.batch_size=2", "train.lr=3e-3", "train.warmup_steps=0",
            "train.precision=fp32", "train.save_every=2", "train.progress=false"]
    tiny = [a for kv in tiny for a in ("--set", kv)]
    p = launch(cmd + tiny)
    assert p.returncode == 0, p.stderr[-3000:]
    held = _held_lines(p.stdout)
    assert len(held) == 2 and all(local * 2 == total for local, total in held), held
    # the teacher runs during training (the data is a file, hidden_weight > 0): it is sharded too
    import re

    t_held = re.findall(r"distill: sharding fsdp: process \d of 2 holds (\d+) of the teacher's (\d+) weights", p.stdout)
    assert len(t_held) == 2 and all(int(a) * 2 == int(b) for a, b in t_held), t_held

    # one process: the same stage command and settings, without the launcher and the sharding, batch 4
    single = cmd[cmd.index("edgesmith.cli") + 1:]
    del single[single.index("--sharding"):single.index("--sharding") + 2]
    single[single.index("--out") + 1] = str(tmp_path / "single")
    assert main(single + tiny + ["--set", "train.batch_size=4"]) == 0

    fsdp, one = tmp_path / "fsdp", tmp_path / "single"
    metrics = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (fsdp, one)]
    assert [sorted(m) for m in metrics[0]] == [sorted(m) for m in metrics[1]]
    assert [m["step"] for m in metrics[0] if "loss" in m] == [1, 2, 3] and any("val_loss" in m for m in metrics[0])
    for a, b in zip(*metrics):
        for k in ("loss", "val_loss"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=LOSS_RTOL), (a, b)
    res = json.loads((fsdp / "distill.json").read_text())["result"]
    assert res["world_size"] == 2 and res["steps"] == 3
    # the output: the same files, the same tensors (names, shapes, dtypes), the same values
    assert sorted(f.name for f in fsdp.iterdir()) == sorted(f.name for f in one.iterdir())
    w, ref = load_file(fsdp / "model.safetensors"), load_file(one / "model.safetensors")
    start = load_file(student / "model.safetensors")
    assert {k: (t.shape, t.dtype) for k, t in w.items()} == {k: (t.shape, t.dtype) for k, t in ref.items()}
    for k in ref:
        assert torch.allclose(w[k], ref[k], atol=WEIGHT_ATOL), f"{k}: {(w[k] - ref[k]).abs().max()}"
    assert any(not torch.equal(ref[k], start[k]) for k in ref)  # the runs did train
    # the checkpoint: whole weights and AdamW states, laid out as a single process lays them out
    c, cref = (torch.load(d / "checkpoint" / "state.pt", weights_only=True) for d in (fsdp, one))
    assert c["step"] == cref["step"] == 3 and c["world_size"] * c["batch_size"] == cref["world_size"] * cref["batch_size"]
    assert any(k.startswith("hidden_proj.") for k in c["weights"])
    for k in cref["weights"]:
        assert torch.allclose(c["weights"][k], cref["weights"][k], atol=WEIGHT_ATOL), k
    assert c["optimizer"]["param_groups"] == cref["optimizer"]["param_groups"]
    for i, s in cref["optimizer"]["state"].items():
        for k, t in s.items():  # AdamW's moments, against their own scale: entries near 0 are sums that cancel
            assert c["optimizer"]["state"][i][k].shape == t.shape
            assert torch.allclose(c["optimizer"]["state"][i][k], t, rtol=1e-3, atol=1e-5 * float(t.abs().max())), (i, k)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["fsdp", "none"])
def test_sharded_teacher_with_blockwise_losses_matches_one_process(tiny_factory, tmp_path, sharding):
    """The teacher sharded too, its layer taps and embeddings read by the block-wise losses (phase, then mixed) and its
    hidden states by the hidden-state loss: 2 sharded processes with batch 1 == one process with batch 1 x 2
    accumulated micro-batches (the block distance is normalised per micro-batch, so that is the run to match). The same
    with DDP (sharding none), which refuses a step where some parameter gets no gradient (the head in the block phase)."""
    from edgesmith.cli import main

    teacher = tiny_factory("teacher", layers=3)
    student = tiny_factory("student", layers=2, seed=1)
    args = ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(_alpaca(tmp_path / "data.json")),
            "--max-length", "48"]
    for kv in ("val_fraction=0.2", "train.max_steps=4", "train.lr=3e-3", "train.warmup_steps=0", "train.precision=fp32",
               "train.progress=false", "block_phase=0.3", "block_weight=0.5", "hidden_weight=0.1", "train.batch_size=1"):
        args += ["--set", kv]
    p = launch(two_processes("-m", "edgesmith.cli", *args, "--out", str(tmp_path / "fsdp"), "--sharding", sharding))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("of the teacher's") == (2 if sharding == "fsdp" else 0)
    assert main(args + ["--out", str(tmp_path / "one"), "--set", "train.grad_accum=2"]) == 0
    runs = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("fsdp", "one")]
    assert [sorted(m) for m in runs[0]] == [sorted(m) for m in runs[1]] and len(runs[0]) == 6
    for a, b in zip(*runs):
        for k in ("loss", "val_loss"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=LOSS_RTOL), (a, b)
