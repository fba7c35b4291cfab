"""Nothing is lost: a killed export or prune leaves no partial file at the final path, a failed re-run
leaves the finished artifact intact, and a training run stopped by SIGTERM checkpoints and resumes to
the same weights as an uninterrupted run."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robustness.conftest import assert_clean_error, cli, count, run_cli_subprocess


def _digest(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _spawn(*args, **kw) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("edgesmith")
    return subprocess.Popen([str(exe), *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def _kill_when(proc, cond, timeout=240.0) -> bool:
    """SIGKILL the child's whole process group as soon as cond() holds; False if it ended first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError("timed out waiting for the child to start writing")


def test_killed_export_leaves_no_partial_gguf(tiny_hf, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    final = out / "tiny-F16.gguf"
    proc = _spawn("export", tiny_hf, "--out", out, "--gguf", "F16", "--no-check", "--name", "tiny")
    killed = _kill_when(proc, lambda: any(".tmp-" in p.name and p.stat().st_size > 0 for p in out.iterdir()))
    assert killed, proc.stderr.read()
    assert not final.exists(), "a killed export left a file at the final path"
    assert not (out / "export.json").exists()
    count("interrupt")


def test_killed_prune_leaves_no_partial_dir_and_keeps_the_old_one(tiny_hf, tmp_path):
    out = tmp_path / "pruned"
    rc, _, err = cli("prune", tiny_hf, "--out", out, "--intermediate-size", "64", "--eval-windows", "0", "--round-to", "32")
    assert rc == 0, err
    before = _digest(out)
    proc = _spawn("prune", tiny_hf, "--out", out, "--intermediate-size", "32", "--eval-windows", "0", "--round-to", "32")
    killed = _kill_when(proc, lambda: any(p.name.startswith(".pruned.tmp-") and any(p.iterdir()) for p in tmp_path.iterdir()))
    assert killed, proc.stderr.read()
    assert _digest(out) == before, "a killed re-run changed the finished artifact"
    count("interrupt")


def test_failed_rerun_never_overwrites_a_finished_artifact(tiny_hf, tmp_path):
    """A re-run that fails while writing (file size limit -> EFBIG, like a full disk) keeps the old output."""
    out = tmp_path / "pruned"
    rc, _, err = cli("prune", tiny_hf, "--out", out, "--intermediate-size", "64", "--eval-windows", "0", "--round-to", "32")
    assert rc == 0, err
    before = _digest(out)
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
            "from edgesmith.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "prune", str(tiny_hf), "--out", str(out), "--intermediate-size", "32",
                        "--eval-windows", "0", "--round-to", "32"], capture_output=True, text=True, timeout=300)
    assert_clean_error(r.returncode, r.stderr)
    assert _digest(out) == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "temporary output left behind"
    count("interrupt")


def _ft_args(model, data, out, extra=()):
    return ["finetune", "--model", model, "--data", data, "--out", out, "--method", "lora", "--max-steps", "6",
            "--batch-size", "2", "--warmup-steps", "1", "--save-every", "1", "--max-length", "64", "--no-progress",
            "--val-fraction", "0", *extra]


def _sigterm_when(proc, ready) -> str:
    """SIGTERM `proc` as soon as ready() holds (it must not exit before, nor take 5 minutes); it must then stop with
    exit code 130. Returns its stderr."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 300
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    return err


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(tiny_hf, tmp_path, shared_data):
    from safetensors.numpy import load_file

    data = shared_data / "instruct" / "identity.json"
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    os.environ.update(env)  # the in-process reference run uses the same thread count
    ref = tmp_path / "ref"
    import torch

    torch.set_num_threads(1)
    rc, _, err = cli(*_ft_args(tiny_hf, data, ref))
    assert rc == 0, err

    run = tmp_path / "run"
    proc = _spawn(*_ft_args(tiny_hf, data, run), env={**os.environ, **env})
    err = _sigterm_when(proc, lambda: (run / "checkpoint" / "state.pt").is_file())
    assert "Traceback" not in err and "interrupted" in err
    step = int(__import__("json").loads((run / "checkpoint" / "info.json").read_text())["step"])
    assert 1 <= step < 6, step
    assert not (run / "adapter_model.safetensors").exists()

    r = run_cli_subprocess(*_ft_args(tiny_hf, data, run, ["--resume"]), env=env)
    assert r.returncode == 0, r.stderr
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(run / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]).max() < 1e-5, k
    count("interrupt", 2)


def test_pipeline_resumes_an_interrupted_stage_by_itself(tiny_hf, tmp_path, shared_data):
    """`edgesmith run` stopped by SIGTERM in the middle of its finetune stage, then run again with the same command:
    the stage continues from its checkpoint (no --resume needed) and ends with the same adapter as an uninterrupted
    pipeline."""
    import json

    import yaml
    from safetensors.numpy import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def recipe(out: Path) -> Path:
        r = {"name": "resume", "model": str(tiny_hf), "out": str(out), "stages": {"finetune": {
            "data": str(shared_data / "instruct" / "identity.json"), "method": "lora", "max_length": 64, "val_fraction": 0,
            "train": {"max_steps": 6, "batch_size": 2, "warmup_steps": 1, "save_every": 1, "progress": False}}}}
        p = tmp_path / f"{out.name}.yaml"
        p.write_text(yaml.safe_dump(r))
        return p

    ref = run_cli_subprocess("run", recipe(tmp_path / "ref"), env=env)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "cut"
    proc = _spawn("run", recipe(out), env=env)
    ckpt = out / ".work" / "finetune" / "checkpoint" / "info.json"
    _sigterm_when(proc, lambda: ckpt.is_file() and json.loads(ckpt.read_text())["step"] >= 2)
    assert not (out / "finetune" / "manifest.json").exists()  # an interrupted stage is not finished
    again = run_cli_subprocess("run", recipe(out), env=env)
    assert again.returncode == 0, again.stderr
    metrics = [json.loads(x) for x in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]  # continued, not restarted
    a = load_file(tmp_path / "ref" / "finetune" / "adapter_model.safetensors")
    b = load_file(out / "finetune" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]).max() < 1e-5 for k in a)
