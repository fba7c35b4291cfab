"""`edgesmith bench ... --remote [user@]host[:port]`: the same harness on another machine over SSH.

Read top to bottom: ssh/scp command lines -> the wheel of the edgesmith that is running, built here
(and cached) -> a venv on the remote with that wheel and its `[device]` dependencies -> copy the
artifacts, the perplexity text and the task files -> run the harness there (`python -m
edgesmith.bench.remote SETTINGS OUT` in the remote venv) -> copy the results JSON back.

Only the user's own SSH setup is used: `~/.ssh/config`, keys and agent (or `--ssh-config FILE`),
always with `BatchMode=yes`, so a missing key fails at once instead of asking for a password.

What runs on the device is exactly the code that runs here. Nothing named edgesmith is published
on a package index, and a name on an index can belong to anyone, so no index is ever asked for
edgesmith: `pip wheel --no-deps` builds this installation's source tree into a wheel (cached under
`cache_dir()/remote-wheels`, keyed by version + a hash of the packaged source files), the wheel is
copied over and installed by path with `--no-index --no-deps`, and then only its `[device]`
dependencies (numpy, llama-cpp-python, onnxruntime, tokenizers, ...; no torch, no transformers) are
installed: from the device's own package index, or with `--remote-wheels DIR` from wheels copied over
(`pip --no-index --find-links`), for a device without internet. A venv that already holds the same
build (same source hash) is reused as is.

Nothing is installed outside `--remote-dir` (default `~/.cache/edgesmith-remote`). The numbers in the
JSON are the remote's: its machine record, its threads; artifact paths are mapped back to the local
ones (`remote_artifact` keeps the remote's). `remote.install` records what the install cost: bytes
copied and downloaded, seconds, the venv's size and how long `import edgesmith.bench.harness` takes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
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
KEEP_WHEELS = 4  # built edgesmith wheels kept in the cache (one per source state)
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


# ---------------------------------------------------------------- our own wheel, built here


def source_root() -> Path:
    """The source tree of the running edgesmith (an editable or in-tree install: `make setup`)."""
    import edgesmith

    root = Path(edgesmith.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or _toml(pyproject).get("project", {}).get("name") != "edgesmith":
        raise EdgesmithError(f"--remote: the running edgesmith ({Path(edgesmith.__file__).parent}) is not installed from "
                             "its source tree, so its wheel cannot be built; install it with `pip install -e .`")
    return root


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the copy pip vendors
        from pip._vendor import tomli as tomllib
    return tomllib.loads(path.read_text())


def packaged_files(root: Path) -> list[str]:
    """Paths (relative to `root`) of every file the wheel is made of, read from pyproject.toml the way
    setuptools reads it: each listed package's own *.py plus its package-data patterns (not recursive:
    subpackages are listed themselves, and stray folders such as bench/results never enter the hash)."""
    cfg = _toml(root / "pyproject.toml")
    st = cfg["tool"]["setuptools"]
    dirs, data = st.get("package-dir", {}), st.get("package-data", {})
    files = {"pyproject.toml"}
    readme = cfg["project"].get("readme")
    if isinstance(readme, str):
        files.add(readme)
    for extra in ("setup.py", "setup.cfg", "MANIFEST.in"):
        if (root / extra).is_file():
            files.add(extra)
    files |= {p.name for p in root.glob("LICEN[CS]E*")} | {p.name for p in root.glob("NOTICE*")}
    for pkg in st["packages"]:
        d = root / dirs.get(pkg, pkg.replace(".", "/"))
        for pattern in ["*.py", *data.get(pkg, [])]:
            files |= {str(f.relative_to(root)) for f in d.glob(pattern) if f.is_file()}
    return sorted(files)


def local_wheel(log=print) -> tuple[Path, str]:
    """-> (the wheel of the running edgesmith, the sha256 of its source files), built once per content.

    The packaged files are staged into a temporary folder first: the hash covers exactly what goes into
    the wheel, and the build never writes build/ or egg-info into the working tree."""
    from edgesmith import __version__
    from edgesmith.fsutil import atomic_dir, cache_dir

    root = source_root()
    with _tmpdir() as tmp:
        src, h = tmp / "src", hashlib.sha256()
        for rel in packaged_files(root):
            data = (root / rel).read_bytes()
            h.update(rel.encode() + b"\0" + data + b"\0")
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        digest = h.hexdigest()
        slot = cache_dir() / "remote-wheels" / f"edgesmith-{__version__}-{digest[:16]}"
        found = sorted(slot.glob("edgesmith-*.whl"))
        if found:
            return found[0], digest
        log(f"building the edgesmith {__version__} wheel from {root} (source {digest[:12]})")
        args = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check"]
        if _can_build_offline():
            args.append("--no-build-isolation")  # no index needed for setuptools: works on an offline machine
        with atomic_dir(slot) as out:
            p = subprocess.run([*args, "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
            if p.returncode != 0 or not list(out.glob("edgesmith-*.whl")):
                err = (p.stderr or p.stdout or "").strip().splitlines()
                raise EdgesmithError(f"--remote: building the edgesmith wheel from {root} failed: {err[-1] if err else '?'}")
        # every edit of the source makes a new slot: keep the newest few (about 200 kB each)
        for old in sorted(slot.parent.iterdir(), key=lambda p: p.stat().st_mtime)[:-KEEP_WHEELS]:
            shutil.rmtree(old, ignore_errors=True)
        return sorted(slot.glob("edgesmith-*.whl"))[0], digest


def _can_build_offline() -> bool:
    """setuptools/wheel new enough for pyproject.toml's [build-system] are importable here."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("setuptools").split(".")[0]) >= 68 and bool(version("wheel"))
    except (PackageNotFoundError, ValueError):
        return False


