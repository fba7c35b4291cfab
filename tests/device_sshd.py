"""A real "device" on this machine for `edgesmith bench --remote`: an OpenSSH server on 127.0.0.1
(started on a free port, temporary host key), a separate unix user with its own home and its own
authorized key, and the wheels its venv needs. Used by tests/test_bench_remote.py and by
studies/remote_install.py. Needs root (useradd, sshd switching users).

Nothing here builds edgesmith's own wheel: that is the product's job (bench/remote.py). The
wheelhouse holds only the dependencies of edgesmith[device], at the versions installed here.
Every helper raises `Missing` with one line when a prerequisite is absent; callers decide whether
that skips (a developer machine) or fails (CI).
"""
from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from importlib.metadata import distribution
from pathlib import Path

USER = "es-device"


class Missing(RuntimeError):
    """A prerequisite of the local device is not there and could not be set up."""


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


def sshd_binary() -> str:
    """/usr/sbin/sshd, installed with apt-get when missing (CI machines start bare; we run as root)."""
    def find():
        return shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").is_file() else None)

    if not find() and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "openssh-server", "openssh-client"]):
            _run(cmd, env=env)
    if not find() or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        raise Missing("OpenSSH (sshd, ssh, ssh-keygen) not available and could not be installed (needs root and apt-get)")
    return find()


def device_user(name: str = USER) -> Path:
    """-> the home of `name`, a plain user created once (reused afterwards: idempotent)."""
    if os.geteuid() != 0:
        raise Missing("the local device needs root (useradd, and sshd switching to another user)")
    if _run(["id", "-u", name]).returncode != 0:
        # password '*': no password login, but not "locked" ('!'), which sshd without PAM refuses even for keys
        p = _run(["useradd", "--create-home", "--shell", "/bin/sh", "--password", "*", name])
        if p.returncode != 0 and _run(["id", "-u", name]).returncode != 0:  # (a parallel run may have made it)
            raise Missing(f"useradd {name} failed: {p.stderr.strip()}")
    home = Path(os.path.expanduser(f"~{name}"))
    if not home.is_dir():
        raise Missing(f"user {name} has no home directory {home}")
    return home


def as_user(name: str, command: str) -> subprocess.CompletedProcess:
    """`command` in a login-less shell as `name` (to check what that user can read and run)."""
    return _run(["su", "-s", "/bin/sh", name, "-c", command])


def _chown_tree(path: Path, name: str) -> None:
    shutil.chown(path, name, name)
    for p in path.rglob("*"):
        shutil.chown(p, name, name)


class LocalDevice:
    """sshd on 127.0.0.1 for `USER`; `Host es-device` (its key) and `Host es-nokey` (a key it refuses)."""

    def __init__(self, workdir: Path, user: str = USER):
        self.dir, self.user = Path(workdir), user
        self.home = device_user(user)
        binary = sshd_binary()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for name in ("host_key", "user_key", "other_key"):
            if not (self.dir / name).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)], check=True)
        # the user's own ~/.ssh/authorized_keys, owned by that user: this run's key only
        ssh = self.home / ".ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        (ssh / "authorized_keys").write_text((self.dir / "user_key.pub").read_text())
        os.chmod(ssh / "authorized_keys", 0o600)
        _chown_tree(ssh, user)
        self.port = _free_port()
        (self.dir / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir / 'host_key'}\nPidFile {self.dir / 'sshd.pid'}\n"
            "AuthorizedKeysFile .ssh/authorized_keys\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            f"KbdInteractiveAuthentication no\nUsePAM no\nAllowUsers {user}\nPermitRootLogin no\n"
            "Subsystem sftp internal-sftp\nLogLevel ERROR\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation dir
        self.log = open(self.dir / "sshd.log", "w")
        self.proc = subprocess.Popen([binary, "-D", "-e", "-f", str(self.dir / "sshd_config")], stderr=self.log)
        host_pub = (self.dir / "host_key.pub").read_text().split()
        (self.dir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        common = (f"  HostName 127.0.0.1\n  Port {self.port}\n  User {user}\n  IdentitiesOnly yes\n"
                  f"  UserKnownHostsFile {self.dir / 'known_hosts'}\n  StrictHostKeyChecking yes\n")
        self.config = self.dir / "ssh_config"
        self.config.write_text(f"Host es-device\n{common}  IdentityFile {self.dir / 'user_key'}\n"
                               f"Host es-nokey\n{common}  IdentityFile {self.dir / 'other_key'}\n")
        for _ in range(100):  # wait until it accepts connections
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self.proc.poll() is not None:
                raise Missing(f"sshd could not start: {(self.dir / 'sshd.log').read_text()[-300:]}")
            time.sleep(0.1)

    def ssh(self, command: str) -> subprocess.CompletedProcess:
        return _run(["ssh", "-F", str(self.config), "-o", "BatchMode=yes", "es-device", command])

    def python(self) -> str:
        """An interpreter the device user can run whose minor version is ours (the wheelhouse is built
        from the versions installed here). Ours first when that user can read it: it often lives
        under /root (pyenv), which other users cannot traverse; then the system's."""
        want = "%d.%d" % sys.version_info[:2]
        for cand in (sys._base_executable, f"python{want}", "python3"):
            p = self.ssh(f"{cand} -c 'import sys, venv, ensurepip; print(\"%d.%d\" % sys.version_info[:2])'")
            if p.returncode == 0 and p.stdout.strip() == want:
                return cand
        raise Missing(f"no Python {want} with venv/ensurepip that user {self.user} can run "
                      f"(tried {sys._base_executable}, python{want}, python3; Debian: apt-get install python3-venv)")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the dependencies' wheels


def device_pins() -> dict[str, str]:
    """{name: installed version} for the dependency closure of edgesmith[device], edgesmith excluded."""
    from packaging.requirements import Requirement

    pins, todo = {}, [("edgesmith", {"device"})]
    while todo:  # from the installed metadata
        name, extras = todo.pop()
        dist = distribution(name)
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in pins:
            continue
        pins[key] = dist.version
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((r.name, set(r.extras)))
    pins.pop("edgesmith")
    return pins


def wheelhouse(dest: Path) -> Path:
    """dest/ with every edgesmith[device] dependency as a wheel: llama-cpp-python is the wheel
    scripts/setup.sh built (cached), the rest come from pip (its cache, or the package index). Kept in
    edgesmith's cache by the set of versions, so later runs copy instead of downloading."""
    from edgesmith.fsutil import atomic_dir, cache_dir

    pins = device_pins()
    key = "-".join(f"{k}{v}" for k, v in sorted(pins.items()))
    slot = cache_dir() / "device-wheelhouse" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not slot.is_dir():
        llama = sorted((cache_dir() / "wheels").rglob(f"llama_cpp_python-{pins['llama-cpp-python']}-*.whl"))
        if not llama:
            raise Missing(f"no cached llama-cpp-python {pins['llama-cpp-python']} wheel under {cache_dir() / 'wheels'} "
                          "(run `make setup`)")
        rest = [f"{k}=={v}" for k, v in pins.items() if k != "llama-cpp-python"]
        with atomic_dir(slot) as tmp:
            shutil.copy2(llama[0], tmp)
            p = _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "-d", str(tmp),
                      *rest])
            if p.returncode != 0:
                raise Missing(f"could not gather the device wheels: {p.stderr.strip()[-300:]}")
    dest.mkdir(parents=True, exist_ok=True)
    for w in slot.glob("*.whl"):
        shutil.copy2(w, dest / w.name)
    return dest


