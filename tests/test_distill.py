"""edgesmith distill: the divergences, chunked == unchunked (values and gradients), the top-k cache, the
vocabulary check, the teacher-generated corpus, and end-to-end runs on tiny models (full and LoRA,
different widths with a learned hidden-state projection)."""
from __future__ import annotations

import json
import math

import pytest

from edgesmith.errors import ConfigError, EdgesmithError


def _logits(n=5, v=11, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2


def test_divergences_match_definitions():
    import torch
    import torch.nn.functional as F

    from edgesmith.distill.losses import LOSSES, js_divergence, kd_loss_full, kl_forward, kl_reverse

    s, t = _logits(seed=0), _logits(seed=1)
    sl, tl = F.log_softmax(s, -1), F.log_softmax(t, -1)
    ref = F.kl_div(sl, tl, log_target=True, reduction="none").sum(-1)  # KL(t || s)
    assert torch.allclose(kl_forward(sl, tl), ref, atol=1e-6)
    assert torch.allclose(kl_reverse(sl, tl), kl_forward(tl, sl), atol=1e-6)
    js = js_divergence(sl, tl)
    assert torch.allclose(js, js_divergence(tl, sl), atol=1e-6)           # symmetric
    assert bool((js >= 0).all()) and bool((js <= math.log(2) + 1e-6).all())  # bounded by log 2
    for kind in LOSSES:
        assert torch.allclose(kd_loss_full(s, s.clone(), 2.0, kind), torch.zeros(5), atol=1e-6)  # zero at equality
    # temperature: T² · KL(softmax(t/T) || softmax(s/T))
    T = 3.0
    manual = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1) * T * T
    assert torch.allclose(kd_loss_full(s, t, T, "forward_kl"), manual, atol=1e-5)


def test_topk_with_full_support_equals_full_loss():
    import torch
    import torch.nn.functional as F

    from edgesmith.distill.losses import LOSSES, kd_loss_full, kd_loss_topk

    s, t = _logits(seed=2), _logits(seed=3)
    v, i = F.log_softmax(t, -1).topk(t.shape[-1], dim=-1)
    for kind in LOSSES:
        assert torch.allclose(kd_loss_topk(s, i, v, 1.7, kind), kd_loss_full(s, t, 1.7, kind), atol=1e-5), kind
    # a small k still gives a finite, non-negative forward KL ...
    v4, i4 = F.log_softmax(t, -1).topk(4, dim=-1)
    kl = kd_loss_topk(s, i4, v4, 1.0, "forward_kl")
    assert bool(torch.isfinite(kl).all()) and bool((kl >= -1e-6).all()) and float(kl.max()) > 0.01
    # ... that vanishes when the student puts the teacher's renormalised top-k mass there and nothing elsewhere
    copy = torch.full_like(t, -1e4).scatter(-1, i4, v4)                   # student logits = teacher's top-4 log-probs
    assert torch.allclose(kd_loss_topk(copy, i4, v4, 1.0, "forward_kl"), torch.zeros(5), atol=1e-5)


def test_config_validation():
    from edgesmith.distill.distill import DistillConfig

    with pytest.raises(ConfigError, match="loss"):
        DistillConfig(loss="kl")
    with pytest.raises(ConfigError, match="layer_pairs"):
        DistillConfig(layer_pairs=["middle"])
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=0)


def test_seed_prompts_are_varied():
    from edgesmith.distill.teacher_data import prompt_order, seed_prompts

    rows = seed_prompts()
    prompts = [r["prompt"] for r in rows]
    assert len(rows) >= 300 and len(set(prompts)) == len(prompts)
    assert len({r["topic"] for r in rows}) >= 10
    order = prompt_order(len(rows) + 5, len(rows), seed=0)
    assert sorted(order[:len(rows)]) == list(range(len(rows)))  # every prompt once before any repeats


def _models(tiny_factory):
    teacher = tiny_factory("teacher", hidden=64, layers=2, seed=0)
    student = tiny_factory("student", hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, seed=1)
    return teacher, student


