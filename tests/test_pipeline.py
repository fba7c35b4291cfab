"""`edgesmith run RECIPE`: every shipped recipe parses; stages run in order into OUT/<stage>/ with a
manifest; a re-run skips what is up to date and re-runs from the first changed stage; the reduced demo
on the real default model produces artifacts that load and generate."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgesmith import pipeline as P
from edgesmith.bench.report import bench_rows
from edgesmith.config import load_stage_yaml
from edgesmith.errors import EdgesmithError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"smollm2-edge-cpu.yaml", "smollm2-edge-gpu.yaml", "lora-alpaca.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    """Pipeline recipes validate every stage's settings; single-stage files validate as their stage's config."""
    raw = yaml.safe_load(path.read_text())
    if "fractions" in raw:  # a sweep file: its own keys, and the recipe it runs plans with its overrides at every point
        from edgesmith.config import from_dict
        from edgesmith.sweep import SIZE_KEYS, SweepConfig

        cfg = from_dict(SweepConfig, raw)
        recipe = P.load_recipe(REPO / cfg.recipe, overrides=cfg.set + [f"stages.prune.{k}=null" for k in SIZE_KEYS]
                               + ["stages.prune.target_params=90M"])
        P.plan(recipe, cfg.recipe)
        assert cfg.quant in recipe.stages["export"]["gguf"]
    elif "stages" in raw:
        recipe = P.load_recipe(path)
        ctx, cfgs = P.plan(recipe, str(path))
        assert list(cfgs) == [s for s in P.ORDER if s in recipe.stages]
        from edgesmith.config import STAGE_OF, from_dict

        for cls_name, stage in STAGE_OF.items():  # a stage command can read its section of the recipe
            if stage in recipe.stages:
                mod = {"prune": "edgesmith.compress.prune", "distill": "edgesmith.distill.distill",
                       "finetune": "edgesmith.finetune.lora", "export": "edgesmith.export.run",
                       "bench": "edgesmith.bench.harness"}[stage]
                import importlib

                cls = getattr(importlib.import_module(mod), cls_name)
                sec = load_stage_yaml(path, cls)
                if "train" in sec:
                    continue  # partial train mappings are completed by the stage CLI (tested in test_trainloop)
                from_dict(cls, sec)
    else:
        from edgesmith.compress.prune import PruneConfig
        from edgesmith.distill.distill import DistillConfig
        from edgesmith.config import config_from_args

        cls = {"prune-default.yaml": PruneConfig, "distill-default.yaml": DistillConfig}[path.name]
        args = type("A", (), {"recipe": str(path), "overrides": []})()
        if cls is PruneConfig:
            from edgesmith.config import from_dict

            from_dict(cls, load_stage_yaml(path, cls))
        else:
            config_from_args(cls, args)


def test_demo_recipe_targets_two_thirds_and_clean_widths():
    """The demo student: ~65% of the teacher's non-embedding parameters, new widths multiples of 256."""
    r = P.load_recipe(REPO / "recipes" / "smollm2-edge-cpu.yaml")
    pr = r.stages["prune"]
    h, i, layers, heads, kv, hd = 576, pr["intermediate_size"], pr["num_layers"], 9, 3, 64
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * i
    ratio = per_layer * layers / 106_203_456
    assert 0.6 <= ratio <= 0.7, ratio
    assert i % 256 == 0
    assert set(r.stages["export"]["gguf"]) == {"F16", "Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0"}


