"""Recipes and flags: unknown keys, wrong types, impossible pruning targets, unknown quant names, output
locations that are files or not writable, and not enough disk space (checked before anything is written)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from robustness.conftest import REPO, assert_clean_error, cli, count


@pytest.mark.parametrize("text,words", [
    ("hidden_sizee: 512\n", "did you mean 'hidden_size'"),
    ("num_layers: many\n", "num_layers: expected int"),
    ("mlp_ratio: 1.5\n", "mlp_ratio"),
    ("intermediate_size: 99999\n", "pruning only removes"),
    ("num_layers: 7\n", "more than the model's 2 layers"),
    ("num_attention_heads: 3\n", "not reachable"),
    ("target_params: 1k\n", "target_params"),
    ("sparsity: '5:4'\n", "N:M needs"),
    ("round_to: 48\n", "round_to"),
    ("- a list\n", "expected a mapping"),
    ("a: [unclosed\n", "invalid YAML"),
])
def test_bad_prune_recipes(tiny_hf, tmp_path, text, words):
    r = tmp_path / "r.yaml"
    r.write_text(text)
    rc, _, err = cli("prune", tiny_hf, "--recipe", r, "--out", tmp_path / "o", "--eval-windows", "0")
    assert_clean_error(rc, err, mention=words)
    assert not (tmp_path / "o").exists()
    count("recipes")


def test_real_recipes_with_one_bad_key(tmp_path):
    for name, cmd in (("distill-default", ["distill", "--student", tmp_path]), ("lora-alpaca", ["finetune", "--data", tmp_path])):
        text = (REPO / "recipes" / f"{name}.yaml").read_text().replace("  lr: 2.0e-4", "  lr: fast")
        r = tmp_path / f"{name}.yaml"
        r.write_text(text)
        rc, _, err = cli(*cmd, "--recipe", r, "--out", tmp_path / "o")
        assert_clean_error(rc, err, mention="train.lr")
        count("recipes")


@pytest.mark.parametrize("types", ["Q4_K_Q", "q3", "F64,Q8_0", "GUESSED"])
def test_unknown_quant_names(tiny_hf, tmp_path, types):
    rc, _, err = cli("export", tiny_hf, "--out", tmp_path / "e", "--gguf", types)
    assert_clean_error(rc, err, mention="unknown GGUF type")
    count("recipes")


def test_output_is_a_file_or_unwritable(tiny_hf, tmp_path, shared_data):
    f = tmp_path / "a-file"
    f.write_text("x")
    for out in (f, f / "below", "/proc/edgesmith-out", "/proc/self/edgesmith"):
        for cmd in (["prune", tiny_hf, "--out", out, "--mlp-ratio", "0.5", "--eval-windows", "0"],
                    ["export", tiny_hf, "--out", out, "--gguf", "F16", "--no-check"],
                    ["data", "prepare", shared_data / "instruct" / "identity.json", "--out", out, "--model", tiny_hf]):
            rc, _, err = cli(*cmd)
            assert_clean_error(rc, err)
            count("recipes")


def test_free_space_is_checked_against_the_real_filesystem(tmp_path):
    from edgesmith.errors import EdgesmithError
    from edgesmith.fsutil import check_free_space

    free = shutil.disk_usage(tmp_path).free
    check_free_space(tmp_path / "x" / "y", 1 << 20)
    with pytest.raises(EdgesmithError, match="not enough disk space"):
        check_free_space(tmp_path / "x" / "y", free + (1 << 40))
    count("recipes")


@pytest.fixture
def small_fs(tmp_path):
    """A real 3 MiB filesystem (tmpfs) when this machine allows mounting one."""
    d = tmp_path / "small"
    d.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(d)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_not_enough_disk_space_before_writing(tiny_hf, small_fs):
    for cmd, what in ((["export", tiny_hf, "--out", small_fs / "e", "--gguf", "F16", "--no-check"], "not enough disk space"),
                      (["prune", tiny_hf, "--out", small_fs / "p", "--mlp-ratio", "0.5", "--eval-windows", "0"], "not enough disk space")):
        rc, _, err = cli(*cmd)
        assert_clean_error(rc, err, mention=what)
        assert not any(p.is_file() and p.suffix in (".gguf", ".safetensors") for p in small_fs.rglob("*"))
        count("recipes")