# ---------------------------------------------------------------- the remote venv

# Run on the remote after our wheel is in: edgesmith[device]'s requirements, one per line, with their
# environment markers evaluated there (the device's Python and platform, not ours). pip's vendored
# `packaging` is in every venv; the `edgesmith` name itself never appears in this list.
DEVICE_REQUIREMENTS = """\
import importlib.metadata as md
from pip._vendor.packaging.requirements import Requirement
for line in md.requires("edgesmith") or []:
    r = Requirement(line)
    if r.marker is None or r.marker.evaluate({"extra": "device"}):
        r.marker = None
        print(r)
"""

# Run on the remote after every install check: the venv's size on disk and the wall time of a fresh
# `python -c "import edgesmith.bench.harness"` (interpreter start included; median of 3).
MEASURE = """\
import json, os, subprocess, sys, time
ts = []
for _ in range(3):
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import edgesmith.bench.harness"], check=True)
    ts.append(time.perf_counter() - t)
size = 0
for d, _, fs in os.walk(sys.prefix):
    size += sum(os.lstat(os.path.join(d, f)).st_size for f in fs)
print(json.dumps({"venv_bytes": size, "import_harness_s": round(sorted(ts)[1], 3),
                  "python_version": "%d.%d.%d" % sys.version_info[:3]}))
"""


def check_wheels_dir(wheels: str | None) -> Path | None:
    """--remote-wheels: a folder of dependency wheels (an edgesmith wheel there is never used)."""
    if wheels is None:
        return None
    d = Path(wheels).expanduser()
    if not d.is_dir():
        raise EdgesmithError(f"--remote-wheels {wheels}: not a directory")
    if not [w for w in d.glob("*.whl") if not w.name.startswith("edgesmith-")]:
        raise EdgesmithError(f"--remote-wheels {wheels}: no dependency .whl files there")
    return d


def ensure_env(r: Remote, base: str, python: str, wheels: Path | None, log=print,
               built: tuple[Path, str] | None = None) -> dict:
    """Make `{base}/venv` hold this edgesmith (built here, or `built` = local_wheel()'s answer) and its
    [device] dependencies. -> the `remote.install` record; its "python" is the remote venv's interpreter."""
    from edgesmith import __version__

    wheel, digest = built or local_wheel(log)
    vpy, marker = f"{base}/venv/bin/python", f"{base}/venv/edgesmith-source.sha256"
    install = {"python": vpy, "wheel": wheel.name, "source_sha256": digest, "reused": True,
               "dependencies_from": "--remote-wheels" if wheels else "the device's package index",
               "copied_bytes": 0, "index_download_bytes": 0, "install_s": 0.0}
    # the same build already there (the marker is written only after a complete install) and importable
    probe = r.ssh(f"cat {marker} && {vpy} -c {shlex.quote(PROBE)}", check=False)
    if probe.returncode != 0 or probe.stdout.split() != [digest, __version__]:
        install.update(_install(r, base, python, wheel, digest, wheels, log), reused=False)
    install.update(json.loads(r.ssh(f"{vpy} -c {shlex.quote(MEASURE)}").stdout))
    return install


