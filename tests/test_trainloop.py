"""The shared training loop: schedule, data order, exact resume after SIGINT, and 2-process DDP (gloo)
matching a single-process run with the same global batch.

Run as a script (`accelerate launch --multi_gpu --num_processes 2 tests/test_trainloop.py --worker OUT MODEL`) it is
the DDP worker used by test_ddp_two_processes_match_single_process.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from edgesmith.errors import ConfigError
from edgesmith.data import IGNORE, pack
from edgesmith.trainconfig import TrainConfig, collate, epoch_order, global_batch_indices, lr_at, parse_duration

REPO = Path(__file__).resolve().parents[1]


def test_parse_duration():
    assert parse_duration("15m") == 900
    assert parse_duration("90s") == 90
    assert parse_duration("90") == 90
    assert parse_duration("1h30m") == 5400
    with pytest.raises(ValueError):
        parse_duration("soon")
    with pytest.raises(ConfigError, match="time_budget"):
        TrainConfig(time_budget="15 minutes please")


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    mult = [lr_at(s, cfg) for s in range(20)]
    assert mult[:4] == [0.25, 0.5, 0.75, 1.0]
    assert mult[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(mult[4:], mult[5:]))          # monotone decay after warm-up
    assert lr_at(20, cfg) == pytest.approx(0.1)                       # ends at min_lr_ratio
    mid = 4 + 8
    assert lr_at(mid, cfg) == pytest.approx(0.1 + 0.9 * 0.5)          # half-way through the cosine


def test_data_order_is_a_pure_function_and_covers_each_epoch():
    n = 10
    assert epoch_order(n, 3, 0) == epoch_order(n, 3, 0)
    assert epoch_order(n, 3, 0) != epoch_order(n, 3, 1)
    # 5 steps x 1 micro x 4 = 20 positions = exactly two epochs, each a permutation
    seen = [i for s in range(5) for i in global_batch_indices(n, s, 0, 4, 1, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    # grad accumulation walks the same stream: (step 1, micro 0) with accum 2 == step 2 with accum 1
    assert global_batch_indices(n, 1, 0, 4, 2, seed=3) == global_batch_indices(n, 2, 0, 4, 1, seed=3)


def test_collate_and_pack():
    ex = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    b = collate(ex, pad_id=2)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 2]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, 9, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    blocks = pack(ex, seq_len=2)
    assert [x["input_ids"] for x in blocks] == [[5, 6], [7, 8]]  # a 1-token tail predicts nothing: dropped
    assert blocks[0]["labels"] == [IGNORE, 6]
    # the first token of the second document is never a target across the boundary
    assert blocks[1]["labels"] == [7, IGNORE]


# ---------------------------------------------------------------- tiny end-to-end runs


def _examples(n=12, seed=0):
    """Fixed token sequences of varying length (so token-weighted averaging matters)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        L = rng.randint(6, 20)
        ids = [rng.randrange(3, 2000) for _ in range(L)]
        labels = [IGNORE] * rng.randint(0, 3) + ids
        out.append({"input_ids": ids, "labels": labels[:L], "index": i})
    return out


def _ce(model, batch):
    from edgesmith.trainconfig import causal_lm_loss_sum

    return causal_lm_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])


def _run(model_dir, out, cfg, loss_fn=_ce):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    from edgesmith.trainloop import train

    res = train(model, _examples(), loss_fn, cfg, out, pad_id=2, val_examples=_examples(4, seed=1))
    return model, res