def test_chunked_loss_equals_unchunked_with_gradients(tiny_factory):
    import torch

    from edgesmith.distill.distill import DistillConfig
    from edgesmith.distill.losses import make_loss_fn
    from edgesmith.modelio import load_model
    from edgesmith.data import IGNORE
    from edgesmith.trainconfig import collate

    t_dir, s_dir = _models(tiny_factory)
    teacher, student = load_model(t_dir), load_model(s_dir)
    student.train()
    ex = [{"input_ids": list(range(5, 25)), "labels": [IGNORE] * 3 + list(range(8, 25))},
          {"input_ids": list(range(40, 52)), "labels": list(range(40, 52))}]
    batch = collate(ex, pad_id=2)
    proj = torch.nn.ModuleList([torch.nn.Linear(32, 64, bias=False)])
    results = []
    for chunk in (7, 10_000):
        cfg = DistillConfig(student="x", chunk_size=chunk, ce_weight=0.3, hidden_weight=0.5, temperature=2.0, loss="js")
        student.zero_grad()
        loss, n = make_loss_fn(teacher, cfg, [(1, 2)], proj)(student, batch)
        loss.backward()
        results.append((loss.item(), n, student.model.embed_tokens.weight.grad.clone()))
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2 == 17 + 11  # positions whose next token is a label
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-5)  # summation order differs, nothing else


def test_refuses_different_vocabularies(tiny_factory, tmp_path):
    from transformers import AutoTokenizer

    from edgesmith.distill.distill import DistillConfig, run

    t_dir, s_dir = _models(tiny_factory)
    tok = AutoTokenizer.from_pretrained(str(s_dir))
    tok.add_tokens(["<|brand_new_token|>"])
    tok.save_pretrained(str(s_dir))
    with pytest.raises(EdgesmithError, match="do not share a vocabulary.*brand_new_token"):
        run(DistillConfig(teacher=str(t_dir), student=str(s_dir), data="teacher:2", out=str(tmp_path / "o")))


def _data(tmp_path, n=16):
    rows = [{"instruction": f"Say something about number {i}.", "output": f"Number {i} is {'even' if i % 2 == 0 else 'odd'}, "
             f"and {i} plus one is {i + 1}."} for i in range(n)]
    p = tmp_path / "data.json"
    p.write_text(json.dumps(rows))
    return p


def test_distill_end_to_end_hidden_projection_and_topk_cache(tiny_factory, tmp_path, monkeypatch):
    from edgesmith.distill.distill import DistillConfig, run
    from edgesmith.hfdir import check_hf_dir
    from edgesmith.modelio import load_model
    from edgesmith.trainconfig import TrainConfig

    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    t_dir, s_dir = _models(tiny_factory)
    data = _data(tmp_path)
    common = dict(teacher=str(t_dir), student=str(s_dir), data=str(data), max_length=32, val_fraction=0.0)
    tcfg = dict(lr=1e-2, max_steps=6, warmup_steps=1, batch_size=4, progress=False)
    out = run(DistillConfig(**common, out=str(tmp_path / "a"), hidden_weight=0.5, layer_pairs=["1:2"], train=TrainConfig(**tcfg)))
    check_hf_dir(out)
    man = json.loads((out / "distill.json").read_text())
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]  # the student moves towards the teacher
    assert man["layer_pairs"] == ["1:2"]
    assert load_model(out).config.hidden_size == 32  # the projection is a training aid, not part of the student

    out_b = run(DistillConfig(**common, out=str(tmp_path / "b"), cache_teacher_topk=8, train=TrainConfig(**tcfg)))
    caches = list((tmp_path / "cache" / "teacher-topk").iterdir())
    assert len(caches) == 1
    import numpy as np

    idx, logp = np.load(caches[0] / "idx.npy"), np.load(caches[0] / "logp.npy")
    assert idx.shape[1] == logp.shape[1] == 8 and idx.shape[0] == json.loads((caches[0] / "meta.json").read_text())["rows"] > 0
    assert bool((np.diff(logp.astype(np.float32), axis=1) <= 1e-3).all())  # sorted top-k log-probs
    losses_b = [json.loads(x)["loss"] for x in (out_b / "metrics.jsonl").read_text().splitlines()]
    assert losses_b[-1] < losses_b[0]
    mtime = caches[0].stat().st_mtime
    run(DistillConfig(**common, out=str(tmp_path / "c"), cache_teacher_topk=8, train=TrainConfig(**{**tcfg, "max_steps": 1})))
    assert caches[0].stat().st_mtime == mtime  # reused, not rebuilt


