"""What installing edgesmith[device] on a `--remote` device costs.

    .venv/bin/python studies/remote_install.py                       # the local device (root: sshd + user es-device)
    .venv/bin/python studies/remote_install.py --remote pi@raspberrypi [--ssh-config F] [--remote-wheels DIR]

For each source of the dependencies, a fresh venv on the device goes through the product's own
install (`bench.remote.ensure_env`: edgesmith's wheel built here and copied, its [device]
dependencies from wheels copied over or from the device's own package index), then a second call
that finds the same build there. Recorded from `remote.install`: bytes copied over SSH, bytes pip
downloaded from an index, install seconds, the venv's size on disk, and the wall time of
`python -c "import edgesmith.bench.harness"` on the device (median of 3).

The local device is tests/device_sshd.py's: sshd on 127.0.0.1, the unix user es-device, the system
Python; "wheels" copies the test wheelhouse, "index" serves the same wheels from a local HTTP index
set in the user's pip.conf (its pip cache emptied first, so every byte is downloaded). Both are on one
machine: the seconds are CPU (unpacking, byte-compiling), not network.

Writes studies/results/remote-install.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "studies" / "results" / "remote-install.json"


def measure(target: str, ssh_config: str | None, remote_dir: str, python: str, wheels: Path | None,
            built: tuple[Path, str]) -> dict:
    """A fresh venv at remote_dir, installed by the product; then the check that reuses it."""
    from edgesmith.bench.remote import Remote, ensure_env

    r = Remote(target, ssh_config)
    home = r.ssh("echo $HOME").stdout.strip()
    base = remote_dir.replace("~", home, 1)
    r.ssh(f"rm -rf {base}")
    first = ensure_env(r, base, python, wheels, log=lambda m: print(m, file=sys.stderr), built=built)
    t = time.perf_counter()
    again = ensure_env(r, base, python, wheels, log=lambda m: None, built=built)
    first["reuse_check_s"] = round(time.perf_counter() - t, 2)  # a later bench: probe + measure, nothing copied
    assert again["reused"], "the second call should find the same build"
    r.ssh(f"rm -rf {base}")
    return first


def local_device(work: Path, built: tuple[Path, str]) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from device_sshd import USER, LocalDevice, PackageIndex, pip_conf, wheelhouse, wipe

    dev = LocalDevice(work / "sshd")
    try:
        python = dev.python()
        deps = wheelhouse(work / "wheels")
        rows = {"wheels": measure("es-device", str(dev.config), "~/.cache/edgesmith-remote-study", python, deps, built)}
        index = PackageIndex(deps)
        pip_conf(dev.home, USER, index.url)
        wipe(dev.home, ".cache/pip")
        try:
            rows["index"] = measure("es-device", str(dev.config), "~/.cache/edgesmith-remote-study", python, None, built)
            rows["index"]["index_served_bytes"] = index.served
        finally:
            pip_conf(dev.home, USER, None)
            index.stop()
        return {"device": f"local: sshd on 127.0.0.1, user {USER}, {python}", "sources": rows}
    finally:
        dev.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--remote", help="[user@]host[:port] (default: the local device; needs root)")
    ap.add_argument("--ssh-config")
    ap.add_argument("--remote-python", default="python3")
    ap.add_argument("--remote-wheels", help="also measure the offline install from these dependency wheels")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    from edgesmith.bench.remote import local_wheel

    t = time.perf_counter()
    wheel, digest = built = local_wheel()  # one build for every measurement (the tree may change meanwhile)
    doc = {"study": "remote-install", "date": time.strftime("%Y-%m-%d %H:%M"),
           "local": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                     "load_average_at_start": round(os.getloadavg()[0], 2)},
           "edgesmith_wheel": {"name": wheel.name, "bytes": wheel.stat().st_size, "source_sha256": digest,
                               "build_or_cache_s": round(time.perf_counter() - t, 2)}}
    if a.remote:
        rows = {"index": measure(a.remote, a.ssh_config, "~/.cache/edgesmith-remote-study", a.remote_python, None, built)}
        if a.remote_wheels:
            rows["wheels"] = measure(a.remote, a.ssh_config, "~/.cache/edgesmith-remote-study", a.remote_python,
                                     Path(a.remote_wheels), built)
        doc |= {"device": a.remote, "sources": rows}
    else:
        with tempfile.TemporaryDirectory(prefix="remote-install-") as tmp:
            doc |= local_device(Path(tmp), built)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    for name, row in doc["sources"].items():
        print(f"{name:7s} copied {row['copied_bytes'] / 1e6:6.1f} MB  downloaded {row['index_download_bytes'] / 1e6:6.1f} MB  "
              f"install {row['install_s']:5.1f} s  venv {row['venv_bytes'] / 1e6:6.1f} MB  "
              f"import harness {row['import_harness_s']:.2f} s  re-check {row['reuse_check_s']:.1f} s")
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