def _cfg(**kw):
    # fp32: the exactness checks (resume, accumulation, DDP) are about summation order, not reduced precision;
    # "auto" would pick bf16 autocast on CPUs with AVX512-BF16
    base = dict(lr=3e-3, warmup_steps=2, max_steps=6, batch_size=2, grad_accum=2, seed=1, progress=False,
                eval_every=3, keep_best=False, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_after_sigint_matches_uninterrupted(tiny_llama, tmp_path, optimizer):
    """With either optimizer: its moments (8-bit ones and their block scales too) come back exactly on resume."""
    import torch

    full, res_full = _run(tiny_llama, tmp_path / "full", _cfg(optimizer=optimizer))
    calls = {"n": 0}

    def interrupting(model, batch):
        calls["n"] += model.training  # validation batches (model.eval()) do not count
        if calls["n"] == 2 * 3:  # during step 3 (2 micro-batches per step): SIGINT like Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return _ce(model, batch)

    with pytest.raises(KeyboardInterrupt, match="step 3"):
        _run(tiny_llama, tmp_path / "cut", _cfg(optimizer=optimizer), loss_fn=interrupting)
    assert (tmp_path / "cut" / "checkpoint" / "state.pt").is_file()
    resumed, res_res = _run(tiny_llama, tmp_path / "cut", _cfg(resume=True, optimizer=optimizer))
    assert res_res.steps == res_full.steps == 6
    assert abs(res_res.train_loss - res_full.train_loss) < 1e-4
    assert abs(res_res.last_val_loss - res_full.last_val_loss) < 1e-4
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), n
    # metrics of the resumed run continue the interrupted ones without duplicates
    import json

    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "cut" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_adamw8bit_learns_like_adamw_with_8bit_moments(tiny_llama, tmp_path):
    """train.optimizer: adamw8bit (bitsandbytes, CPU path): the saved moments of every matrix of >= 4096 weights are
    uint8 (a quarter of AdamW's fp32 bytes), the run learns about as much as AdamW, the memory estimate counts 2 bytes
    per parameter for the moments instead of 8, and FSDP sharding is refused in one line."""
    import torch

    from edgesmith.memory import ModelShape, training_memory

    _run(tiny_llama, tmp_path / "adamw", _cfg(max_steps=12, save_every=12))
    model, _ = _run(tiny_llama, tmp_path / "8bit", _cfg(max_steps=12, save_every=12, optimizer="adamw8bit"))
    import json

    def drop(out):  # training loss at the first step minus the last (the tiny validation set is random tokens)
        losses = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
        return losses[0] - losses[-1]

    d8, d32 = drop(tmp_path / "8bit"), drop(tmp_path / "adamw")
    assert d32 > 0.5 and abs(d8 - d32) < 0.2 * d32, (d8, d32)

    def moments(out):  # optimizer state per parameter (AdamW: exp_avg/exp_avg_sq; AdamW8bit: state1/state2, which
        # bitsandbytes' state_dict nests under "__bnb_optimizer_quant_state__")
        states = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["optimizer"]["state"].values()
        return [s.get("__bnb_optimizer_quant_state__", s) for s in states]

    def nbytes(states):
        return sum(v.numel() * v.element_size() for s in states for v in s.values() if torch.is_tensor(v))

    q, f = moments(tmp_path / "8bit"), moments(tmp_path / "adamw")
    big = sorted(p.numel() for p in model.parameters() if p.numel() >= 4096)
    assert sorted(s["state1"].numel() for s in q if s["state1"].dtype == torch.uint8 == s["state2"].dtype) == big
    b8, b32 = nbytes(q), nbytes(f)
    assert b8 < 0.27 * b32, (b8, b32)
    s = ModelShape(params=10**9, layers=16, hidden=2048, intermediate=8192, vocab=32000)
    a, q = (training_memory(s, s.params, 1, 128, 128, optimizer=o)["AdamW states"] for o in ("adamw", "adamw8bit"))
    assert (a, q) == (8 * 10**9, 2 * 10**9)
    from edgesmith.memory import OPTIMIZER_STATE_BYTES
    from edgesmith.trainconfig import OPTIMIZERS

    assert set(OPTIMIZERS) == set(OPTIMIZER_STATE_BYTES)  # every choice has its estimate
    with pytest.raises(ConfigError, match="optimizer.*fsdp"):
        TrainConfig(optimizer="adamw8bit", sharding="fsdp")
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="sgd")