def test_teacher_corpus_and_lora_student(tiny_factory, tmp_path, monkeypatch):
    import torch

    from edgesmith.distill.distill import DistillConfig, run
    from edgesmith.distill.teacher_data import generate_corpus
    from edgesmith.modelio import load_model

    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    t_dir = tiny_factory("teacher", seed=0)
    s_dir = tiny_factory("student", seed=1)
    p = generate_corpus(str(t_dir), 6, max_new_tokens=6, batch_size=4, progress=False)
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    assert len(rows) <= 6 and all(r["messages"][0]["role"] == "user" and r["messages"][1]["content"] for r in rows)
    assert p.parent == tmp_path / "cache" / "teacher-data"
    assert generate_corpus(str(t_dir), 6, max_new_tokens=6, batch_size=4, progress=False) == p  # cached

    from edgesmith.trainconfig import TrainConfig

    out = run(DistillConfig(teacher=str(t_dir), student=str(s_dir), data="teacher:6", teacher_max_new_tokens=6,
                            teacher_batch_size=4, out=str(tmp_path / "d"), lora=True, max_length=32, val_fraction=0.0,
                            train=TrainConfig(lr=5e-2, max_steps=2, warmup_steps=0, batch_size=2, progress=False)))
    assert not (out / "adapter_config.json").exists()  # LoRA merged into a plain checkpoint
    before, after = load_model(s_dir), load_model(out)
    diff = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)]
    assert diff and all(any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) for n in diff)
    assert json.loads((out / "distill.json").read_text())["data"]["kind"] == "teacher"


def test_cli_errors(capsys):
    from edgesmith.cli import main

    assert main(["distill", "--teacher", "default", "--out", "/tmp/x"]) == 2
    assert "no --student" in capsys.readouterr().err
    assert main(["distill", "--student", "s", "--loss", "kl"]) == 2
    assert "loss: expected one of forward_kl, reverse_kl, js" in capsys.readouterr().err


def _corpus_spec(**kw):
    from edgesmith.distill.teacher_data import CorpusSpec

    return CorpusSpec(**{**dict(tokens=240, text_fraction=0.5, max_new_tokens=10, topk=8, batch_size=4, seed=3), **kw})


def test_teacher_corpus_targets_are_the_teachers_distribution(tiny_factory, tmp_path, monkeypatch):
    """Every stored top-k row equals the teacher's own log-softmax at that position (a plain forward over the
    finished sequence), for chat and free-text sequences, left-padded prompts included."""
    import numpy as np
    import torch

    from edgesmith.distill.teacher_data import build_teacher_corpus
    from edgesmith.modelio import load_model

    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    t_dir = tiny_factory("teacher", seed=0)
    d = build_teacher_corpus(str(t_dir), _corpus_spec(), bf16=False, progress=False)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["tokens"] >= 240 and meta["mix"]["chat"]["examples"] and meta["mix"]["text"]["examples"]
    ids, ido = np.load(d / "ids.npy"), np.load(d / "id_offsets.npy")
    idx, logp, off = np.load(d / "idx.npy"), np.load(d / "logp.npy"), np.load(d / "offsets.npy")
    assert len(ido) == len(off) == meta["examples"] + 1 and idx.shape == logp.shape == (meta["rows"], 8)
    model = load_model(t_dir).eval()
    for e in range(meta["examples"]):
        seq = torch.tensor(ids[ido[e]:ido[e + 1]].astype(np.int64))[None]
        assert off[e + 1] - off[e] == seq.shape[1] - 1  # one row per token that has a successor
        with torch.no_grad():
            lp = torch.log_softmax(model(seq).logits[0, :-1].float(), -1)                   # [L-1, V]
        want_v, want_i = lp.topk(8, -1)
        got_i = torch.from_numpy(idx[off[e]:off[e + 1]].astype(np.int64))
        got_v = torch.from_numpy(logp[off[e]:off[e + 1]].astype(np.float32))
        assert torch.allclose(got_v, want_v, atol=2e-2), e                                   # fp16 storage
        assert torch.allclose(lp.gather(-1, got_i), want_v, atol=2e-2), e                   # same tokens (ties aside)


