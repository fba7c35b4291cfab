"""`edgesmith bench --remote`: a real OpenSSH server on 127.0.0.1 (started here on a free port, with a
temporary host key and a temporary authorized key), a fresh venv on the "remote" that gets
edgesmith[device] from a local wheelhouse (pip --no-index --find-links: this repo's wheel, the
llama-cpp-python wheel scripts/setup.sh built, and the installed versions of the other dependencies),
the same harness run there, the JSON brought back and compared with a local run on the same file."""
from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from importlib.metadata import distribution
from pathlib import Path

import pytest

from edgesmith.errors import EdgesmithError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a fresh venv + pip install of ~30 wheels: about 1-2 minutes on 2 cores


def _sshd() -> str | None:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").is_file() else None)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    # CI machines start bare: install the server the same way a developer would
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "openssh-server"]):
        subprocess.run(cmd, capture_output=True, timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").is_file() else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """-> (ssh config file, host alias, dir); an sshd that accepts exactly one temporary key."""
    binary = _sshd()
    if not binary:
        pytest.skip("sshd not available and could not be installed (needs root and apt-get: openssh-server)")
    if not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.skip("OpenSSH client (ssh, ssh-keygen) not installed")
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    for name in ("host_key", "user_key", "other_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\n")
    Path("/run/sshd").mkdir(exist_ok=True) if os.geteuid() == 0 else None  # privilege separation dir
    proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "w"))
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    user = getpass.getuser()
    common = (f"  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentitiesOnly yes\n"
              f"  UserKnownHostsFile {d / 'known_hosts'}\n  StrictHostKeyChecking yes\n")
    (d / "ssh_config").write_text(f"Host es-device\n{common}  IdentityFile {d / 'user_key'}\n"
                                  f"Host es-nokey\n{common}  IdentityFile {d / 'other_key'}\n")
    for _ in range(100):  # wait until it accepts connections
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            pytest.skip(f"sshd could not start: {(d / 'sshd.log').read_text()[-300:]}")
        time.sleep(0.1)
    yield d / "ssh_config", d
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """edgesmith (built now from a copy of this tree) + every edgesmith[device] dependency at the
    version installed here: pip's own cache serves them, llama-cpp-python is the locally built wheel."""
    from packaging.requirements import Requirement

    from edgesmith.fsutil import cache_dir

    d = tmp_path_factory.mktemp("wheelhouse")
    src = tmp_path_factory.mktemp("src") / "edgesmith"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "out", "*.egg-info",
                                                             "__pycache__", "*.gguf", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(d), str(src)],
                   check=True, capture_output=True)
    pins, todo = {}, [("edgesmith", {"device"})]
    while todo:  # the dependency closure of edgesmith[device], from installed metadata
        name, extras = todo.pop()
        dist = distribution(name)
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in pins:
            continue
        pins[key] = dist.version
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((r.name, set(r.extras)))
    llama = sorted((cache_dir() / "wheels").rglob(f"llama_cpp_python-{pins['llama-cpp-python']}-*.whl"))
    if not llama:
        pytest.skip("no cached llama-cpp-python wheel (run `make setup`)")
    shutil.copy2(llama[0], d)
    rest = [f"{k}=={v}" for k, v in pins.items() if k not in ("edgesmith", "llama-cpp-python")]
    p = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "-d", str(d),
                        *rest], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        pytest.skip(f"could not gather the device wheels: {p.stderr.strip()[-300:]}")
    return d


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer_dir):
    from conftest import make_tiny_llama
    from edgesmith.export.gguf import convert

    d = tmp_path_factory.mktemp("remote-art")
    hf = make_tiny_llama(d / "hf", tokenizer_dir, hidden=64, intermediate=128, layers=2)
    return convert(hf, d / "tiny-F32.gguf", "F32")


