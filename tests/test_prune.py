"""Structured pruning: the surgery is exact (pruned logits == original logits with the removed units
zeroed), every axis alone and together on GQA/MHA, tied/untied tiny Llamas; the output is a plain HF
checkpoint; bad requests fail with the nearest valid choices."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from edgesmith.cli import build_parser, main
from edgesmith.compress.importance import IMPORTANCE, LAYER_IMPORTANCE, Dims, magnitude_scores, random_scores
from edgesmith.compress.sparsity import apply_sparsity
from edgesmith.compress.prune import PruneConfig, parse_count, run
from edgesmith.compress.shape import check_heads, count_params, head_choices, round_width
from edgesmith.compress.surgery import acting_pruned, plan_keep, prune_model
from edgesmith.config import from_dict, load_yaml
from edgesmith.errors import ConfigError, EdgesmithError
from edgesmith.modelio import load_model
from prune_ref import masked_reference, zero_eps

REPO = Path(__file__).resolve().parents[1]

# tiny shapes: head_dim 32 and widths that are multiples of 32, so rounding never interferes
GQA = dict(hidden=128, intermediate=256, layers=3, heads=6, kv_heads=2, head_dim=32)
MHA = dict(hidden=128, intermediate=256, layers=3, heads=4, kv_heads=4, head_dim=32)
MODELS = {"gqa-tied": dict(GQA, tie=True), "mha-untied": dict(MHA, tie=False)}


AXES = {
    "mlp": lambda s: Dims(s.num_layers, s.hidden_size, 160, s.num_attention_heads, s.num_key_value_heads, s.head_dim),
    "heads": lambda s: Dims(s.num_layers, s.hidden_size, s.intermediate_size, *(
        (4, 2) if s.num_key_value_heads == 2 else (3, 3)), s.head_dim),
    "kv-groups": lambda s: Dims(s.num_layers, s.hidden_size, s.intermediate_size, s.group, 1, s.head_dim),
    "hidden": lambda s: Dims(s.num_layers, 96, s.intermediate_size, s.num_attention_heads, s.num_key_value_heads, s.head_dim),
    "layers": lambda s: Dims(2, s.hidden_size, s.intermediate_size, s.num_attention_heads, s.num_key_value_heads, s.head_dim),
    "all": lambda s: Dims(2, 96, 160, *((4, 2) if s.num_key_value_heads == 2 else (3, 3)), s.head_dim),
}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("axis", list(AXES))
def test_surgery_is_exact(tiny_factory, kind, axis):
    model = load_model(str(tiny_factory(kind, **MODELS[kind])))
    src = Dims.of(model.config)
    tgt = AXES[axis](src)
    # random scores: the kept units are scattered, so index bookkeeping is really exercised
    keep = plan_keep(random_scores(model.state_dict(), src, seed=3), torch.rand(src.num_layers), src, tgt)
    pruned = zero_eps(prune_model(model, keep, tgt))
    reference = zero_eps(masked_reference(model, keep, src))
    assert Dims.of(pruned.config) == tgt
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).logits, pruned(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    # the --target-params search's way: the source acting as the pruned model (hooks, nothing copied), itself afterwards
    zero_eps(model)
    for rescale in (True, False) if tgt.hidden_size < src.hidden_size else (True,):
        with torch.no_grad():
            before = model(ids).logits
            with acting_pruned(model, keep, rescale):
                acted = model(ids).logits
            after = model(ids).logits
            target = got if rescale else zero_eps(prune_model(model, keep, tgt, rescale_norms=False))(ids).logits
        assert torch.allclose(acted, target, atol=1e-5, rtol=1e-4), (rescale, (acted - target).abs().max())
        assert torch.equal(before, after)
    # heads stay GQA-consistent: every kept query head sits in a kept kv group, same count per group
    for heads, kv in zip(keep.heads, keep.kv):
        groups = [h // src.group for h in heads]
        assert set(groups) == set(kv) and all(groups.count(k) == tgt.group for k in kv)


def test_run_writes_plain_hf_checkpoint(tiny_factory, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir = tiny_factory("untied", **dict(GQA, tie=False))
    out = run(PruneConfig(model=str(src_dir), out=str(tmp_path / "pruned"), intermediate_size=160, num_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, hidden_size=96, layer_importance="magnitude",
                          round_to=32, eval_windows=0), quiet=True)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 96, 160, 4, 2, 32)
    assert not c.tie_word_embeddings and model.lm_head.weight.shape == (49152, 96)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    report = json.loads((out / "prune_report.json").read_text())
    assert report["after"]["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert report["before"]["dims"]["num_layers"] == 3 and len(report["dropped_layers"]) == 1
    assert len(report["kept_units"]["layers"]) == 2 and len(report["kept_units"]["hidden"]) == 96
    assert not list(tmp_path.glob(".pruned.tmp*"))  # written atomically: no temp dirs left behind
    # the saved weights are the in-memory surgery's: reload == prune again with the same ranking
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    again = load_model(str(out))
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_activation_ranking_and_target_search_with_calib_file(tiny_factory, tmp_path):
    src_dir = tiny_factory("tiny", **dict(GQA, tie=True))
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times." * 4 for i in range(60)))
    total = count_params(Dims.of(load_model(str(src_dir)).config), 49152, True)[0]
    target = total - 60_000
    out = run(PruneConfig(model=str(src_dir), out=str(tmp_path / "p"), target_params=str(target), importance="activation",
                          calib=str(calib), calib_windows=4, calib_seq_len=32, eval_windows=2, search_candidates=3,
                          round_to=32), quiet=True)
    r = json.loads((out / "prune_report.json").read_text())
    assert r["after"]["params"]["total"] <= target
    assert len(r["search"]) >= 2 and sum(s["chosen"] for s in r["search"]) == 1
    chosen = [s for s in r["search"] if s["chosen"]][0]
    assert chosen["calib_loss"] == min(s["calib_loss"] for s in r["search"])
    assert r["calibration"]["windows"] == 4 and r["perplexity"]["before"] > 1 and r["perplexity"]["after"] > 1


def test_head_requests_must_keep_gqa_grouping():
    src = Dims(30, 576, 1536, 9, 3, 64)
    assert (6, 2) in head_choices(9, 3) and (6, 3) in head_choices(9, 3) and (8, 2) not in head_choices(9, 3)
    assert check_heads(6, 2, src) == (6, 2)
    assert check_heads(None, 2, src) == (6, 2)  # whole groups go with their query heads
    with pytest.raises(ConfigError) as e:
        check_heads(8, 2, src)
    assert str(e.value).endswith("nearest valid choices: 9/3, 6/2, 6/3, 4/2")
    with pytest.raises(ConfigError, match="nearest valid choices"):
        check_heads(7, None, src)


def test_cli_rejects_invalid_heads_with_choices(tiny_llama, tmp_path, capsys):
    rc = main(["prune", str(tiny_llama), "--out", str(tmp_path / "o"), "--num-attention-heads", "3", "--num-key-value-heads", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "nearest valid choices" in err and "2/1" in err
    assert not (tmp_path / "o").exists()


def test_cli_choices_equal_registries():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["prune"]
    choices = {a.dest: a.choices for a in sub._actions if a.choices}
    assert list(choices["importance"]) == list(IMPORTANCE)
    assert list(choices["layer_importance"]) == list(LAYER_IMPORTANCE)


def test_rounding_and_counts():
    assert round_width(1000, 1536, 256) == (1024, 256)
    assert round_width(518, 576, 256) == (512, 256)
    assert round_width(48, 64, 256) == (32, 32)  # halves the multiple, never below 32
    assert round_width(576, 576, 256) == (576, 0)
    with pytest.raises(ConfigError):
        round_width(20, 32, 256)
    assert parse_count("90M") == 90_000_000 and parse_count("1.5B") == 1_500_000_000
    # the default model's published size from the arithmetic used by the search
    assert count_params(Dims(30, 576, 1536, 9, 3, 64), 49152, True)[0] == 134_515_008


def test_config_validation_and_recipes():
    with pytest.raises(ConfigError, match="mlp_ratio"):
        PruneConfig(intermediate_size=1024, mlp_ratio=0.3)
    with pytest.raises(ConfigError, match="round_to"):
        PruneConfig(round_to=16)
    with pytest.raises(ConfigError, match="sparsity"):
        from_dict(PruneConfig, {"sparsity": 124})  # what unquoted `sparsity: 2:4` becomes in YAML
    recipes = sorted((REPO / "recipes").glob("prune*.yaml"))
    assert recipes
    for r in recipes:
        cfg = from_dict(PruneConfig, load_yaml(r))
        assert cfg.importance in IMPORTANCE


def test_requested_sizes_are_rounded_and_reported(tiny_factory, tmp_path):
    src_dir = tiny_factory("t", **dict(GQA, tie=True))
    out = run(PruneConfig(model=str(src_dir), out=str(tmp_path / "p"), intermediate_size=150, eval_windows=0), quiet=True)
    r = json.loads((out / "prune_report.json").read_text())
    assert r["after"]["dims"]["intermediate_size"] == 128  # no multiple of 256 fits below 256: halved to 128
    assert any("requested 150, using 128 (a multiple of 128" in n for n in r["adjusted"])


def test_sparsity_patterns(tiny_llama):
    model = load_model(str(tiny_llama))
    info = apply_sparsity(model, ("n:m", 2, 4))
    w = model.model.layers[0].mlp.up_proj.weight
    assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    assert info["achieved"] >= 0.5 and "same size" in info["note"]
    model = load_model(str(tiny_llama))
    info = apply_sparsity(model, ("unstructured", 0.5))
    assert abs(info["achieved"] - 0.5) < 0.01


def test_nothing_to_prune_is_an_error(tiny_llama, tmp_path):
    with pytest.raises(EdgesmithError, match="nothing to prune"):
        run(PruneConfig(model=str(tiny_llama), out=str(tmp_path / "o")), quiet=True)


@pytest.mark.slow
def test_default_model_to_quantisation_friendly_shape(default_hf, tmp_path):
    """The recipe shape on the real model: loads as a plain HF model and still writes English."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = from_dict(PruneConfig, {**load_yaml(REPO / "recipes" / "prune-default.yaml"), "out": str(tmp_path / "p"),
                                  "eval_windows": 0, "calib_windows": 4})
    out = run(cfg, quiet=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.hidden_size % 256 == 0 and model.config.intermediate_size % 256 == 0
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt")
    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0


def test_without_data_the_model_writes_its_calibration_text(tiny_factory, tmp_path, monkeypatch):
    """No --calib and no ../shared/data: activation ranking (the default) calibrates on text the model samples
    itself with the distill stage's sampler; deterministic for a seed."""
    import json

    from edgesmith.compress import calibration
    from edgesmith.compress import prune as P

    monkeypatch.setattr(calibration, "data_dir", lambda: None)
    monkeypatch.setattr(P, "data_dir", lambda: None)
    src = tiny_factory("src", seed=0)
    for name in ("a", "b"):
        P.run(P.PruneConfig(model=str(src), out=str(tmp_path / name), intermediate_size=64, calib_windows=2, eval_windows=0))
    assert "teacher-generated" in json.loads((tmp_path / "a" / "prune_report.json").read_text())["calibration"]["source"]
    from edgesmith.modelio import load_model

    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert a.config.intermediate_size == 64
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # same seed, same text, same cut


def test_ridge_refit_is_the_least_squares_solution():
    import torch

    from edgesmith.compress.reconstruct import output_error, ridge_refit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64)             # [tokens, I]
    x[:, 3] += 0.8 * x[:, 7]                                                 # correlated channels: a refit can help
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)                # [out, I]
    keep = [0, 2, 3, 5, 9]
    gram = x.T @ x
    w_new = ridge_refit(w, gram, keep, ridge=1e-9)
    ref = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T               # argmin ||x_k W'ᵀ - x Wᵀ||
    assert torch.allclose(w_new, ref, atol=1e-6)
    assert output_error(w, w_new, gram, keep) < output_error(w, w[:, keep], gram, keep)
    # the error from the Gram matrix equals the direct one
    direct = ((x @ w.T - x[:, keep] @ w_new.T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()
    assert output_error(w, w_new, gram, keep) == pytest.approx(direct, rel=1e-9)


def test_reconstruct_ls_lowers_every_layers_output_error(tiny_factory, tmp_path):
    src_dir = tiny_factory("src", intermediate=128, layers=3)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7} times." for i in range(400)))
    out = run(PruneConfig(model=str(src_dir), out=str(tmp_path / "p"), intermediate_size=64, num_layers=2, calib=str(calib),
                          calib_windows=4, calib_seq_len=64, reconstruct="ls", round_to=32, eval_windows=0), quiet=True)
    rep = json.loads((out / "prune_report.json").read_text())["reconstruction"]
    assert rep["method"] == "ls" and len(rep["layers"]) == 2
    assert all(r["error_refit"] < r["error_cut"] for r in rep["layers"]), rep["layers"]
    with pytest.raises(ConfigError, match="reconstruct"):
        PruneConfig(reconstruct="svd")


def _calib(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times." * 4 for i in range(60)))
    return calib


def test_target_speedup_keeps_only_fast_enough_shapes(tiny_factory, tmp_path, monkeypatch):
    """The speed filter's choice: the lowest calibration loss among shapes at or above the speedup; none: an error
    naming the fastest. (Speeds faked here; the real timing path runs in the slow test below.)"""
    import edgesmith.compress.speed as S

    src_dir = tiny_factory("tiny", **dict(GQA, tie=True))
    total = count_params(Dims.of(load_model(str(src_dir)).config), 49152, True)[0]
    speeds = iter(range(2, 100))
    monkeypatch.setattr(S, "q4km_decode", lambda hf, work, threads=0, repeat=2: {"decode_tok_s": 10.0, "file_mb": 1.0})
    monkeypatch.setattr(S, "candidate_decode", lambda *a, **k: {"decode_tok_s": 10.0 * next(speeds), "file_mb": 1.0})
    common = dict(model=str(src_dir), target_params=str(total - 60_000), calib=str(_calib(tmp_path)), calib_windows=4,
                  calib_seq_len=32, eval_windows=0, search_candidates=3, round_to=32)
    out = run(PruneConfig(**common, out=str(tmp_path / "p"), target_speedup=3.0), quiet=True)
    r = json.loads((out / "prune_report.json").read_text())
    fast = [s for s in r["search"] if s["speedup"] >= 3.0]
    assert [s["speedup"] for s in r["search"]] == [2.0, 3.0, 4.0][:len(r["search"])] and fast
    chosen = [s for s in r["search"] if s["chosen"]][0]
    assert chosen in fast and chosen["calib_loss"] == min(s["calib_loss"] for s in fast)
    speeds = iter(range(2, 100))
    with pytest.raises(EdgesmithError, match=r"--target-speedup 50.0: no shape .*\(fastest 4.00x"):
        run(PruneConfig(**common, out=str(tmp_path / "q"), target_speedup=50.0), quiet=True)
    with pytest.raises(ConfigError, match="target_speedup.*needs target_params"):
        PruneConfig(target_speedup=1.4)


def test_probe_ranks_finalists_by_loss_after_short_distillation(tiny_factory, tmp_path):
    """--probe-steps: the best shapes right after the cut are each distilled a few steps from the unpruned model and the
    lowest loss after wins; the probe learns (KL falls), leaves the source untouched and the report says why."""
    import torch

    from edgesmith.compress.probe import probe
    from edgesmith.compress.prune import render_report

    src_dir = tiny_factory("tiny", **dict(GQA, tie=True))
    teacher = load_model(str(src_dir))
    total = count_params(Dims.of(teacher.config), 49152, True)[0]
    common = dict(model=str(src_dir), target_params=str(total - 60_000), calib=str(_calib(tmp_path)), calib_windows=6,
                  calib_seq_len=32, eval_windows=0, search_candidates=3, round_to=32)
    out = run(PruneConfig(**common, out=str(tmp_path / "p"), probe_steps=4, probe_finalists=2, probe_lr=1e-3), quiet=True)
    r = json.loads((out / "prune_report.json").read_text())
    probed = [s for s in r["search"] if "probe_loss" in s]
    by_calib = sorted(r["search"], key=lambda s: s["calib_loss"])
    assert len(probed) == min(2, len(r["search"])) and all(s in by_calib[:2] for s in probed)
    chosen = [s for s in r["search"] if s["chosen"]][0]
    assert chosen["chosen_by"] == "probe_loss" and chosen["probe_loss"] == min(s["probe_loss"] for s in probed)
    assert f"the lowest loss after 4 distillation steps among the {len(probed)} best right after the cut" in render_report(r)

    # the probe itself: KL to the teacher falls over its steps, and the teacher's weights do not move
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    src = Dims.of(teacher.config)
    d = Dims(src.num_layers - 1, src.hidden_size, src.intermediate_size // 2, src.num_attention_heads, src.num_key_value_heads, src.head_dim)
    scores = magnitude_scores(teacher.state_dict(), src)
    student = prune_model(teacher, plan_keep(scores, torch.arange(src.num_layers, dtype=torch.float), src, d), d)
    torch.manual_seed(0)
    windows = torch.randint(0, 49152, (6, 32))
    res = probe(student, teacher, windows[2:], windows[:2], steps=8, lr=3e-3, batch_size=4)
    assert res["probe_kl_last"] < res["probe_kl_first"] and res["probe_loss"] > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(ConfigError, match="probe_steps.*needs target_params"):
        PruneConfig(probe_steps=5)


@pytest.mark.slow
def test_target_speedup_times_real_q4km_exports(tiny_factory, tmp_path):
    src_dir = tiny_factory("tiny", **dict(GQA, tie=True))
    total = count_params(Dims.of(load_model(str(src_dir)).config), 49152, True)[0]
    out = run(PruneConfig(model=str(src_dir), out=str(tmp_path / "p"), target_params=str(total - 60_000), calib=str(_calib(tmp_path)),
                          calib_windows=4, calib_seq_len=32, eval_windows=0, search_candidates=2, round_to=32,
                          target_speedup=0.01), quiet=True)
    r = json.loads((out / "prune_report.json").read_text())
    assert all(s["decode_tok_s"] > 0 and s["teacher_decode_tok_s"] > 0 and s["file_mb"] > 0 for s in r["search"])
    assert not list(tmp_path.glob(".speed-*"))  # scratch exports removed


# ---------------------------------------------------------------- memory-bounded writing (issue 20)


def test_shard_by_shard_write_equals_save_pretrained_of_in_memory_pruning(tiny_factory, tmp_path):
    """write_pruned (source read from several shards, pruned tensor by tensor, written shard by shard) produces the
    very files save_pretrained writes for the in-memory pruned model: same shards, index, config, bytes."""
    from edgesmith.compress.checkpoint import write_pruned
    from edgesmith.compress.surgery import new_config

    model = load_model(str(tiny_factory("src", **dict(GQA, tie=True))))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 3
    src = Dims.of(model.config)
    tgt = AXES["all"](src)
    keep = plan_keep(random_scores(model.state_dict(), src, seed=3), torch.rand(src.num_layers), src, tgt)
    ref = prune_model(model, keep, tgt)
    ref.save_pretrained(tmp_path / "ref", max_shard_size="300KB")

    sharded = load_model(str(tmp_path / "sharded"))
    sd = dict(sharded.state_dict())
    (tmp_path / "stream").mkdir()
    info = write_pruned(sd, src, keep, new_config(sharded.config, src, tgt, keep), type(sharded),
                        copy.deepcopy(sharded.generation_config), tmp_path / "stream", torch.float32, max_shard_size="300KB")
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert "model.safetensors.index.json" in names and len(names) > 4
    assert sorted(p.name for p in (tmp_path / "stream").iterdir()) == names
    for n in names:
        assert (tmp_path / "stream" / n).read_bytes() == (tmp_path / "ref" / n).read_bytes(), n
    assert not sd  # every source tensor was handed over (freed) as it was used
    assert info["params"]["total"] == sum(p.numel() for p in ref.parameters())


def test_bf16_checkpoint_stays_bf16_sharded_with_plain_permissions(tiny_factory, tmp_path, monkeypatch):
    """A bf16 source is pruned in bf16 (no fp32 copy): the output is bf16, sharded past MAX_SHARD_SIZE like
    save_pretrained, its weights are exactly the source's kept rows/columns, its files 0644 under umask 022, and the
    held-out perplexity after pruning is measured on the model loaded back from those shards."""
    import os

    from safetensors import safe_open

    from edgesmith.compress import checkpoint

    src_dir = tiny_factory("bf16", **dict(GQA, tie=False), dtype="bfloat16")
    monkeypatch.setattr(checkpoint, "MAX_SHARD_SIZE", "2MB")
    old = os.umask(0o022)
    try:
        out = run(PruneConfig(model=str(src_dir), out=str(tmp_path / "p"), intermediate_size=160, num_layers=2,
                              calib=str(_calib(tmp_path)), calib_windows=4, calib_seq_len=32, eval_windows=2, round_to=32),
                  quiet=True)
    finally:
        os.umask(old)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    weights = {}
    for f in shards:
        with safe_open(str(f), "pt") as st:
            weights.update({k: st.get_tensor(k) for k in st.keys()})
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    r = json.loads((out / "prune_report.json").read_text())
    source = load_model(str(src_dir), dtype="bfloat16").state_dict()
    for new, kept in enumerate(r["kept_units"]["layers"]):
        want = source[f"model.layers.{kept['layer']}.mlp.up_proj.weight"][kept["mlp_channels"]]
        assert torch.equal(weights[f"model.layers.{new}.mlp.up_proj.weight"], want)
    assert r["perplexity"]["after"] > 0 and r["after"]["params"]["total"] == sum(t.numel() for t in weights.values())
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes


def test_atomic_outputs_get_plain_permissions(tmp_path):
    """Writers that go through private temp files (safetensors, mkstemp: 0600) end up 0666 minus the umask."""
    import os
    import tempfile

    from edgesmith.fsutil import atomic_dir, atomic_path

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            fd, name = tempfile.mkstemp(dir=tmp)
            os.close(fd)
        with atomic_path(tmp_path / "f") as tmp:
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
    finally:
        os.umask(old)
    assert oct((tmp_path / "d" / Path(name).name).stat().st_mode & 0o777) == "0o644"
    assert oct((tmp_path / "f").stat().st_mode & 0o777) == "0o644"