def test_teacher_corpus_is_deterministic_and_resumable(tiny_factory, tmp_path, monkeypatch):
    import numpy as np
    import pytest

    from edgesmith.distill import teacher_data as TD

    t_dir = tiny_factory("teacher", seed=0)
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "a"))
    a = TD.build_teacher_corpus(str(t_dir), _corpus_spec(), bf16=False, progress=False)

    # interrupted after the first batch: its part stays, the next call continues from batch 1
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "b"))
    real, calls = TD.sample_with_targets, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(TD, "sample_with_targets", flaky)
    with pytest.raises(KeyboardInterrupt):
        TD.build_teacher_corpus(str(t_dir), _corpus_spec(), bf16=False, progress=False)
    parts = list((tmp_path / "b" / "teacher-corpus").glob("*.parts/part-*.npz"))
    assert len(parts) == 1
    monkeypatch.setattr(TD, "sample_with_targets", real)
    b = TD.build_teacher_corpus(str(t_dir), _corpus_spec(), bf16=False, progress=False)
    for f in ("ids.npy", "id_offsets.npy", "idx.npy", "logp.npy", "offsets.npy"):
        assert np.array_equal(np.load(a / f), np.load(b / f)), f
    assert (a / "examples.jsonl").read_text() == (b / "examples.jsonl").read_text()
    assert not list((tmp_path / "b" / "teacher-corpus").glob("*.parts"))  # merged and cleaned up
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "c"))
    c = TD.build_teacher_corpus(str(t_dir), _corpus_spec(seed=4), bf16=False, progress=False)
    assert not np.array_equal(np.load(a / "ids.npy")[:50], np.load(c / "ids.npy")[:50])  # another seed, another corpus


def test_distill_on_teacher_corpus_without_loading_the_teacher(tiny_factory, tmp_path, monkeypatch):
    """data: teacher trains from the cached targets alone (the teacher is never loaded for training or validation),
    and records the mix, distinct tokens, epochs and tokens/s."""
    from edgesmith import modelio
    from edgesmith.distill.distill import DistillConfig, run
    from edgesmith.trainconfig import TrainConfig

    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    t_dir = tiny_factory("teacher", seed=0)
    s_dir = tiny_factory("student", seed=1)
    from edgesmith.distill.teacher_data import build_teacher_corpus

    build_teacher_corpus(str(t_dir), _corpus_spec(tokens=400), progress=False)  # bf16 as the run decides
    loaded = []
    real = modelio.load_model
    monkeypatch.setattr(modelio, "load_model", lambda p, *a, **k: loaded.append(str(p)) or real(p, *a, **k))
    out = run(DistillConfig(teacher=str(t_dir), student=str(s_dir), data="teacher", corpus=_corpus_spec(tokens=400),
                            out=str(tmp_path / "d"), max_length=64, val_fraction=0.2,
                            train=TrainConfig(lr=1e-2, max_steps=8, warmup_steps=1, batch_size=4, progress=False)))
    assert loaded == [str(s_dir)]
    man = json.loads((out / "distill.json").read_text())
    assert man["data"]["kind"] == "teacher-corpus" and man["data"]["mix"]["text"]["tokens"] > 0
    assert man["examples"]["validation"] > 0 and man["epochs"] > 0 and man["train_tokens_per_s"] > 0
    r = man["result"]
    assert r["last_val_loss"] < r["first_val_loss"]  # the student moves towards the teacher on held-out sequences


