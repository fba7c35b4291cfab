"""Atomic file/directory writes, hashing and small filesystem helpers shared by every stage.

Every output is written under a temporary name next to its final path and renamed when complete,
so an interrupted job never leaves a partial file where a finished one is expected.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import EdgesmithError


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(tempfile._get_candidate_names())}")


def _umask() -> int:
    """The process umask, read without changing it (/proc), else by the set-and-restore idiom."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(path: str | os.PathLike) -> None:
    """Give `path` (and, for a directory, everything under it) the mode a plain open()/mkdir() would: 0666/0777 minus
    the umask. Writers that go through a private temp file (safetensors' save_file, tempfile.mkstemp) leave 0600,
    which the atomic rename would otherwise carry onto the final output."""
    mask = _umask()
    p = Path(path)
    for f in [p, *p.rglob("*")] if p.is_dir() and not p.is_symlink() else [p]:
        if f.is_symlink():
            continue
        mode = f.stat().st_mode & 0o777
        want = (0o777 if f.is_dir() or mode & 0o111 else 0o666) & ~mask
        if mode != want:
            os.chmod(f, want)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise EdgesmithError(f"{path}: nothing was written")
        public_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """open() that writes to a temp file and renames it into place on success."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `path` (old contents removed)."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    if path.exists() and not path.is_dir():
        raise EdgesmithError(f"{path}: exists and is not a directory")
    tmp = _tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        public_mode(tmp)
        old = None
        if path.exists():
            old = _tmp_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) or explain in one line why it cannot be an output directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EdgesmithError(f"{path}: output location exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgesmithError(f"{path}: cannot create output directory ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise EdgesmithError(f"{path}: output directory is not writable")
    return path


def check_free_space(path: str | os.PathLike, need_bytes: int, what: str = "output") -> None:
    """Fail before writing when the filesystem holding `path` has less than `need_bytes` free."""
    p = Path(path)
    while not p.exists():
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < need_bytes:
        raise EdgesmithError(
            f"{path}: not enough disk space for {what}: need ~{need_bytes / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free"
        )


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def quick_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a (large) file: size, mtime and the first/last MiB hashed."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256(f"{p.name}:{st.st_size}".encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:16]


def model_fingerprint(path: str | os.PathLike) -> str:
    """Identity of an HF model directory: its config.json and the quick fingerprint of every weight file. Keys the
    caches built from a model (teacher corpora, top-k targets): another checkpoint in the same folder is another key."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(quick_fingerprint(f).encode())
    return h.hexdigest()[:16]


def dir_size(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def cache_dir() -> Path:
    """Where materialised models, built wheels and teacher corpora are cached (EDGESMITH_CACHE)."""
    root = os.environ.get("EDGESMITH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgesmith"
    )
    return Path(root)


def save_files_into(out: Path, write, tmp_name: str = ".save-tmp") -> None:
    """write(tmp) fills a scratch folder inside `out`; each file is then renamed into `out` (atomic per file), so an
    interrupted save never leaves a half-written weight file under its final name (the stage's manifest, written
    last, marks the whole directory complete)."""
    tmp = Path(out) / tmp_name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    public_mode(tmp)
    for f in tmp.iterdir():
        f.replace(Path(out) / f.name)
    tmp.rmdir()


def data_dir() -> Path | None:
    """The evaluation/calibration data folder (mc/, lm/, instruct/): EDGESMITH_DATA when set, else ../shared/data next
    to the working directory or next to this repository; None when there is none. The one lookup every stage uses."""
    env = os.environ.get("EDGESMITH_DATA")
    repo = Path(__file__).resolve().parents[1]
    for cand in ([Path(env)] if env else []) + [Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand.resolve()
    return None
