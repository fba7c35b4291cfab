"""The single entry point: every registered subcommand shows up in --help and has its own --help;
user errors are one line on stderr with exit code 2."""
import subprocess
import sys

import pytest

from edgesmith.cli import COMMANDS, build_parser


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "edgesmith", *args], capture_output=True, text=True, timeout=600, **kw)


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert name in r.stdout
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help(name):
    r = run_cli(name, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: edgesmith " + name in r.stdout


def test_user_error_is_one_line_exit_2(tmp_path):
    bogus = tmp_path / "nope"
    r = run_cli("info", str(bogus))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and str(bogus) in lines[0]
    assert "Traceback" not in r.stderr


def test_info_rejects_non_gguf_file(tmp_path):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"not a gguf at all" * 10)
    r = run_cli("info", str(f))
    assert r.returncode == 2 and "not a GGUF file" in r.stderr


@pytest.mark.parametrize("stage,cmd,cls_path,key,flag", [
    ("prune", "prune", "edgesmith.compress.prune:PruneConfig", "num_layers", "--num-layers"),
    ("distill", "distill", "edgesmith.distill.distill:DistillConfig", "max_length", "--max-length"),
    ("finetune", "finetune", "edgesmith.finetune.lora:FinetuneConfig", "max_length", "--max-length"),
    ("export", "export", "edgesmith.export.run:ExportConfig", "jobs", "--jobs"),
])
def test_every_stage_command_reads_a_recipe_then_flags_then_set(tmp_path, stage, cmd, cls_path, key, flag):
    """One flag -> config path for every stage command: the recipe's stages.<stage> section, then the command's flags,
    then --set, each overriding the one before; a bad key names the recipe file and the key."""
    import importlib

    import yaml

    from edgesmith.config import config_from_args

    mod, name = cls_path.split(":")
    cls = getattr(importlib.import_module(mod), name)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "default", "stages": {stage: {key: 30, "train": {"lr": 1e-5}}
                                                                     if stage in ("distill", "finetune") else {key: 30}}}))
    parse = lambda *a: build_parser().parse_args([cmd, *a])  # noqa: E731
    given = lambda args: {k: getattr(args, k) for k in ("model", "out") if hasattr(args, k)}  # noqa: E731
    args = parse("--recipe", str(recipe))
    cfg = config_from_args(cls, args, given(args))
    assert getattr(cfg, key) == 30
    if stage in ("distill", "finetune"):  # a partial train: mapping keeps the stage's other loop defaults
        assert cfg.train.lr == 1e-5 and cfg.train.batch_size == cls().train.batch_size
    args = parse("--recipe", str(recipe), flag, "40")
    assert getattr(config_from_args(cls, args, given(args)), key) == 40
    args = parse("--recipe", str(recipe), flag, "40", "--set", f"{key}=50")
    assert getattr(config_from_args(cls, args, given(args)), key) == 50
    args = parse("--recipe", str(recipe), "--set", "no_such_key=1")
    with pytest.raises(Exception, match=rf"{recipe}: .*no_such_key"):
        config_from_args(cls, args, given(args))


def test_bench_reads_a_recipe_then_flags_then_set(tmp_path):
    """`edgesmith bench` takes the same path as the stage commands: a pipeline recipe's stages.bench measurement
    settings (its choice of artifacts is the pipeline's: dropped, the command line names the artifacts), then flags,
    then --set."""
    import dataclasses

    import yaml

    from edgesmith.bench.cli import cmd_bench  # noqa: F401 - the command the parser dispatches to
    from edgesmith.bench.harness import BenchSettings, BenchStage
    from edgesmith.config import PIPELINE_ONLY, config_from_args

    names = lambda c: {f.name for f in dataclasses.fields(c)}  # noqa: E731
    assert set(PIPELINE_ONLY["bench"]) == names(BenchStage) - names(BenchSettings)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "default", "stages": {"bench": {
        "limit": 30, "tasks": ["piqa"], "latency": True, "teacher": False, "teacher_quants": ["Q4_K_M"]}}}))

    def cfg(*a):
        args = build_parser().parse_args(["bench", "a.gguf", "b.gguf", *a])
        csv = lambda v: v.split(",") if v else None  # noqa: E731
        return config_from_args(BenchSettings, args, {"artifacts": args.artifacts, "tasks": csv(args.tasks),
                                                      "task_kinds": csv(args.task_kinds)})

    s = cfg("--recipe", str(recipe))
    assert (s.artifacts, s.limit, s.tasks, s.latency, s.ctx) == (["a.gguf", "b.gguf"], 30, ["piqa"], True, 512)
    s = cfg("--recipe", str(recipe), "--limit", "40", "--tasks", "arc_easy,piqa", "--no-latency")
    assert (s.limit, s.tasks, s.latency) == (40, ["arc_easy", "piqa"], False)
    assert cfg("--recipe", str(recipe), "--limit", "40", "--set", "limit=50").limit == 50
    assert cfg("--no-ppl").ppl is False and cfg().ppl is True and cfg().repeat == 5
    with pytest.raises(Exception, match=rf"{recipe}: .*no_such_key"):
        cfg("--recipe", str(recipe), "--set", "no_such_key=1")