def test_bench_remote_over_real_sshd(sshd, wheelhouse, tiny_gguf, shared_data, tmp_path):
    cfg, d = sshd
    text = tmp_path / "wiki.txt"
    text.write_text((shared_data / "lm" / "wikitext-2-raw" / "wiki.test.raw").read_text()[:2000])
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"query": "Question: What do plants need to make food?\\nAnswer:", "choices": ["sunlight", "sand"], "gold": 0}\n'
                    '{"query": "Question: What is frozen water?\\nAnswer:", "choices": ["steam", "ice"], "gold": 1}\n')
    remote_dir = d / "remote-home"  # a fresh venv: the install path runs
    out = tmp_path / "remote.json"
    cmd = [str(REPO / ".venv/bin/edgesmith"), "bench", str(tiny_gguf), "--ppl-text", str(text), "--ctx", "64",
           "--max-chunks", "2", "--tasks", f"copa,{mine}", "--limit", "4", "--data-dir", str(shared_data), "--latency",
           "--repeat", "1", "--threads", "1", "--json", str(out), "--remote", "es-device", "--ssh-config", str(cfg),
           "--remote-dir", str(remote_dir), "--remote-python", sys._base_executable, "--remote-wheels", str(wheelhouse)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "installing edgesmith[device]" in p.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["remote"]["target"] == "es-device"
    r = doc["results"][0]
    assert r["artifact"] == str(tiny_gguf) and r["remote_artifact"].startswith(str(remote_dir))
    assert set(r["tasks"]) == {"copa", "mine"} and r["tasks"]["copa"]["n"] == 4 and r["tasks"]["mine"]["n"] == 2
    assert r["latency"]["threads"] == 1 and r["latency"]["decode_tok_s"] > 0
    # the remote venv is the device install: no torch, no transformers
    libs = doc["machine"]["libraries"]
    assert "torch" not in libs and "transformers" not in libs and libs["llama_cpp_python"] == "0.3.36"
    assert doc["settings"]["data_dir"] != str(shared_data)  # it ran on the copies
    assert not list((remote_dir / "runs").iterdir())  # copied artifacts removed afterwards; the venv stays

    # the same harness on the same file here gives the same numbers
    from edgesmith.bench import harness as H
    from edgesmith.native import run_isolated

    s = H.resolve_settings(H.BenchSettings(ppl_text=str(text), ctx=64, max_chunks=2, tasks=["copa", str(mine)],
                                           data_dir=str(shared_data), limit=4, threads=1))
    local = run_isolated(H.run_artifact, str(tiny_gguf), asdict(s), what="local")
    assert r["perplexity"]["value"] == pytest.approx(local["perplexity"]["value"], rel=1e-6)
    assert r["tasks"]["copa"]["acc"] == local["tasks"]["copa"]["acc"] and r["tasks"]["mine"] == local["tasks"]["mine"]

    # second time: the venv is found, nothing is installed
    from edgesmith.bench.remote import Remote, ensure_env

    logs = []
    ensure_env(Remote("es-device", str(cfg)), str(remote_dir), sys._base_executable, None, log=logs.append)
    assert logs == []


def test_bench_remote_never_asks_for_a_password(sshd, tiny_gguf, tmp_path):
    """A key the server does not accept: BatchMode fails at once with a one-line error, no prompt."""
    from edgesmith.bench.harness import BenchSettings
    from edgesmith.bench.remote import run_remote

    cfg, _ = sshd
    t0 = time.time()
    with pytest.raises(EdgesmithError, match=r"--remote es-nokey: .*(Permission denied|publickey)"):
        run_remote(BenchSettings(artifacts=[str(tiny_gguf)], ppl=False), "es-nokey", ssh_config=str(cfg))
    assert time.time() - t0 < 30
    with pytest.raises(EdgesmithError, match="expected \\[user@\\]host"):
        run_remote(BenchSettings(artifacts=[str(tiny_gguf)], ppl=False), "-oProxyCommand=x")