# ---------------------------------------------------------------- block-wise distillation


def _block_errors(teacher, student, bmap, batch):
    """Each student block's normalised error against the teacher's stream, every block fed the teacher's input."""
    import torch

    from edgesmith.distill.losses import BlockTaps, block_distance

    s_taps, t_taps = BlockTaps(student), BlockTaps(teacher)
    with torch.no_grad():
        teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        stream = [teacher.get_input_embeddings()(batch["input_ids"])] + list(t_taps.out)
        s_taps.feed = [stream[a] for a, _ in bmap]
        student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    tok = batch["attention_mask"].bool()
    return [float(block_distance(s_taps.out[j][tok], stream[b][tok])) for j, (_, b) in enumerate(bmap)]


def test_block_map_and_a_copy_of_the_teacher_has_zero_block_loss(tiny_factory):
    from edgesmith.distill.distill import DistillConfig
    from edgesmith.distill.losses import BlockTaps, block_map, make_loss_fn
    from edgesmith.modelio import load_model
    from edgesmith.trainconfig import collate

    # layers 2, 3 dropped: the block from layer 1 stands for the span 1..3 and must write stream 4
    assert block_map([0, 1, 4, 5], 8) == [(0, 1), (1, 4), (4, 5), (5, 8)]
    t_dir = tiny_factory("teacher", hidden=64, layers=3, seed=0)
    teacher, student = load_model(t_dir), load_model(t_dir)
    batch = collate([{"input_ids": list(range(5, 25)), "labels": list(range(5, 25))},
                     {"input_ids": list(range(40, 52)), "labels": list(range(40, 52))}], pad_id=2)
    taps = ([(0, 1), (1, 2), (2, 3)], BlockTaps(student), BlockTaps(teacher))
    for progress in (0.1, 0.9):  # in the phase (teacher inputs), then mixed into KD (student inputs)
        fn = make_loss_fn(teacher, DistillConfig(student="x", block_phase=0.5, block_weight=1.0), [], None, None, taps)
        loss, n = fn(student, {**batch, "progress": progress})
        assert n == 19 + 11 and abs(float(loss)) < 1e-4, (progress, float(loss))
    # a perturbed student: the loss is positive and reaches every block
    import torch

    with torch.no_grad():
        for layer in student.model.layers:
            layer.mlp.down_proj.weight.add_(0.05 * torch.randn_like(layer.mlp.down_proj.weight))
    assert all(e > 1e-4 for e in _block_errors(teacher, student, taps[0], batch))


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_blockwise_phase_reduces_every_blocks_error(tiny_factory, tmp_path, monkeypatch, grad_checkpointing):
    """The block phase feeds each student block the teacher's stream; with gradient checkpointing the backward
    recomputes every block on that same fed input (a recompute on the student's own input fails)."""
    from edgesmith.compress.prune import PruneConfig
    from edgesmith.compress.prune import run as prune
    from edgesmith.distill.distill import DistillConfig, run
    from edgesmith.distill.losses import block_map
    from edgesmith.modelio import load_model
    from edgesmith.trainconfig import TrainConfig, collate

    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    t_dir = tiny_factory("teacher", hidden=64, intermediate=128, layers=4, seed=0)
    s_dir = prune(PruneConfig(model=str(t_dir), out=str(tmp_path / "pruned"), intermediate_size=64, num_layers=2,
                              importance="magnitude", layer_importance="magnitude", round_to=32, eval_windows=0), quiet=True)
    kept = json.loads((s_dir / "prune_report.json").read_text())["kept_layers"]
    bmap = block_map(kept, 4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(s_dir))
    ids = [tok(f"Number {i} is {'even' if i % 2 == 0 else 'odd'}, and {i} plus one is {i + 1}.")["input_ids"] for i in (3, 8)]
    batch = collate([{"input_ids": x, "labels": x} for x in ids], pad_id=2)  # text like the training data's
    teacher = load_model(t_dir)
    before = _block_errors(teacher, load_model(s_dir), bmap, batch)
    out = run(DistillConfig(teacher=str(t_dir), student=str(s_dir), data=str(_data(tmp_path)), max_length=32, val_fraction=0.0,
                            out=str(tmp_path / "d"), block_phase=0.99,
                            train=TrainConfig(lr=1e-4, max_steps=30, warmup_steps=1, batch_size=4, precision="fp32",
                                              grad_checkpointing=grad_checkpointing, progress=False)))
    after = _block_errors(teacher, load_model(out), bmap, batch)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    man = json.loads((out / "distill.json").read_text())
    assert man["blockwise"]["kept_layers"] == kept and man["blockwise"]["from"] == "prune_report.json"