def decoy_edgesmith_wheel(dest: Path, version: str) -> Path:
    """A wheel called edgesmith that is not ours (what a name squatter could publish): installing it
    would make `import edgesmith` set `edgesmith.DECOY`."""
    tag = f"edgesmith-{version}"
    path = dest / f"{tag}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("edgesmith/__init__.py", f"DECOY = True\n__version__ = {version!r}\n")
        z.writestr(f"{tag}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: edgesmith\nVersion: {version}\n"
                   "Provides-Extra: device\n")
        z.writestr(f"{tag}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{tag}.dist-info/RECORD", "")
    return path


class PackageIndex:
    """A PEP 503 package index over HTTP on 127.0.0.1 serving the wheels in `folder`, recording every
    path asked for and the bytes of wheels served: the device's "own index" in the tests."""

    def __init__(self, folder: Path):
        self.folder, self.requests, self.served = Path(folder), [], 0
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                index.requests.append(self.path)
                body, kind = index._page(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if kind == "wheel":
                    index.served += len(body)
                self.send_response(200)
                self.send_header("Content-Type", "text/html" if kind == "html" else "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _page(self, path: str):
        wheels = {w.name: w for w in self.folder.glob("*.whl")}
        if path.startswith("/files/") and path[7:] in wheels:
            return wheels[path[7:]].read_bytes(), "wheel"
        m = re.fullmatch(r"/simple/([^/]+)/?", path)
        if m:
            name = m.group(1)
            links = [w for w in wheels if re.sub(r"[-_.]+", "-", w.split("-")[0]).lower() == name]
            if links:
                html = "".join(f'<a href="/files/{w}">{w}</a><br>\n' for w in sorted(links))
                return f"<!DOCTYPE html><html><body>\n{html}</body></html>\n".encode(), "html"
        return None, None

    def asked_for(self, project: str) -> bool:
        return any(p.rstrip("/").endswith(f"/simple/{project}") for p in self.requests)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def pip_conf(home: Path, user: str, index_url: str | None) -> None:
    """Point (or, with None, stop pointing) the device user's pip at `index_url`: its own configuration."""
    conf = home / ".config" / "pip" / "pip.conf"
    if index_url is None:
        conf.unlink(missing_ok=True)
        return
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f"[global]\nindex-url = {index_url}\n")
    _chown_tree(home / ".config", user)


def wipe(home: Path, rel: str) -> None:
    """Remove ~user/rel (a remote dir of an earlier run) so the next install starts fresh."""
    target = (home / rel).resolve()
    if home.resolve() in target.parents:
        shutil.rmtree(target, ignore_errors=True)

