"""Packaging: a plain wheel installs everything under the single `edgesmith` namespace, every
subpackage imports from it in a fresh virtual environment, and subpackages import without torch
(what a device-only install has)."""
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["edgesmith", "edgesmith.compress", "edgesmith.distill", "edgesmith.finetune", "edgesmith.export",
               "edgesmith.bench", "edgesmith.recipes"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    import shutil

    d = tmp_path_factory.mktemp("wheel")
    # build from a copy: an in-tree build/ directory could leak stale files into later wheels
    src = d / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "out", "*.egg-info", "__pycache__", "*.gguf"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(d), str(src)],
                   check=True, capture_output=True, timeout=600)
    (whl,) = d.glob("edgesmith-*.whl")
    return whl


def test_wheel_has_only_the_edgesmith_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"edgesmith"}
    for sub in ("compress", "distill", "finetune", "export", "bench"):
        assert f"edgesmith/{sub}/__init__.py" in names
    assert any(n.startswith("edgesmith/recipes/") and n.endswith(".yaml") for n in names) or not list((REPO / "recipes").glob("*.yaml"))


def test_fresh_venv_imports_every_subpackage(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # install the wheel itself (no pip in the fresh venv: unpack as pip would) ...
    zipfile.ZipFile(wheel).extractall(site)
    # ... and let it see the already-installed dependencies, but NOT the editable edgesmith
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import importlib, edgesmith; "
            f"mods = {SUBPACKAGES!r}; [importlib.import_module(m) for m in mods]; "
            "import edgesmith.cli; edgesmith.cli.build_parser(); print(edgesmith.__file__)")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site)), out.stdout


def test_subpackages_import_without_torch():
    """A device install (no torch, no transformers) must still import every module the CLI registers."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "import importlib; import edgesmith.cli as c; "
            f"[importlib.import_module(m) for m in {SUBPACKAGES!r}]; c.build_parser(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO.parent)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_every_code_folder_is_packaged():
    """A new subpackage (e.g. bench/tasks) must be listed in pyproject, or the wheel silently lacks it."""
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for top in ("compress", "distill", "finetune", "export", "bench", "recipes"):
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO).as_posix()
            found.add(dirs.get(rel, rel))
    assert found <= set(cfg["packages"]), sorted(found - set(cfg["packages"]))
