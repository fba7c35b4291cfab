"""`edgesmith bench --remote`: a real OpenSSH server on 127.0.0.1 and a separate unix user (`es-device`,
its own home and authorized key) as the device (tests/device_sshd.py). The product builds edgesmith's
wheel itself, copies it over and installs it by path into a fresh venv that user creates with a plain
system Python; only the [device] dependencies come from elsewhere: a wheelhouse (`--remote-wheels`,
offline) or the device's own package index (a local HTTP index in its pip.conf). Both sources also
offer an edgesmith that is not ours; it must never be installed, and the index must never be asked
for edgesmith. A GGUF and an ONNX export are benchmarked there and the JSON comes back with the
device's machine record (no torch, no transformers). Under CI=true a missing prerequisite fails."""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from device_sshd import (USER, LocalDevice, Missing, PackageIndex, decoy_edgesmith_wheel, pip_conf, wheelhouse,
                         wipe)
from edgesmith.errors import EdgesmithError

REPO = Path(__file__).resolve().parents[1]
ES = str(REPO / ".venv/bin/edgesmith")
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
pytestmark = pytest.mark.slow  # two fresh device venvs (pip install of ~30 wheels each): about a minute on 2 cores


def _need(make, *args):
    """make(*args), or skip saying why; under CI=true a missing prerequisite is a failure."""
    try:
        return make(*args)
    except Missing as e:
        if CI:
            pytest.fail(f"{e} (under CI=true the remote-device tests must run)")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    d = _need(LocalDevice, tmp_path_factory.mktemp("sshd"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def device_python(device):
    return _need(device.python)


@pytest.fixture(scope="module")
def deps(tmp_path_factory):
    """The [device] dependencies as wheels, plus an edgesmith wheel that is not ours (same version)."""
    from edgesmith import __version__

    d = _need(wheelhouse, tmp_path_factory.mktemp("wheelhouse"))
    decoy_edgesmith_wheel(d, __version__)
    return d


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama as an F32 GGUF and as an fp32 ONNX export (a few seconds each)."""
    from conftest import make_tiny_llama
    from edgesmith.export.gguf_convert import convert
    from edgesmith.export.onnx import export_onnx

    d = tmp_path_factory.mktemp("remote-art")
    hf = make_tiny_llama(d / "hf", tokenizer_dir, hidden=64, intermediate=128, layers=2)
    gguf = convert(hf, d / "tiny-F32.gguf", "F32")
    onnx = Path(export_onnx(hf, d / "onnx", check=False)["path"])
    return gguf, onnx


def _remote_edgesmith_is_ours(device, remote_dir: str) -> None:
    p = device.ssh(f"{remote_dir}/venv/bin/python -c 'import edgesmith; print(getattr(edgesmith, \"DECOY\", False))'")
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr


def test_bench_remote_gguf_and_onnx_offline(device, device_python, deps, artifacts, shared_data, tmp_path):
    gguf, onnx = artifacts
    text = tmp_path / "wiki.txt"
    text.write_text((shared_data / "lm" / "wikitext-2-raw" / "wiki.test.raw").read_text()[:2000])
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"query": "Question: What do plants need to make food?\\nAnswer:", "choices": ["sunlight", "sand"], "gold": 0}\n'
                    '{"query": "Question: What is frozen water?\\nAnswer:", "choices": ["steam", "ice"], "gold": 1}\n')
    rel = ".cache/edgesmith-remote-test-offline"
    wipe(device.home, rel)  # a fresh venv: the install path runs
    remote_dir = str(device.home / rel)
    out = tmp_path / "remote.json"
    cmd = [ES, "bench", str(gguf), str(onnx), "--ppl-text", str(text), "--ctx", "64", "--max-chunks", "2",
           "--tasks", f"copa,{mine}", "--limit", "4", "--data-dir", str(shared_data), "--latency", "--repeat", "1",
           "--threads", "1", "--json", str(out), "--remote", "es-device", "--ssh-config", str(device.config),
           "--remote-dir", f"~/{rel}", "--remote-python", device_python, "--remote-wheels", str(deps)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "installing edgesmith[device]" in p.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["remote"]["target"] == "es-device"
    by_kind = {r["backend"]: r for r in doc["results"]}
    assert set(by_kind) == {"gguf", "onnx"}, [r.get("error") for r in doc["results"]]
    r = by_kind["gguf"]
    assert r["artifact"] == str(gguf) and r["remote_artifact"].startswith(remote_dir)
    assert by_kind["onnx"]["artifact"] == str(onnx) and by_kind["onnx"]["perplexity"]["value"] > 0
    for res in by_kind.values():
        assert set(res["tasks"]) == {"copa", "mine"} and res["tasks"]["copa"]["n"] == 4 and res["tasks"]["mine"]["n"] == 2
        assert res["latency"]["threads"] == 1 and res["latency"]["decode_tok_s"] > 0
    # the machine record is the device venv's: no torch, no transformers, the runtimes of [device]
    libs = doc["machine"]["libraries"]
    assert "torch" not in libs and "transformers" not in libs and libs["llama_cpp_python"] == "0.3.36"
    p = device.ssh(f"{remote_dir}/venv/bin/python -c 'import importlib.util as u; "
                   "print([m for m in (\"torch\", \"transformers\") if u.find_spec(m)])'")
    assert p.stdout.strip() == "[]", p.stderr
    assert doc["settings"]["data_dir"] != str(shared_data)  # it ran on the copies
    assert not list(Path(remote_dir, "runs").iterdir())  # copied artifacts removed afterwards; the venv stays
    assert Path(remote_dir, "venv").owner() == USER  # made by the device user, with the device's Python

    # the install: our wheel (never the other edgesmith in the wheelhouse), its cost recorded
    inst = doc["remote"]["install"]
    _remote_edgesmith_is_ours(device, remote_dir)
    assert inst["reused"] is False and inst["dependencies_from"] == "--remote-wheels" and inst["index_download_bytes"] == 0
    ours = sum(w.stat().st_size for w in deps.glob("*.whl") if not w.name.startswith("edgesmith-"))
    assert inst["copied_bytes"] > ours and inst["wheel"].startswith("edgesmith-")
    assert inst["install_s"] > 0 and inst["venv_bytes"] > inst["copied_bytes"] and 0 < inst["import_harness_s"] < 30

    # the same harness on the same file here gives the same numbers
    from edgesmith.bench import harness as H
    from edgesmith.native import run_isolated

    s = H.resolve_settings(H.BenchSettings(ppl_text=str(text), ctx=64, max_chunks=2, tasks=["copa", str(mine)],
                                           data_dir=str(shared_data), limit=4, threads=1))
    local = run_isolated(H.run_artifact, str(gguf), asdict(s), what="local")
    assert r["perplexity"]["value"] == pytest.approx(local["perplexity"]["value"], rel=1e-6)
    assert r["tasks"]["copa"]["acc"] == local["tasks"]["copa"]["acc"] and r["tasks"]["mine"] == local["tasks"]["mine"]

    # second time: the same build is found there, nothing is copied or installed
    from edgesmith.bench.remote import Remote, ensure_env

    logs = []
    again = ensure_env(Remote("es-device", str(device.config)), remote_dir, device_python, None, log=logs.append)
    assert logs == [] and again["reused"] is True and again["source_sha256"] == inst["source_sha256"]


def test_bench_remote_from_the_devices_own_index(device, device_python, deps, artifacts, tmp_path):
    """No --remote-wheels: the dependencies come from the index in the device's pip.conf, which also
    offers a newer "edgesmith"; pip is never asked about edgesmith, ours is installed."""
    from edgesmith.bench.harness import BenchSettings
    from edgesmith.bench.remote import run_remote

    gguf, _ = artifacts
    served = tmp_path / "index"
    served.mkdir()
    for w in deps.glob("*.whl"):
        if not w.name.startswith("edgesmith-"):
            os.link(w, served / w.name)
    decoy_edgesmith_wheel(served, "99.0")
    index = PackageIndex(served)
    pip_conf(device.home, USER, index.url)
    rel = ".cache/edgesmith-remote-test-index"
    wipe(device.home, rel)
    wipe(device.home, ".cache/pip")  # so the download is a real one
    try:
        doc = run_remote(BenchSettings(artifacts=[str(gguf)], ppl=False, latency=True, repeat=1, threads=1), "es-device",
                         ssh_config=str(device.config), remote_dir=f"~/{rel}", python=device_python, log=lambda m: None)
    finally:
        pip_conf(device.home, USER, None)
        index.stop()
    assert doc["results"][0]["latency"]["decode_tok_s"] > 0
    assert index.requests and not index.asked_for("edgesmith"), index.requests
    _remote_edgesmith_is_ours(device, str(device.home / rel))
    inst = doc["remote"]["install"]
    assert inst["dependencies_from"] == "the device's package index" and inst["reused"] is False
    # what pip reported downloading is what the index served (pip rounds its sizes to 3 digits)
    assert inst["index_download_bytes"] == pytest.approx(index.served, rel=0.02)


def test_bench_remote_never_asks_for_a_password(device, artifacts):
    """A key the server does not accept: BatchMode fails at once with a one-line error, no prompt."""
    from edgesmith.bench.harness import BenchSettings
    from edgesmith.bench.remote import run_remote

    gguf, _ = artifacts
    t0 = time.time()
    with pytest.raises(EdgesmithError, match=r"--remote es-nokey: .*(Permission denied|publickey)"):
        run_remote(BenchSettings(artifacts=[str(gguf)], ppl=False), "es-nokey", ssh_config=str(device.config))
    assert time.time() - t0 < 30
    with pytest.raises(EdgesmithError, match="expected \\[user@\\]host"):
        run_remote(BenchSettings(artifacts=[str(gguf)], ppl=False), "-oProxyCommand=x")


@pytest.mark.parametrize("extra, flag", [
    (["--remote", "es-device", "--remote-wheels", "/nonexistent/wheels"], "--remote-wheels /nonexistent/wheels: not a directory"),
    (["--remote-wheels", "/tmp"], "--remote-wheels needs --remote"),
    (["--remote", "es-device", "--remote-dir", "a b"], "--remote-dir 'a b'"),
    (["--remote", "es-device", "--remote-python", "python3;rm"], "--remote-python 'python3;rm'"),
])
def test_bench_remote_bad_input_one_line_exit_2(device, artifacts, extra, flag):
    gguf, _ = artifacts
    p = subprocess.run([ES, "bench", str(gguf), "--no-ppl", "--ssh-config", str(device.config), *extra],
                       capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and flag in lines[0], p.stderr
