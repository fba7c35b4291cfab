"""The single entry point: every registered subcommand shows up in --help and has its own --help;
user errors are one line on stderr with exit code 2."""
import subprocess
import sys

import pytest

from edgesmith.cli import COMMANDS, build_parser


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "edgesmith", *args], capture_output=True, text=True, timeout=600, **kw)


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert name in r.stdout
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help(name):
    r = run_cli(name, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: edgesmith " + name in r.stdout


def test_user_error_is_one_line_exit_2(tmp_path):
    bogus = tmp_path / "nope"
    r = run_cli("info", str(bogus))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and str(bogus) in lines[0]
    assert "Traceback" not in r.stderr


def test_info_rejects_non_gguf_file(tmp_path):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"not a gguf at all" * 10)
    r = run_cli("info", str(f))
    assert r.returncode == 2 and "not a GGUF file" in r.stderr
