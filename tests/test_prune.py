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
from edgesmith.compress.prune import (
    PruneConfig, apply_sparsity, check_heads, count_params, head_choices, parse_count, plan_keep, prune_model,
    round_width, run,
)
from edgesmith.config import from_dict, load_yaml
from edgesmith.errors import ConfigError, EdgesmithError
from edgesmith.modelio import load_model

REPO = Path(__file__).resolve().parents[1]

# tiny shapes: head_dim 32 and widths that are multiples of 32, so rounding never interferes
GQA = dict(hidden=128, intermediate=256, layers=3, heads=6, kv_heads=2, head_dim=32)
MHA = dict(hidden=128, intermediate=256, layers=3, heads=4, kv_heads=4, head_dim=32)
MODELS = {"gqa-tied": dict(GQA, tie=True), "mha-untied": dict(MHA, tie=False)}


def _zero_eps(model):
    """RMSNorm's eps is added to mean(x^2), which depends on the channel count: without it, zeroed
    hidden channels and removed ones are mathematically identical."""
    for mod in model.modules():
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = 0.0
    return model


def _masked(model, keep, src: Dims):
    """The original model with every removed unit zeroed where it WRITES (so it contributes nothing)."""
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
    pruned = _zero_eps(prune_model(model, keep, tgt))
    reference = _zero_eps(_masked(model, keep, src))
    assert Dims.of(pruned.config) == tgt
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).logits, pruned(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
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

    from edgesmith.compress import prune as P

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
    monkeypatch.setattr(S, "candidate_decode", lambda m, tok, work, threads=0: {"decode_tok_s": 10.0 * next(speeds), "file_mb": 1.0})
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