def test_time_budget_early_stopping_and_best_checkpoint(tiny_llama, tmp_path):
    _, res = _run(tiny_llama, tmp_path / "tb", _cfg(max_steps=1000, time_budget="1s", eval_every=0))
    assert res.stopped == "time_budget" and 1 <= res.steps < 1000
    # lr so high the validation loss only gets worse: early stopping fires, the baseline evaluation is the best one
    # and keep_best gives back the starting weights
    import torch
    from transformers import AutoModelForCausalLM

    model, res = _run(tiny_llama, tmp_path / "es", _cfg(lr=5.0, max_steps=12, eval_every=1, early_stopping=2, keep_best=True,
                                                       max_grad_norm=0, warmup_steps=0))
    assert res.stopped == "early_stopping" and res.steps < 12
    assert res.last_val_loss > res.first_val_loss and res.best_val_loss == res.first_val_loss
    start = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), model.parameters()))
    # a rate that learns: the best is a later evaluation, and its weights (not the last ones) come back
    model, res = _run(tiny_llama, tmp_path / "ok", _cfg(lr=3e-3, max_steps=6, eval_every=1, keep_best=True))
    assert res.best_val_loss < res.first_val_loss
    from edgesmith.data import IGNORE
    from edgesmith.trainconfig import collate

    with torch.no_grad():
        b = collate(_examples(4, seed=1), pad_id=2)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        y = b["labels"][:, 1:]
        val = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1])[y.reshape(-1) != IGNORE],
                                                y.reshape(-1)[y.reshape(-1) != IGNORE]).item()
    assert val == pytest.approx(res.best_val_loss, rel=1e-4)


def test_grad_accumulation_and_checkpointing_match_one_big_batch(tiny_llama, tmp_path):
    """Same global batch three ways (4x1, 2x2 with gradient checkpointing, 1x4) -> the same weights."""
    import torch

    kw = dict(max_steps=2, eval_every=0)
    big, _ = _run(tiny_llama, tmp_path / "big", _cfg(batch_size=4, grad_accum=1, **kw))
    acc2, _ = _run(tiny_llama, tmp_path / "acc2", _cfg(batch_size=2, grad_accum=2, grad_checkpointing=True, **kw))
    acc4, _ = _run(tiny_llama, tmp_path / "acc4", _cfg(batch_size=1, grad_accum=4, **kw))
    from transformers import AutoModelForCausalLM

    start = dict(AutoModelForCausalLM.from_pretrained(str(tiny_llama)).named_parameters())
    moved = False
    # same tolerance as the DDP test: only the fp32 summation order differs
    for (n, a), (_, b), (_, c) in zip(big.named_parameters(), acc2.named_parameters(), acc4.named_parameters()):
        assert torch.allclose(a, b, atol=2e-5) and torch.allclose(a, c, atol=2e-5), n
        moved |= not torch.allclose(a, start[n], atol=1e-6)
    assert moved  # the runs did train


def test_bf16_autocast_on_cpu(tiny_llama, tmp_path):
    """precision bf16 on CPU runs under autocast (fp32 master weights) and records the precision."""
    model, res = _run(tiny_llama, tmp_path / "bf16", _cfg(precision="bf16", max_steps=2, eval_every=0))
    assert res.precision == "bf16" and res.steps == 2
    assert res.train_loss == res.train_loss  # finite, not NaN
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in model.parameters())