def _install(r: Remote, base: str, python: str, wheel: Path, digest: str, wheels: Path | None, log) -> dict:
    vpy, marker = f"{base}/venv/bin/python", f"{base}/venv/edgesmith-source.sha256"
    t0 = time.perf_counter()
    log(f"remote {r.target}: installing edgesmith[device] ({wheel.name}, source {digest[:12]}) into {base}/venv")
    p = r.ssh(f"mkdir -p {base} && rm -f {marker} && {{ test -x {vpy} || {shlex.quote(python)} -m venv {base}/venv; }}",
              check=False)
    if p.returncode != 0:
        err = (p.stderr or "").strip().splitlines()
        raise EdgesmithError(f"--remote-python {python}: cannot create a venv on {r.target}: {err[-1] if err else p.returncode}")
    r.ssh(f"rm -rf {base}/pkg {base}/wheels && mkdir -p {base}/pkg")  # scp -r DIR DEST copies into DEST when it exists
    r.put(wheel, f"{base}/pkg/{wheel.name}")
    copied = wheel.stat().st_size
    source = ""  # the device's own index (its pip.conf / PIP_INDEX_URL)
    if wheels is not None:
        with _tmpdir() as tmp:  # only the dependencies travel: an edgesmith wheel in DIR is never installed
            for w in wheels.glob("*.whl"):
                if not w.name.startswith("edgesmith-"):
                    _link_or_copy(w, tmp / w.name)
                    copied += w.stat().st_size
            r.put(tmp, f"{base}/wheels")
        source = f"--no-index --find-links {base}/wheels"
    pip = f"{vpy} -m pip install --disable-pip-version-check --progress-bar off"
    p = r.ssh(" && ".join([
        # ours, by path, with no index at all: pip cannot pick up anything else called edgesmith
        f"{pip} -q --no-index --no-deps --force-reinstall {base}/pkg/{wheel.name}",
        f"{vpy} -c {shlex.quote(DEVICE_REQUIREMENTS)} > {base}/pkg/requirements.txt",
        # then its [device] dependencies, by name: not one of them is edgesmith
        f"{pip} {source} -r {base}/pkg/requirements.txt",
    ]), check=False)
    if p.returncode != 0:
        err = [x for x in (p.stderr or "").strip().splitlines() if x.strip()]
        raise EdgesmithError(f"--remote {r.target}: installing edgesmith[device] failed: {err[-1] if err else p.returncode}")
    probe = r.ssh(f"{vpy} -c {shlex.quote(PROBE)}", check=False)
    if probe.returncode != 0:
        raise EdgesmithError(f"--remote {r.target}: edgesmith[device] does not import after install: "
                             f"{probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else '?'}")
    r.ssh(f"echo {digest} > {marker}")
    return {"copied_bytes": copied, "index_download_bytes": _downloaded(p.stdout),
            "install_s": round(time.perf_counter() - t0, 2)}


def _downloaded(pip_output: str) -> int:
    """Bytes pip fetched from an index, from its `Downloading NAME (12.3 MB)` lines (cache hits say `Using cached`)."""
    units = {"B": 1, "bytes": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    found = re.findall(r"Downloading \S+ \(([\d.]+) (bytes|B|kB|KB|MB|GB)\)", pip_output)
    return int(sum(float(n) * units[u] for n, u in found))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


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
    wheel_dir = check_wheels_dir(wheels)  # bad input fails before anything is copied
    # both end up in remote shell command lines: plain path characters only
    if not re.fullmatch(r"[\w./+~-]+", remote_dir or ""):
        raise EdgesmithError(f"--remote-dir {remote_dir!r}: expected a path without spaces or shell characters")
    if not re.fullmatch(r"[\w./+-]+", python or ""):
        raise EdgesmithError(f"--remote-python {python!r}: expected one interpreter name or path")
    home = r.ssh("echo $HOME").stdout.strip()
    base = remote_dir.replace("~", home, 1) if remote_dir.startswith("~") else remote_dir
    install = ensure_env(r, base, python, wheel_dir, log=log)
    vpy = install["python"]

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
    doc["remote"] = {"target": target, "run_dir": run_dir, "python": vpy, "kept": keep, "install": install}
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