def test_blockwise_refuses_a_different_width(tiny_factory, tmp_path):
    from edgesmith.distill.distill import DistillConfig, run

    t_dir, s_dir = _models(tiny_factory)
    with pytest.raises(ConfigError, match="block_weight.*hidden size"):
        run(DistillConfig(teacher=str(t_dir), student=str(s_dir), data=str(_data(tmp_path)), out=str(tmp_path / "o"),
                          block_weight=0.5))


def test_sparsity_pattern_survives_distillation_and_lora_merge(tiny_factory, tmp_path, monkeypatch):
    """prune --sparsity 2:4 -> distill (full) and finetune (LoRA) -> merge: every decoder projection still has at
    least 2 zeros in each group of 4 inputs, and the kept weights did change."""
    import torch

    from edgesmith.compress.prune import PruneConfig
    from edgesmith.compress.prune import run as prune
    from edgesmith.distill.distill import DistillConfig, run
    from edgesmith.finetune.lora import FinetuneConfig
    from edgesmith.finetune.lora import run as finetune
    from edgesmith.finetune.merge import merge_adapter
    from edgesmith.modelio import load_model
    from edgesmith.trainconfig import TrainConfig

    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    t_dir = tiny_factory("teacher", hidden=64, intermediate=128, layers=2, seed=0)
    s_dir = prune(PruneConfig(model=str(t_dir), out=str(tmp_path / "sparse"), sparsity="2:4", importance="magnitude",
                              eval_windows=0, round_to=32), quiet=True)
    data = _data(tmp_path)
    tcfg = TrainConfig(lr=1e-2, max_steps=3, warmup_steps=0, batch_size=4, progress=False, precision="fp32")

    def check(model_dir):
        before, after = load_model(s_dir), load_model(model_dir)
        changed = False
        for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()):
            if ".layers." in n and n.endswith("_proj.weight"):
                assert bool(((b.view(b.shape[0], -1, 4) == 0).sum(-1) >= 2).all()), n  # 2:4 kept
                assert bool((b[a == 0] == 0).all()), n                                   # the same zeros
                changed |= not torch.equal(a, b)
        assert changed

    out = run(DistillConfig(teacher=str(t_dir), student=str(s_dir), data=str(data), max_length=32, val_fraction=0.0,
                            out=str(tmp_path / "d"), train=tcfg))
    check(out)
    assert json.loads((out / "distill.json").read_text())["sparsity_kept"] is True
    ad = finetune(FinetuneConfig(model=str(s_dir), data=str(data), out=str(tmp_path / "ft"), max_length=128, val_fraction=0.0,
                                 train=tcfg))
    check(merge_adapter(ad, tmp_path / "merged"))