def test_ddp_two_processes_match_single_process(tiny_llama, tmp_path):
    """accelerate launch, 2 CPU processes (gloo), batch 2 each == 1 process with batch 4."""
    import torch

    from multiproc import launch

    single, _ = _run(tiny_llama, tmp_path / "single", _cfg(batch_size=4, grad_accum=1, max_steps=3, eval_every=0))
    # `--multi_gpu` is accelerate's torchrun launcher; with no GPU the Accelerator runs DDP over gloo on CPU
    # (`--cpu` with several processes would need mpirun)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(Path(__file__)), "--worker", str(tmp_path / "ddp"), str(tiny_llama)]
    p = launch(cmd, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    w0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    w1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    ref = {n: t.detach() for n, t in single.named_parameters()}
    for n in ref:
        assert torch.equal(w0[n], w1[n]), f"ranks out of sync at {n}"
        # 1e-4 is 1% of what 3 AdamW steps at lr 3e-3 move a weight: a wrong loss scaling would be off by ~50%;
        # fp32 kernels blocked for batch 2 vs 4 (AVX-512 vs AVX2 machines differ) leave ~3e-5
        assert torch.allclose(w0[n], ref[n], atol=1e-4), f"DDP differs from single process at {n}: {(w0[n] - ref[n]).abs().max()}"


def _worker(out: str, model_dir: str) -> None:
    import torch
    from accelerate import PartialState

    model, _ = _run(model_dir, Path(out), _cfg(batch_size=2, grad_accum=1, max_steps=3, eval_every=0))
    rank = PartialState().process_index
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({n: t.detach().cpu() for n, t in model.named_parameters()}, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[2], sys.argv[3])


def test_auto_precision_follows_the_cpu(monkeypatch):
    """auto: bf16 autocast only where /proc/cpuinfo reports AVX512-BF16 or AMX-BF16, fp32 elsewhere (no CUDA here)."""
    import torch

    from edgesmith import trainloop as TL

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for fast, want in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(TL, "cpu_has_fast_bf16", lambda f=fast: f)
        assert TL._autocast_dtype(TrainConfig(precision="auto"), "cpu") == want
    assert TL._autocast_dtype(TrainConfig(precision="fp32"), "cpu") == "no"


def test_time_schedule_decays_over_the_budget():
    cfg = TrainConfig(lr=1.0, warmup_steps=2, max_steps=100_000, min_lr_ratio=0.1, schedule="time", time_budget="10m")
    assert lr_at(0, cfg, 0.0) == 0.5                                  # warm-up still counts steps
    assert abs(lr_at(10, cfg, 0.0) - 1.0) < 1e-9 and abs(lr_at(10, cfg, 0.5) - 0.55) < 1e-9
    assert abs(lr_at(10, cfg, 1.0) - 0.1) < 1e-9 and abs(lr_at(10, cfg, 3.0) - 0.1) < 1e-9
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="time")                                  # needs a budget


@pytest.mark.slow
def test_readme_accelerate_launch_command_runs_as_written(tiny_llama, shared_data, tmp_path):
    """The README's multi-process command, taken from the README itself, on a tiny model for 2 steps: two processes
    train together and the adapter is written once."""
    import json
    import shlex

    from multiproc import launch

    line = next(x for x in (REPO / "README.md").read_text().splitlines() if x.startswith(".venv/bin/accelerate launch"))
    cmd = shlex.split(line)
    cmd[0] = str(Path(sys.executable).parent / "accelerate")
    cmd[cmd.index("--out") + 1] = str(tmp_path / "ddp")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads((shared_data / "instruct" / "alpaca_en_demo.json").read_text())[:16]))
    cmd += ["--set", f"model={tiny_llama}", "--set", f"data={data}", "--set", "train.max_steps=2", "--set", "max_length=64",
            "--set", "train.batch_size=2", "--set", "train.progress=false", "--set", "train.eval_every=0", "--set", "val_fraction=0"]
    p = launch(cmd)  # on a free port: accelerate's launcher ignores MASTER_PORT
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "ddp" / "finetune.json").read_text())["result"]
    assert res["world_size"] == 2 and res["steps"] == 2
    assert (tmp_path / "ddp" / "adapter_model.safetensors").is_file()