def test_bad_recipes_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    cases = {
        "stages:\n  prune: {intermediate_sise: 10}\n": "stages.prune.intermediate_sise",
        "stages:\n  polish: {}\n": "stages.polish",
        "stages:\n  merge: {}\n": "stages.merge",
        "stages:\n  export: {gguf: [Q3_XYZ]}\n": "Q3_XYZ",
        "stages:\n  bench: {repeat: 0}\n": "stages.bench.repeat",
        "model: default\n": "not a pipeline recipe",
    }
    for text, needle in cases.items():
        bad.write_text(text)
        with pytest.raises(EdgesmithError) as e:
            P.plan(P.load_recipe(bad), str(bad))
        assert needle in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value), str(e.value)
    r = subprocess.run([sys.executable, "-m", "edgesmith", "run", str(bad)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "edgesmith run: error:" in r.stderr


def test_stage_flags_must_name_listed_stages(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text(f"model: default\nout: {tmp_path / 'o'}\nstages:\n  export: {{gguf: [F16]}}\n")
    with pytest.raises(EdgesmithError, match="no prune stage"):
        P.run_pipeline(P.load_recipe(rec), str(rec), only="prune")


def _tiny_recipe(tmp_path: Path, model: Path, data: Path, intermediate: int = 64) -> Path:
    rec = {
        "name": "tiny-edge", "model": str(model), "out": str(tmp_path / "out"),
        "stages": {
            "prune": {"intermediate_size": intermediate, "num_layers": 2, "round_to": 32, "calib": str(data),
                      "calib_windows": 2, "calib_seq_len": 64, "eval_windows": 1},
            "distill": {"data": str(data), "max_length": 64, "val_fraction": 0.3,
                        "train": {"max_steps": 2, "batch_size": 2, "warmup_steps": 1, "progress": False}},
            "export": {"gguf": ["F16"], "modelfile": True, "jobs": 1},
            "bench": {"tasks": [], "max_chunks": 1, "corpus_chunks": 1, "ctx": 32, "latency": False},
            "report": {},
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


def _times(out: Path) -> dict:
    return {s: json.loads((out / s / "manifest.json").read_text())["started"] + str((out / s / "manifest.json").stat().st_mtime_ns)
            for s in P.ORDER if (out / s / "manifest.json").is_file()}


@pytest.mark.slow
def test_tiny_pipeline_runs_skips_and_reruns_from_the_changed_stage(tmp_path, tiny_factory, shared_data):
    model = tiny_factory("tiny", hidden=64, intermediate=128, layers=3, heads=4, kv_heads=2)
    data = tmp_path / "data.jsonl"
    rows = json.loads((shared_data / "instruct" / "alpaca_en_demo.json").read_text())[:24]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _tiny_recipe(tmp_path, model, data)
    out = P.run_pipeline(P.load_recipe(recipe), str(recipe))
    for s in ("prune", "distill", "export", "bench", "report"):
        m = json.loads((out / s / "manifest.json").read_text())
        assert m["stage"] == s and m["outputs"] and m["input_hash"] and m["settings_hash"] and m["versions"]["edgesmith"]
        for o in m["outputs"]:
            assert (out / s / o["path"]).stat().st_size == o["size"]
    assert (out / "export" / "tiny-edge-F16.gguf").is_file() and (out / "export" / "Modelfile.F16").is_file()
    assert "FROM ./tiny-edge-F16.gguf" in (out / "export" / "Modelfile.F16").read_text()
    assert (out / "distill" / "heldout.txt").is_file()
    assert not (out / ".work").exists() or not any((out / ".work").iterdir())
    report = (out / "report.md").read_text()
    assert "| teacher | HF fp32 |" in report and "| student | GGUF F16 |" in report and "## Stage times" in report
    assert "Measured on ?" not in report and " cores, 0 threads" not in report  # the machine comes from the results JSON
    # the held-out corpus is scored in the WikiText run's model loads, and reaches every row of the report
    doc = json.loads((out / "bench" / "wikitext.json").read_text())
    assert all("perplexity" in r and r["perplexity_on"]["corpus"]["chunks"] == 1 for r in doc["results"])
    assert not (out / "bench" / "corpus.json").exists()
    assert all(r.get("corpus_ppl") for r in bench_rows(out))
    from edgesmith.gguf_read import metadata

    fields = metadata(out / "export" / "tiny-edge-F16.gguf")
    assert fields["edgesmith.recipe_hash"] == P.recipe_hash(P.load_recipe(recipe))

    first = _times(out)
    said = []
    P.run_pipeline(P.load_recipe(recipe), str(recipe), say=said.append)
    assert _times(out) == first and sum("up to date" in s for s in said) == 5, said

    # a changed pruning target re-runs prune and everything downstream of it
    recipe2 = _tiny_recipe(tmp_path, model, data, intermediate=96)
    said = []
    P.run_pipeline(P.load_recipe(recipe2), str(recipe2), say=said.append)
    after = _times(out)
    assert all(after[s] != first[s] for s in ("prune", "distill", "export", "bench", "report")), said
    cfg = json.loads((out / "prune" / "config.json").read_text())
    assert cfg["intermediate_size"] == 96

    # --only report re-runs just that stage; --from bench re-runs bench and report
    said = []
    P.run_pipeline(P.load_recipe(recipe2), str(recipe2), only="report", say=said.append)
    again = _times(out)
    assert again["report"] != after["report"] and all(again[s] == after[s] for s in ("prune", "distill", "export", "bench"))
    said = []
    P.run_pipeline(P.load_recipe(recipe2), str(recipe2), dry_run=True, from_stage="bench", say=said.append)
    assert [s.split("]")[0][1:] for s in said if "would run" in s] == ["bench", "report"]


@pytest.mark.slow
def test_reduced_demo_on_the_default_model_every_artifact_loads_and_generates(tmp_path, default_hf):
    """The demo recipe with tiny budgets: every artifact exists, loads and generates."""
    out = tmp_path / "demo"
    args = ["--out", str(out), "--quants", "F16,Q4_K_M",
            "--set", "stages.prune.calib_windows=4", "--set", "stages.prune.eval_windows=1",
            "--set", "stages.distill.train.max_steps=2",
            "--set", "stages.bench.tasks=[arc_easy]", "--set", "stages.bench.limit=5", "--set", "stages.bench.max_chunks=1",
            "--set", "stages.bench.corpus_chunks=1", "--set", "stages.bench.repeat=1"]
    r = subprocess.run([sys.executable, "-m", "edgesmith", "run", str(REPO / "recipes" / "smollm2-edge-cpu.yaml"), *args],
                       capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Ollama-ready files" in r.stdout and "report:" in r.stdout
    ex = json.loads((out / "export" / "export.json").read_text())
    assert ex["all_checks_ok"], ex
    files = {Path(e["path"]).name for e in ex["files"]}
    assert {"smollm2-edge-cpu-F16.gguf", "smollm2-edge-cpu-Q4_K_M.gguf", "Modelfile.Q4_K_M"} <= files
    mf = (out / "export" / "Modelfile.Q4_K_M").read_text()
    assert mf.startswith("FROM ./smollm2-edge-cpu-Q4_K_M.gguf") or "\nFROM ./smollm2-edge-cpu-Q4_K_M.gguf" in mf
    student = json.loads((out / "distill" / "config.json").read_text())
    shape = P.load_recipe(REPO / "recipes" / "smollm2-edge-cpu.yaml").stages["prune"]
    assert (student["intermediate_size"], student["num_hidden_layers"]) == (shape["intermediate_size"], shape["num_layers"])
    for art in (out / "distill", out / "export" / "smollm2-edge-cpu-Q4_K_M.gguf", out / "export" / "onnx"):
        g = subprocess.run([sys.executable, "-m", "edgesmith", "chat", str(art), "--prompt", "Name a colour.",
                            "--max-new-tokens", "8"], capture_output=True, text=True, timeout=600)
        assert g.returncode == 0 and g.stdout.strip(), (art, g.stderr[-2000:])
    report = (out / "report.md").read_text()
    for fmt in ("HF fp32", "GGUF F16", "GGUF Q4_K_M", "ONNX fp32"):
        assert f"| student | {fmt} |" in report, fmt
    assert "| teacher | HF fp32 |" in report and "decode_vs_size.png" in report


def test_makefile_has_every_documented_target():
    # `make -n` resolves each target without running it: a missing rule fails here, not in CI
    import shutil
    import subprocess
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    for target in ("setup", "test", "test-fast", "demo", "compress", "distill", "finetune", "export", "bench",
                   "report", "all", "clean", "help"):
        r = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, f"make {target}: {r.stderr.strip()}"
    dry = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True).stdout
    assert "pytest" in dry


def test_sweep_pareto_and_config_errors(tmp_path):
    from edgesmith.config import from_dict
    from edgesmith.errors import ConfigError
    from edgesmith.sweep import SweepConfig, mean_acc, pareto

    # (speed, ppl): the second point is slower and worse than the first: not on the front
    assert pareto([(100, 30), (90, 40), (120, 50), (80, 20)]) == [0, 2, 3]
    acc, se = mean_acc({"a": {"acc": 0.5, "acc_stderr": 0.03}, "b": {"acc": 0.7, "acc_stderr": 0.04}})
    assert acc == pytest.approx(0.6) and se == pytest.approx(0.025)
    with pytest.raises(ConfigError, match=r"fractions\[1\]"):
        from_dict(SweepConfig, {"fractions": [0.5, 1.5]})
    bad = tmp_path / "s.yaml"
    bad.write_text("recipe: recipes/smollm2-edge-cpu.yaml\nfractions: [0.5]\nset: [nonsense]\n")
    r = subprocess.run([sys.executable, "-m", "edgesmith", "sweep", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "set[0]" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_tiny_sweep_measures_each_point_and_marks_the_front(tmp_path, tiny_factory, shared_data):
    """Two students of a tiny model through prune's search, export, bench: sweep.json/md/png with speed, size,
    perplexity and accuracy per point, the teacher measured once."""
    from edgesmith.sweep import SweepConfig, run_sweep

    model = tiny_factory("tiny", hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2)
    data = tmp_path / "data.jsonl"
    rows = json.loads((shared_data / "instruct" / "alpaca_en_demo.json").read_text())[:24]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _tiny_recipe(tmp_path, model, data)
    rec = yaml.safe_load(recipe.read_text())
    rec["stages"]["export"] = {"gguf": ["Q4_K_M"], "modelfile": False, "jobs": 1}
    rec["stages"]["bench"] = {"tasks": ["arc_easy"], "limit": 8, "max_chunks": 1, "corpus_chunks": 1, "ctx": 32,
                              "latency": True, "repeat": 1, "teacher_quants": ["Q4_K_M"], "teacher_source_gguf": False}
    recipe.write_text(yaml.safe_dump(rec))
    root = run_sweep(SweepConfig(recipe=str(recipe), out=str(tmp_path / "sweep"), fractions=[0.8, 0.5]), say=lambda m: None)
    doc = json.loads((root / "sweep.json").read_text())
    assert doc["teacher"]["decode_tok_s"] > 0 and doc["teacher"]["wikitext_ppl"] > 0
    a, b = doc["points"]
    assert a["params_non_embedding"] > b["params_non_embedding"]
    for p in doc["points"]:
        assert p["decode_tok_s"] > 0 and p["file_mb"] > 0 and p["wikitext_ppl"] > 0 and p["tasks"]["arc_easy"]["n"] == 8
        assert p["mean_acc_stderr"] > 0 and isinstance(p["pareto"], bool) and p["fraction_measured"] <= p["fraction"] + 0.01
    assert any(p["pareto"] for p in doc["points"])
    assert (root / "sweep.png").stat().st_size > 10_000 and "| **teacher** |" in (root / "sweep.md").read_text()
    # the teacher was benchmarked in the first point only
    assert not any("teacher" in r["artifact"] or r["artifact"] == str(model)
                   for r in json.loads((root / "p50" / "bench" / "wikitext.json").read_text())["results"])