def test_gqa_attention_for_sampling_changes_nothing_but_speed(tiny_factory):
    """The sampler's attention without repeat_kv gives the same logits and the same samples as transformers' SDPA on a
    grouped-query model (left padding, KV cache)."""
    import torch

    from edgesmith.distill.teacher_data import sample_with_targets, use_gqa_attention
    from edgesmith.modelio import load_model

    m = load_model(tiny_factory("gqa", hidden=64, heads=4, kv_heads=2, layers=2, seed=3))
    prompts = [[1, 50, 60, 70], [1, 80], [1, 90, 91]]
    ids = torch.tensor([[1, 50, 60, 70, 71, 72]])
    with torch.no_grad():
        ref_logits = m(input_ids=ids).logits
    ref = sample_with_targets(m, prompts, 6, k=8, seed=5)
    assert use_gqa_attention(m) and m.config._attn_implementation == "edgesmith_sdpa_gqa"
    with torch.no_grad():
        assert torch.allclose(m(input_ids=ids).logits, ref_logits, atol=1e-5)
    got = sample_with_targets(m, prompts, 6, k=8, seed=5)
    for a, b in zip(ref, got):
        assert a["ids"] == b["ids"]
        assert abs(a["logp"].astype("float32") - b["logp"].astype("float32")).max() < 1e-2
    assert not use_gqa_attention(load_model(tiny_factory("mha", hidden=64, heads=4, kv_heads=4, layers=1)))


# ---------------------------------------------------------------- memory estimate (issue 20)


def test_memory_estimate_parts_and_what_shrinks_them():
    from edgesmith.memory import ModelShape, training_memory

    s = ModelShape(params=1_000_000_000, layers=16, hidden=2048, intermediate=8192, vocab=49152)
    full = training_memory(s, s.params, batch=4, seq_len=512, chunk=128, teacher=s)
    assert full["student weights"] == 4e9 and full["gradients"] == 4e9 and full["AdamW states"] == 8e9
    assert full["teacher weights"] == 4e9
    ckpt = training_memory(s, s.params, batch=4, seq_len=512, chunk=128, grad_checkpointing=True, teacher=s, teacher_bytes=2)
    assert ckpt["teacher weights"] == 2e9 and ckpt["activations"] < full["activations"] / 4
    lora = training_memory(s, 10_000_000, batch=4, seq_len=512, chunk=128)
    assert "teacher weights" not in lora and lora["AdamW states"] == 8e7


