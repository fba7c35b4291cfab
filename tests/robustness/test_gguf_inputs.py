"""Model inputs that are GGUF files: truncated, corrupted, not GGUF at all, an unsupported architecture,
incomplete tensor tables. Each is refused in Python (validate_gguf) with a one-line error naming the file,
before llama.cpp sees it; what only llama.cpp can reject is rejected in a child process."""
from __future__ import annotations

import hashlib
import shutil
import struct

import pytest

from robustness.conftest import assert_clean_error, cli, count, run_cli_subprocess
from robustness.ggufs import write_tiny_gguf


def _copy_prefix(src, dst, n: int):
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(n))
    return dst


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


@pytest.fixture(scope="module")
def default_sha(default_gguf_path):
    return _sha(default_gguf_path)


def test_truncated_copies_of_the_default_gguf(default_gguf_path, default_sha, tmp_path):
    """The real 98 MB default GGUF cut inside its header, its tensor table, its tensor data and by one byte."""
    from edgesmith.gguf_check import validate_gguf

    info = validate_gguf(default_gguf_path)
    size = info["size"]
    cuts = {"magic": 3, "counts": 20, "kv": 4096, "vocab": 600_000, "tensor-table": info["data_offset"] - 200,
            "data-start": info["data_offset"] + 10, "middle": size // 2, "last-byte": size - 1}
    for what, n in cuts.items():
        p = _copy_prefix(default_gguf_path, tmp_path / f"cut-{what}.gguf", n)
        rc, _, err = cli("info", p)
        line = assert_clean_error(rc, err, mention=str(p))
        assert ("truncated" in line or "not a GGUF" in line), line
        count("gguf")
    # the source file is read, never modified
    assert _sha(default_gguf_path) == default_sha


def test_not_gguf_empty_and_random_files(tmp_path):
    cases = {"empty.gguf": b"", "text.gguf": b"hello, I am not a model\n" * 10, "zip.gguf": b"PK\x03\x04" + bytes(200),
             "ggml.gguf": b"lmgg" + bytes(100), "short.gguf": b"GGUF\x03\x00"}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        for cmd in (["info", p], ["chat", p, "--prompt", "hi"], ["prune", p, "--out", tmp_path / "o", "--mlp-ratio", "0.5"]):
            rc, _, err = cli(*cmd)
            assert_clean_error(rc, err, mention=str(p))
            count("gguf")


def _patch(src, dst, offset: int, data: bytes):
    b = bytearray(src.read_bytes())
    b[offset:offset + len(data)] = data
    dst.write_bytes(bytes(b))
    return dst


def test_header_corruptions(tiny_gguf, tmp_path):
    raw = tiny_gguf.read_bytes()
    name = b"blk.0.ffn_down.weight"  # the last tensor: name, n_dims u32, 2 dims u64, type u32, offset u64
    last_offset_field = raw.index(name) + len(name) + 4 + 16 + 4
    cases = {
        "version-1": (4, struct.pack("<I", 1), "version"),
        "version-99": (4, struct.pack("<I", 99), "version"),
        "big-endian": (4, struct.pack(">I", 3), "byte order"),
        "huge-tensor-count": (8, struct.pack("<Q", 1 << 60), "cannot fit"),
        "huge-kv-count": (16, struct.pack("<Q", 1 << 40), "cannot fit"),
        "first-key-length": (24, struct.pack("<Q", 1 << 50), "truncated"),
        "tensor-offset": (last_offset_field, struct.pack("<Q", 12345), "offset"),
        "tensor-type": (last_offset_field - 4, struct.pack("<I", 200), "unknown ggml type"),
        "tensor-n-dims": (last_offset_field - 24, struct.pack("<I", 7), "dimensions"),
        "tensor-shape": (last_offset_field - 20, struct.pack("<Q", 7), "expected [128, 64]"),
    }
    for name, (off, data, words) in cases.items():
        p = _patch(tiny_gguf, tmp_path / f"{name}.gguf", off, data)
        rc, _, err = cli("info", p)
        line = assert_clean_error(rc, err, mention=str(p))
        assert words in line, (name, line)
        count("gguf")


@pytest.mark.parametrize("kw,words", [
    ({"arch": "gpt2"}, "architecture 'gpt2' is not supported"),
    ({"arch": "bert"}, "architecture 'bert' is not supported"),
    ({"skip_tensor": "blk.0.ffn_down.weight"}, "'blk.0.ffn_down.weight' is missing"),
    ({"skip_tensor": "token_embd.weight"}, "'token_embd.weight' is missing"),
])
def test_unsupported_or_incomplete_models(tmp_path, kw, words):
    p = write_tiny_gguf(tmp_path / "m.gguf", **kw)
    for cmd in (["info", p], ["chat", p, "--prompt", "hi"], ["prune", p, "--out", tmp_path / "o", "--mlp-ratio", "0.5"],
                ["export", p, "--out", tmp_path / "e", "--gguf", "F16"]):
        rc, _, err = cli(*cmd)
        assert_clean_error(rc, err, mention=words)
        count("gguf")


def test_valid_tiny_ggufs_pass(tiny_gguf, tiny_gguf_q8):
    for p in (tiny_gguf, tiny_gguf_q8):
        rc, out, err = cli("info", p)
        assert rc == 0, err
        assert "llama" in out
        count("gguf")


def test_what_only_llama_cpp_can_reject_is_rejected_in_a_child(tmp_path):
    """A well-formed file llama.cpp refuses (unknown tokenizer model): the CLI, run as a user runs it, prints one
    line and exits 2 (llama.cpp's load ran in a child process first)."""
    p = write_tiny_gguf(tmp_path / "bogus-tokenizer.gguf", tokenizer_model="no-such-tokenizer")
    r = run_cli_subprocess("chat", p, "--prompt", "hi", "--max-new-tokens", "4")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and str(p) in lines[0] and "llama.cpp could not load" in lines[0], r.stderr
    count("gguf")


def test_valid_tiny_gguf_chats_through_llama_cpp(tiny_gguf):
    r = run_cli_subprocess("chat", tiny_gguf, "--prompt", "hi", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    count("gguf")
