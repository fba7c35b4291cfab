"""Model inputs that are Hugging Face directories: config.json or weights missing, corrupt or truncated
safetensors, weights whose shapes disagree with config.json, unsupported architectures (real GPT-2 and BERT
checkpoints), and a teacher/student pair with different vocabularies."""
from __future__ import annotations

import json

import pytest

from robustness.conftest import assert_clean_error, cli, count


def _commands(d, tmp_path):
    """Entry points that take a model directory, each with arguments that are otherwise valid."""
    return [["info", d], ["chat", d, "--prompt", "hi", "--max-new-tokens", "2"],
            ["prune", d, "--out", tmp_path / "pruned", "--mlp-ratio", "0.5", "--eval-windows", "0"],
            ["export", d, "--out", tmp_path / "export", "--gguf", "F16", "--no-check"]]


def _all_fail(d, tmp_path, mention=None, commands=None):
    for cmd in commands or _commands(d, tmp_path):
        rc, _, err = cli(*cmd)
        assert_clean_error(rc, err, mention=mention)
        assert not (tmp_path / "pruned").exists() and not (tmp_path / "export").exists(), cmd  # no empty output left
        count("models")


def test_bench_of_a_refused_model_reports_the_failure_once_in_full(hf_copy, tmp_path):
    (hf_copy / "model.safetensors").unlink()
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    rc, out, err = cli("bench", hf_copy, "--ppl-text", text, "--ctx", "32", "--max-chunks", "1")
    assert rc == 1
    lines = [x for x in (out + err).splitlines() if "FAILED:" in x]
    assert len(lines) == 1 and "no weights found" in lines[0], out + err
    assert "FAILED (see below)" in out


def test_missing_config_json(hf_copy, tmp_path):
    (hf_copy / "config.json").unlink()
    _all_fail(hf_copy, tmp_path, mention="config.json missing")


def test_missing_weights(hf_copy, tmp_path):
    (hf_copy / "model.safetensors").unlink()
    _all_fail(hf_copy, tmp_path, mention="no weights found")


def test_config_json_not_json_or_not_an_object(hf_copy, tmp_path):
    for text in ("{not json", "[1, 2, 3]", "\xff\xfe"):
        (hf_copy / "config.json").write_text(text, encoding="latin-1")
        _all_fail(hf_copy, tmp_path, mention=str(hf_copy / "config.json"))


def test_config_json_missing_sizes(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    del cfg["hidden_size"], cfg["num_hidden_layers"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cli("info", hf_copy)
    assert_clean_error(rc, err, mention=str(hf_copy))
    count("models")


@pytest.mark.parametrize("damage", ["truncated", "garbage-header", "empty"])
def test_corrupt_safetensors(hf_copy, tmp_path, damage):
    f = hf_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage-header": b"\xff" * 64 + data[64:], "empty": b""}[damage])
    _all_fail(hf_copy, tmp_path, mention=str(hf_copy))


def test_weights_disagree_with_config(hf_copy, tmp_path):
    """config.json says hidden 128 / MLP 192, the safetensors hold a hidden-64 model."""
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg.update(hidden_size=128, intermediate_size=192)
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    cmds = _commands(hf_copy, tmp_path)[1:]  # `info` only describes; every loader and the exporter refuse
    _all_fail(hf_copy, tmp_path, mention="do not belong together", commands=cmds)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_unsupported_architectures(tmp_path, tokenizer_dir, arch):
    """Real (tiny, random) GPT-2 and BERT checkpoints saved by transformers."""
    import shutil

    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    d = tmp_path / arch
    if arch == "gpt2":
        GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(d)
    else:
        BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             vocab_size=300)).save_pretrained(d)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    _all_fail(d, tmp_path, mention=f"model_type '{arch}' is not supported")


def test_teacher_student_with_different_vocabularies(tiny_hf, byte_model, tmp_path, shared_data):
    data = shared_data / "instruct" / "identity.json"
    rc, _, err = cli("distill", "--teacher", tiny_hf, "--student", byte_model, "--data", data, "--out", tmp_path / "d",
                     "--max-steps", "1")
    assert_clean_error(rc, err, mention="do not share a vocabulary")
    count("models")


def test_nonexistent_and_special_paths(tmp_path):
    for spec in (tmp_path / "nope", "/dev/null", "/proc/self/status", tmp_path):
        rc, _, err = cli("info", spec)
        assert_clean_error(rc, err)
        count("models")