def test_memory_estimate_counts_the_sharding(monkeypatch):
    """sharding: fsdp over N processes: each holds 1/N of the student's weights, gradients and AdamW states and of the
    teacher's layers (its embeddings and head whole); the estimate is the largest moment (training, the whole student
    loaded/gathered, the whole teacher loaded, a checkpoint gathered on the main process). Two processes that fit only
    sharded pass the check; too little memory even sharded is refused in one line naming the numbers."""
    from pathlib import Path

    from edgesmith.distill.distill import DistillConfig, check_memory_fits
    from edgesmith.errors import EdgesmithError
    from edgesmith.memory import ModelShape, sharded_memory, training_memory
    from edgesmith.trainconfig import TrainConfig

    s = ModelShape(params=1_000_000_000, layers=16, hidden=2048, intermediate=8192, vocab=49152)
    t = ModelShape(params=1_700_000_000, layers=24, hidden=2048, intermediate=8192, vocab=49152)
    whole = training_memory(s, s.params, batch=4, seq_len=512, chunk=128, teacher=t)
    half = training_memory(s, s.params, batch=4, seq_len=512, chunk=128, teacher=t, shards=2)
    for k in ("student weights", "gradients", "AdamW states", "optimizer step"):
        assert half[k] == whole[k] / 2
    assert half["teacher weights"] == whole["teacher weights"] / 2 + t.outer_params() * 4
    assert half["activations"] == whole["activations"]
    # the units held whole while they run: the student's root, running and prefetched layers (with gradients), the
    # teacher's running and prefetched layers
    so, sl, tl = s.outer_params(), s.layer_params(), t.layer_params()
    assert half["gathered layers"] == 4 * (so + 2 * sl) + 4 * (so + sl) + 4 * 2 * tl < whole["student weights"] / 1.5
    # LoRA, sharded: the whole student, loaded before it is cut and gathered back at the end, is the peak
    lora = sharded_memory(training_memory(s, 10_000_000, 1, 128, 128, True, shards=2), s, 10_000_000, checkpoints=True)
    assert max(lora, key=lambda p: p.total(2)).what == "while the whole student is loaded or gathered"
    assert lora[2].main == {"whole trainable weights": 4e7, "whole AdamW states": 8e7}

    monkeypatch.setattr(ModelShape, "of", classmethod(lambda cls, p: s if Path(p).name == "student" else t))
    GiB = 2**30

    def check(sharding, avail_gib, **kw):
        cfg = DistillConfig(student="student", data="data.json", max_length=512, teacher_dtype="bfloat16",
                            train=TrainConfig(batch_size=4, grad_checkpointing=True, sharding=sharding, **kw))
        return check_memory_fits(cfg, Path("teacher"), Path("student"), True, processes=2, available=int(avail_gib * GiB))

    # 2 processes in 40 GiB: two whole copies of the student's training state (47.8 GiB) do not fit, halves do (29.9)
    with pytest.raises(EdgesmithError, match=r"estimated peak memory 47\.8 GiB \(2 processes x 23\.9: .*exceeds the "
                                             r"40\.0 GiB available.*train\.sharding=fsdp"):
        check("none", 40)
    line = check("fsdp", 40)
    assert line.startswith("estimated peak memory 29.9 GiB while training (2 processes x 15.0: student weights 1.9 (1/2) + "
                           "gradients 1.9 (1/2) + AdamW states 3.7 (1/2) + optimizer step 1.9 (1/2) + gathered layers"), line
    assert "teacher weights 1.8 (layers 1/2, embeddings and head whole)" in line and line.endswith("of 40.0 GiB available")
    with pytest.raises(EdgesmithError) as e:  # not even sharded
        check("fsdp", 28)
    assert "\n" not in str(e.value) and "29.9 GiB while training" in str(e.value) and "exceeds the 28.0 GiB" in str(e.value)
    assert "student weights 1.9 (1/2)" in str(e.value) and "train.sharding=fsdp" not in str(e.value)


def test_distill_refuses_up_front_when_the_estimate_exceeds_available_memory(tiny_factory, tmp_path, monkeypatch, capsys):
    """With MemAvailable (faked) below the estimate the stage stops before loading anything: one line naming the
    estimate, its parts, the available memory and what to change; exit code 2."""
    from edgesmith import memory
    from edgesmith.cli import main

    t_dir, s_dir = _models(tiny_factory)
    monkeypatch.setattr(memory, "mem_available", lambda: 50 * 2**20)  # 50 MiB: below the runtime alone
    rc = main(["distill", "--teacher", str(t_dir), "--student", str(s_dir), "--data", str(_data(tmp_path)),
               "--out", str(tmp_path / "o"), "--max-length", "32"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "distill: estimated peak memory" in err and "exceeds the 0.0 GiB available (MemAvailable)" in err
    assert "student weights" in err and "teacher weights" in err and "teacher_dtype=bfloat16" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_teacher_in_bf16(tiny_factory, tmp_path, monkeypatch):
    from edgesmith.distill.distill import DistillConfig, run
    from edgesmith.trainconfig import TrainConfig

    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    t_dir, s_dir = _models(tiny_factory)
    out = run(DistillConfig(teacher=str(t_dir), student=str(s_dir), data=str(_data(tmp_path)), max_length=32, val_fraction=0.0,
                            teacher_dtype="bfloat16", out=str(tmp_path / "a"),
                            train=TrainConfig(lr=1e-2, max_steps=4, warmup_steps=1, batch_size=4, progress=False)))
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigError, match="teacher_dtype"):
        DistillConfig(teacher_dtype="float16")
