"""Several processes, one output (edgesmith/processes.py): under `accelerate launch` the main process alone writes a
stage's output and the caches the processes share; the others write nothing, wait, and return only once the output is
complete.

Run as a script (`accelerate launch ... tests/test_processes.py --worker LOGS COMMANDS.json`) it is one process of such a
run: Python's audit hooks record every file-system write the process makes (open for writing, rename/replace, mkdir of a
new folder, remove, rmtree) while it runs each stage command of COMMANDS.json through edgesmith's CLI, and what the
output folder holds when the command returns; LOGS/rank{r}.json gets both.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_one_process_needs_no_partner(tmp_path):
    """One process: main_first runs its block, main_writes writes and returns what write() returned, wait returns."""
    from edgesmith import processes

    with processes.main_first():
        (tmp_path / "a").write_text("x")
    assert processes.main_writes(lambda: 7) == 7 and processes.is_main()
    processes.wait()
    assert processes.state().num_processes == 1


# ---------------------------------------------------------------- the worker: one of two processes, its writes recorded


def _writes_of(event: str, args: tuple) -> list[str]:
    """The paths an audit event writes to (empty: not a write, or a folder that already exists)."""
    def path(p):
        return os.path.abspath(os.fsdecode(p)) if isinstance(p, (str, bytes, os.PathLike)) else None

    if event == "open" and len(args) >= 3:
        mode, flags = args[1], args[2]
        wants = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        return [p for p in [path(args[0])] if p and wants]
    if event == "os.rename":
        return [p for p in (path(args[0]), path(args[1])) if p]
    if event == "os.mkdir":
        p = path(args[0])
        return [p] if p and not os.path.exists(p) else []
    if event in ("os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod"):
        return [p for p in [path(args[0])] if p]
    return []


def _worker(logs: str, commands: str) -> None:
    from edgesmith.cli import main

    rank = int(os.environ["RANK"])  # set by the launcher
    log: list[dict] = []
    current: list[str] = []
    sys.addaudithook(lambda event, args: current.extend(_writes_of(event, args)))
    for cmd in json.loads(Path(commands).read_text()):
        current.clear()
        rc = main(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        log.append({"rc": rc, "writes": list(current), "out_on_return": sorted(f.name for f in out.iterdir())})
    Path(logs, f"rank{rank}.json").write_text(json.dumps(log))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[2], sys.argv[3])


# ---------------------------------------------------------------- finetune (DDP) and distill (FSDP, DDP): who writes


@pytest.mark.slow
def test_only_the_main_process_writes_outputs_and_shared_caches(tiny_factory, tmp_path):
    """Two processes run finetune (DDP, a checkpoint and the best weights kept), distill sharded with the teacher's
    top-k cached first, distill from a teacher corpus and from teacher:N answers. Rank 1 writes nothing inside an
    output folder or the cache (rank 0 built what both read), rank 0 wrote every output file, and each process's
    command returns with the output complete."""
    from multiproc import launch, two_processes
    from test_sharding import _alpaca

    teacher = tiny_factory("teacher")
    student = tiny_factory("student", hidden=32, intermediate=48, layers=2, seed=1)
    data, cache, logs = _alpaca(tmp_path / "data.json"), tmp_path / "cache", tmp_path / "logs"
    logs.mkdir()
    train = ["--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.warmup_steps=0",
             "--set", "train.precision=fp32", "--set", "train.progress=false", "--set", "max_length=48"]
    outs = {k: tmp_path / k for k in ("finetune", "distill-topk", "distill-corpus", "distill-answers")}
    tiny_corpus = ["--set", "corpus.tokens=120", "--set", "corpus.max_new_tokens=8", "--set", "corpus.batch_size=4",
                   "--set", "corpus.topk=4"]
    commands = [
        ["finetune", "--model", str(student), "--data", str(data), "--out", str(outs["finetune"]), *train,
         "--set", "val_fraction=0.25", "--set", "train.save_every=1", "--set", "train.eval_every=1"],
        ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data), "--sharding", "fsdp",
         "--out", str(outs["distill-topk"]), *train, "--set", "cache_teacher_topk=4", "--set", "val_fraction=0.25"],
        ["distill", "--teacher", str(teacher), "--student", str(student), "--data", "teacher",
         "--out", str(outs["distill-corpus"]), *train, *tiny_corpus, "--set", "val_fraction=0.25"],
        ["distill", "--teacher", str(teacher), "--student", str(student), "--data", "teacher:4",
         "--out", str(outs["distill-answers"]), *train, "--set", "teacher_max_new_tokens=8", "--set", "val_fraction=0"],
    ]
    (tmp_path / "commands.json").write_text(json.dumps(commands))
    p = launch(two_processes(str(Path(__file__)), "--worker", str(logs), str(tmp_path / "commands.json")),
               env={"EDGESMITH_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.loads((logs / f"rank{r}.json").read_text()) for r in (0, 1))
    # the main process alone prints distill's memory estimate, which counts both processes and the sharding
    estimates = [x for x in p.stdout.splitlines() if x.startswith("distill: estimated peak memory")]
    assert len(estimates) == 3 and "while training (2 processes x" in estimates[0] and "student weights 0.0 (1/2)" in estimates[0]

    inside = [str(d) + os.sep for d in [*outs.values(), cache]]
    for i, (a, b) in enumerate(zip(r0, r1)):
        out = Path(commands[i][commands[i].index("--out") + 1])
        assert a["rc"] == b["rc"] == 0, (commands[i][0], a["rc"], b["rc"])
        stray = [w for w in b["writes"] if w.startswith(tuple(inside))]
        assert not stray, f"{commands[i][0]} {out.name}: rank 1 wrote {stray[:5]}"
        final = sorted(f.name for f in out.iterdir())
        assert a["out_on_return"] == b["out_on_return"] == final, (out.name, a["out_on_return"], b["out_on_return"], final)
        # every output file was put in place by rank 0 (written there, or renamed there from its temporary name)
        missing = [f for f in final if str(out / f) not in a["writes"] and not (out / f).is_dir()]
        assert not missing, f"{out.name}: not written by rank 0: {missing}"
        manifest = json.loads((out / f"{commands[i][0]}.json").read_text())
        assert manifest["result"]["world_size"] == 2 and manifest["result"]["steps"] == 2
    # what rank 0 built once and both read: the teacher's top-k targets, its corpus and its answers
    assert {d.name for d in cache.iterdir()} >= {"teacher-topk", "teacher-corpus", "teacher-data"}
    assert any(w.startswith(str(cache / "teacher-topk")) for w in r0[1]["writes"])
    assert any(w.startswith(str(cache / "teacher-corpus")) for w in r0[2]["writes"])
    assert any(w.startswith(str(cache / "teacher-data")) for w in r0[3]["writes"])
    assert (outs["finetune"] / "checkpoint" / "state.pt").is_file() and (outs["distill-topk"] / "model.safetensors").is_file()
