"""The one GGUF reader: header, every key/value and the tensor table, parsed with `struct`.

Everything in edgesmith that looks inside a GGUF (validation, `edgesmith info`, GGUF -> HF conversion,
export descriptions and checks, imatrix files) reads it here; gguf-py is used only for its type tables
(ggml types and block sizes) and its writer.

Why not `gguf.GGUFReader`: it builds numpy views for every part of every field, i.e. several per
vocabulary string. Measured on the default model's files (SmolLM2-135M, 49,152 tokens; 2 shared CPU
cores, load ~1.1; best of 3 for this reader):

    file                                  gguf.GGUFReader (+ .contents())   this reader
    SmolLM2-135M-Instruct.Q4_1.gguf       3.93 s (+0.09 s)                  0.26 s
    smollm2-135m-instruct-F16.gguf        4.67 s (+0.09 s)                  0.25 s
    smollm2-135m-instruct-Q4_K_M.gguf     4.64 s (+0.11 s)                  0.26 s

so the package's reader is ~15x slower, and `edgesmith info default` used to pay for both (this
parser to validate, then GGUFReader to describe). A parse is now cached per (file, size, mtime):
validation and description share one.

The structural checks mirror llama.cpp's gguf.cpp so that a file passing them does not make it abort:
magic, version 2/3, counts that fit the file, value types, string lengths and UTF-8, duplicate keys,
general.alignment, tensor names, dimensions, ggml types and block sizes, data offsets exactly as
llama.cpp computes them, and tensor data inside the file. Each failure is a one-line EdgesmithError
naming the file. Model-level checks (architecture, shapes) live in `edgesmith.gguf_check`.
"""
from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EdgesmithError

GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
# GGUF value type -> struct format (8 = string, 9 = array are handled apart)
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
STRING, ARRAY = 8, 9
_NUMPY_TYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


@dataclass
class GGUFFile:
    """A parsed GGUF header. Treat as read-only: parses are cached and shared."""

    path: Path
    version: int
    n_tensors: int
    n_kv: int
    size: int
    alignment: int
    data_offset: int
    fields: dict[str, Any] = field(default_factory=dict)  # key -> plain Python value (arrays as lists)
    types: dict[str, int] = field(default_factory=dict)   # key -> GGUF value type
    # in file order: {name, shape (GGUF order, ne[0] = row length), type (ggml type name), n_elements, n_bytes, offset}
    tensors: list[dict] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def tensor_array(self, name: str):
        """The data of one plain (float / integer) tensor as a flat numpy array, read from the file."""
        import numpy as np

        t = next((t for t in self.tensors if t["name"] == name), None)
        if t is None:
            raise EdgesmithError(f"{self.path}: no tensor {name!r}")
        if t["type"] not in _NUMPY_TYPES:
            raise EdgesmithError(f"{self.path}: tensor {name!r} is {t['type']}, not a plain numeric type")
        return np.fromfile(self.path, dtype=np.dtype(_NUMPY_TYPES[t["type"]]), count=t["n_elements"],
                           offset=self.data_offset + t["offset"])


def stat_file(path: str | os.PathLike) -> tuple[Path, os.stat_result]:
    """(path, its stat) of a regular file, or a one-line error naming it: the key of the per-file parse caches."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise EdgesmithError(f"{p}: cannot read ({e.strerror})") from None
    if not p.is_file():
        raise EdgesmithError(f"{p}: not a file")
    return p, st


def read(path: str | os.PathLike) -> GGUFFile:
    """Parse and check a GGUF file's header (cached while the file's size and mtime stay the same)."""
    p, st = stat_file(path)
    return _read_cached(str(p), st.st_size, st.st_mtime_ns)


def metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A GGUF's key/values as plain Python values (arrays as lists)."""
    return read(path).fields


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return _parse(Path(path), size)


