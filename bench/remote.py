"""`edgesmith bench ... --remote [user@]host[:port]`: the same harness on another machine over SSH.

Read top to bottom: ssh/scp command lines -> make sure a venv with `edgesmith[device]` exists on the
remote -> copy the artifacts, the perplexity text and the task files -> run the harness there
(`python -m edgesmith.bench.remote SETTINGS OUT` in the remote venv) -> copy the results JSON back.

Only the user's own SSH setup is used: `~/.ssh/config`, keys and agent (or `--ssh-config FILE`),
always with `BatchMode=yes`, so a missing key fails at once instead of asking for a password.
Nothing is installed outside `--remote-dir` (default `~/.cache/edgesmith-remote`): a venv there gets
`edgesmith[device]` (numpy, llama-cpp-python, onnxruntime, tokenizers; no torch) from the remote's
package index, or with `--remote-wheels DIR` from wheels copied over (`pip --no-index --find-links`),
for a device without internet. The numbers in the JSON are the remote's: its machine record, its
threads; artifact paths are mapped back to the local ones (`remote_artifact` keeps the remote's).
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from edgesmith.errors import EdgesmithError

DEFAULT_REMOTE_DIR = "~/.cache/edgesmith-remote"
# what the remote venv must import to run the harness on GGUF/ONNX artifacts
PROBE = "import edgesmith, edgesmith.bench.harness, llama_cpp, onnxruntime, tokenizers; print(edgesmith.__version__)"


class Remote:
    """ssh/scp to one host with the user's config; every call non-interactive."""

    def __init__(self, target: str, ssh_config: str | None = None, timeout: int = 3600):
        if not target or any(c.isspace() for c in target) or target.startswith("-"):
            raise EdgesmithError(f"--remote {target!r}: expected [user@]host[:port]")
        host, _, port = target.partition(":")
        if port and not port.isdigit():
            raise EdgesmithError(f"--remote {target!r}: port {port!r} is not a number")
        self.target, self.host, self.port, self.timeout = target, host, port, timeout
        # BatchMode: keys/agent only, never a password prompt; ConnectTimeout: fail fast on a dead host
        self.opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
        if ssh_config:
            if not Path(ssh_config).is_file():
                raise EdgesmithError(f"--ssh-config {ssh_config}: no such file")
            self.opts = ["-F", str(ssh_config)] + self.opts
        for tool in ("ssh", "scp"):
            if not shutil.which(tool):
                raise EdgesmithError(f"--remote needs the OpenSSH client ({tool} not found on PATH)")

    def ssh(self, command: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
        args = ["ssh", *self.opts, *(["-p", self.port] if self.port else []), self.host, command]
        p = subprocess.run(args, capture_output=capture, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            err = (p.stderr or "").strip().splitlines()
            raise EdgesmithError(f"--remote {self.target}: `{command[:80]}` failed ({p.returncode}): "
                                 f"{err[-1] if err else 'no output'}")
        return p

    def _scp(self, src: list[str], dst: str) -> None:
        args = ["scp", "-q", "-r", "-p", *self.opts, *(["-P", self.port] if self.port else []), *src, dst]
        p = subprocess.run(args, capture_output=True, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL)
        if p.returncode != 0 and "Connection closed" in (p.stderr or ""):
            # no SFTP server there (small devices, dropbear): the legacy scp protocol
            args.insert(1, "-O")
            p = subprocess.run(args, capture_output=True, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise EdgesmithError(f"--remote {self.target}: copy failed: {(p.stderr or '').strip()[-300:]}")

    def put(self, local: Path, remote_path: str) -> None:
        """Copy a file or directory (rsync when both ends have it: resumable and incremental)."""
        if shutil.which("rsync") and self.ssh("command -v rsync", check=False).returncode == 0:
            rsh = " ".join(shlex.quote(x) for x in ["ssh", *self.opts, *(["-p", self.port] if self.port else [])])
            src = str(local) + ("/" if local.is_dir() else "")
            p = subprocess.run(["rsync", "-a", "-e", rsh, src, f"{self.host}:{remote_path}"], capture_output=True,
                               text=True, timeout=self.timeout, stdin=subprocess.DEVNULL)
            if p.returncode != 0:
                raise EdgesmithError(f"--remote {self.target}: rsync failed: {p.stderr.strip()[-300:]}")
            return
        self._scp([str(local)], f"{self.host}:{remote_path}")

    def get(self, remote_path: str, local: Path) -> None:
        self._scp([f"{self.host}:{remote_path}"], str(local))


# ---------------------------------------------------------------- the remote venv


def ensure_env(r: Remote, base: str, python: str, wheels: Path | None, log=print) -> str:
    """-> the remote venv's python, with edgesmith[device] importable (installed if missing)."""
    from edgesmith import __version__

    vpy = f"{base}/venv/bin/python"
    probe = r.ssh(f"{vpy} -c {shlex.quote(PROBE)}", check=False)
    if probe.returncode == 0 and probe.stdout.strip() == __version__:
        return vpy
    log(f"remote {r.target}: installing edgesmith[device] {__version__} into {base}/venv")
    r.ssh(f"mkdir -p {base} && {{ test -x {vpy} || {shlex.quote(python)} -m venv {base}/venv; }}")
    spec = shlex.quote(f"edgesmith[device]=={__version__}")
    if wheels is not None:
        if not wheels.is_dir() or not any(wheels.glob("*.whl")):
            raise EdgesmithError(f"--remote-wheels {wheels}: no .whl files there")
        r.ssh(f"rm -rf {base}/wheels")  # scp -r DIR DEST copies into DEST when it exists
        r.put(wheels, f"{base}/wheels")
        pip = f"{vpy} -m pip install -q --disable-pip-version-check --no-index --find-links {base}/wheels {spec}"
    else:
        pip = f"{vpy} -m pip install -q --disable-pip-version-check {spec}"
    r.ssh(pip)
    probe = r.ssh(f"{vpy} -c {shlex.quote(PROBE)}", check=False)
    if probe.returncode != 0:
        raise EdgesmithError(f"--remote {r.target}: edgesmith[device] does not import after install: "
                             f"{probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else '?'}")
    return vpy


# ---------------------------------------------------------------- copy inputs, run, fetch


def task_files(task: str, data_dir: str | None) -> list[tuple[Path, str]]:
    """(local file, path relative to the remote run dir) for one task plug-in."""
    from edgesmith.bench.tasks import get

    if task.endswith(".jsonl"):
        return [(Path(task), f"tasks/{Path(task).name}")]
    return [(Path(data_dir) / rel, f"data/{rel}") for rel in getattr(get(task), "FILES", [])]


def run_remote(s, target: str, ssh_config: str | None = None, remote_dir: str = DEFAULT_REMOTE_DIR,
               python: str = "python3", wheels: str | None = None, keep: bool = False, log=print) -> dict:
    """Run `harness.run(s)` on `target` and return its results document (schema 1)."""
    from edgesmith.bench.harness import expand_artifacts, resolve_settings

    threads_given = s.threads != 0  # else: all CPUs of the remote, not of this machine
    s = resolve_settings(s)
    r = Remote(target, ssh_config)
    home = r.ssh("echo $HOME").stdout.strip()
    base = remote_dir.replace("~", home, 1) if remote_dir.startswith("~") else remote_dir
    vpy = ensure_env(r, base, python, Path(wheels) if wheels else None, log=log)

    run_dir = f"{base}/runs/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    mapping: dict[str, str] = {}  # remote artifact path -> local
    remote = asdict(s)
    arts = expand_artifacts(s.artifacts)
    r.ssh(f"mkdir -p {run_dir}/artifacts {run_dir}/data {run_dir}/tasks")
    try:
        remote["artifacts"] = []
        for i, a in enumerate(arts):
            dst = f"{run_dir}/artifacts/{i}-{a.name}"
            log(f"remote {r.target}: copying {a} ({_mb(a):.0f} MiB)")
            r.put(a, dst)
            remote["artifacts"].append(dst)
            mapping[dst] = str(a)
        if s.reference:
            ref = expand_artifacts([s.reference])[0]
            dst = f"{run_dir}/artifacts/reference-{ref.name}"
            r.put(ref, dst)
            remote["reference"] = dst
            mapping[dst] = str(ref)
        if s.ppl_text:
            remote["ppl_text"] = f"{run_dir}/data/{Path(s.ppl_text).name}"
            r.put(Path(s.ppl_text), remote["ppl_text"])
        tasks = []
        for t in s.tasks:
            for local, rel in task_files(t, s.data_dir):
                if not local.is_file():
                    raise EdgesmithError(f"{local}: task file for {t!r} not found")
                r.ssh(f"mkdir -p {shlex.quote(str(Path(run_dir, rel).parent))}")
                r.put(local, f"{run_dir}/{rel}")
            tasks.append(f"{run_dir}/tasks/{Path(t).name}" if t.endswith(".jsonl") else t)
        remote["tasks"] = tasks
        remote["data_dir"] = f"{run_dir}/data"
        # threads: the remote's own CPU count unless the user chose (0 = all usable there)
        remote["threads"] = s.threads if threads_given else 0
        with _tmpdir() as tmp:
            (tmp / "settings.json").write_text(json.dumps(remote))
            r.put(tmp / "settings.json", f"{run_dir}/settings.json")
            log(f"remote {r.target}: running the harness on {len(arts)} artifact(s)")
            p = r.ssh(f"cd {run_dir} && {vpy} -m edgesmith.bench.remote {run_dir}/settings.json {run_dir}/results.json",
                      check=False)
            if p.returncode != 0:
                tail = (p.stderr or "").strip().splitlines()[-3:]
                raise EdgesmithError(f"--remote {r.target}: the harness failed there ({p.returncode}): {' | '.join(tail)}")
            r.get(f"{run_dir}/results.json", tmp / "results.json")
            doc = json.loads((tmp / "results.json").read_text())
    finally:
        if not keep:
            r.ssh(f"rm -rf {run_dir}", check=False)
    for res in doc["results"]:
        res["remote_artifact"] = res["artifact"]
        res["artifact"] = mapping.get(res["artifact"], res["artifact"])
        if (res.get("agreement") or {}).get("reference") in mapping:
            res["agreement"]["reference"] = mapping[res["agreement"]["reference"]]
    doc["remote"] = {"target": target, "run_dir": run_dir, "python": vpy, "kept": keep}
    doc["settings"]["local_artifacts"] = [str(a) for a in arts]
    return doc


def _mb(p: Path) -> float:
    from edgesmith.fsutil import dir_size

    return (dir_size(p) if p.is_dir() else p.stat().st_size) / 2**20


class _tmpdir:
    def __enter__(self) -> Path:
        import tempfile

        self.t = tempfile.TemporaryDirectory(prefix="edgesmith-remote-")
        return Path(self.t.name)

    def __exit__(self, *exc):
        self.t.cleanup()


def _main(argv: list[str]) -> int:
    """On the remote: SETTINGS.json -> RESULTS.json through the same `harness.run`."""
    from edgesmith.bench.harness import BenchSettings, run
    from edgesmith.fsutil import write_json

    settings, out = argv
    doc = run(BenchSettings(**json.loads(Path(settings).read_text())))
    write_json(out, doc)
    for res in doc["results"]:
        print(res.get("summary", res["artifact"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_main(sys.argv[1:]))
    except EdgesmithError as e:
        print(f"edgesmith bench (remote): error: {e}", file=sys.stderr)
        sys.exit(2)