def _parse(p: Path, size: int) -> GGUFFile:  # noqa: C901 - one linear parse
    import gguf

    def bad(msg: str):
        raise EdgesmithError(f"{p}: {msg}")

    if size < 24:
        bad(f"not a GGUF file (only {size} bytes)" if size < 4 else f"truncated GGUF header ({size} bytes)")
    try:
        with open(p, "rb") as fh:
            head = fh.read(24)
            if head[:4] != b"GGUF":
                bad("not a GGUF file (bad magic)")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
            if version & 0xFFFF == 0 and version:
                bad(f"GGUF version {version:#x}: the file has the other byte order (big-endian GGUF is not supported)")
            if version not in (2, 3):
                bad(f"not a readable GGUF file (unsupported GGUF version {version}; expected 2 or 3)")
            # every key/value takes >= 13 bytes and every tensor info >= 24: bounds before allocating anything
            if n_kv > size // 13 or n_tensors > size // 24:
                bad(f"corrupt GGUF header: {n_kv} key/values and {n_tensors} tensors cannot fit in {size} bytes")
            buf = fh.read(64 << 20)  # the whole header (vocabularies of 150k+ tokens fit comfortably)
    except OSError as e:
        raise EdgesmithError(f"{p}: cannot read ({e.strerror})") from None
    off = 0

    def take(fmt: str):
        nonlocal off
        n = struct.calcsize("<" + fmt)
        if off + n > len(buf):
            bad("truncated GGUF header")
        v = struct.unpack_from("<" + fmt, buf, off)[0]
        off += n
        return v

    def string(what: str) -> str:
        nonlocal off
        n = take("Q")
        if n > len(buf) - off:
            bad(f"truncated GGUF header ({what}: string of {n} bytes runs past the end)")
        raw = bytes(buf[off:off + n])
        off += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            bad(f"{what}: string is not valid UTF-8")

    def value(t: int, key: str):
        nonlocal off
        if t == STRING:
            return string(key)
        if t in SCALAR_FORMATS:
            return take(SCALAR_FORMATS[t])
        if t != ARRAY:
            bad(f"key {key!r} has unknown value type {t}")
        it, n = take("I"), take("Q")
        if it == STRING:
            return [string(f"{key}[{i}]") for i in range(n)]
        if it not in SCALAR_FORMATS:
            bad(f"key {key!r}: array of unsupported type {it}")
        width = struct.calcsize("<" + SCALAR_FORMATS[it])
        if n * width > len(buf) - off:
            bad(f"truncated GGUF header ({key}: array of {n} items runs past the end)")
        items = list(struct.unpack_from(f"<{n}{SCALAR_FORMATS[it]}", buf, off))
        off += n * width
        return items

    fields: dict[str, Any] = {}
    types: dict[str, int] = {}
    for i in range(n_kv):
        key = string(f"key #{i}")
        if key in fields:
            bad(f"duplicate key {key!r}")
        t = take("I")
        types[key] = t
        fields[key] = value(t, key)
    align = fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if "general.alignment" in fields and types["general.alignment"] != 4:
        bad("general.alignment must be a uint32")
    if align == 0 or align & (align - 1):
        bad(f"general.alignment {align} is not a power of 2")
    tensors: list[dict] = []
    names: set[str] = set()
    expected = 0
    for i in range(n_tensors):
        name = string(f"tensor #{i} name")
        if len(name.encode()) >= GGML_MAX_NAME:
            bad(f"tensor name {name[:40]!r}... is longer than {GGML_MAX_NAME - 1} bytes")
        if name in names:
            bad(f"duplicate tensor {name!r}")
        names.add(name)
        nd = take("I")
        if nd > GGML_MAX_DIMS:
            bad(f"tensor {name!r} has {nd} dimensions (at most {GGML_MAX_DIMS})")
        ne = [take("Q") for _ in range(nd)]
        n_el = 1
        for d in ne:
            if d >= 1 << 63:
                bad(f"tensor {name!r} has a negative dimension")
            n_el *= d
        if n_el >= 1 << 63:
            bad(f"tensor {name!r}: shape {ne} overflows")
        ttype = take("I")
        try:
            qt = gguf.GGMLQuantizationType(ttype)
            block, tsize = gguf.GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            bad(f"tensor {name!r} has unknown ggml type {ttype}")
        if ne and ne[0] % block:
            bad(f"tensor {name!r}: row length {ne[0]} is not a multiple of the {qt.name} block size {block}")
        offset = take("Q")
        if offset != expected:
            bad(f"tensor {name!r} has data offset {offset}, expected {expected} (corrupt tensor table)")
        nbytes = n_el // block * tsize
        expected += (nbytes + align - 1) // align * align
        tensors.append({"name": name, "shape": ne, "type": qt.name, "n_elements": n_el, "n_bytes": nbytes,
                        "offset": offset})
    data_offset = 24 + off
    data_offset = (data_offset + align - 1) // align * align if n_tensors else data_offset
    # the end of the last tensor's bytes (padding after it is optional)
    end = data_offset + (tensors[-1]["offset"] + tensors[-1]["n_bytes"] if tensors else 0)
    if end > size:
        bad(f"truncated: tensor data ends at byte {end} but the file has {size} bytes")
    return GGUFFile(path=p, version=version, n_tensors=n_tensors, n_kv=n_kv, size=size, alignment=align,
                    data_offset=data_offset, fields=fields, types=types, tensors=tensors)
