"""Untrusted files: code shipped in a model directory never runs without --trust-remote-code, pickled
checkpoints are loaded weights-only, and hostile Modelfile fields still parse into the intended instructions."""
from __future__ import annotations

import json
import pickle

import pytest

from robustness.conftest import assert_clean_error, cli, count, run_cli_subprocess

EVIL = "import pathlib; pathlib.Path({marker!r}).write_text('remote code ran')\n"


def test_remote_code_never_runs_without_the_flag(hf_copy, tmp_path):
    marker = tmp_path / "PWNED"
    (hf_copy / "evil.py").write_text(EVIL.format(marker=str(marker)) + "from transformers import LlamaForCausalLM as EvilModel\n")
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilModel"}
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cli("chat", hf_copy, "--prompt", "hi", "--max-new-tokens", "2")
    assert rc == 0, err
    assert not marker.exists(), "code from the model directory ran without --trust-remote-code"
    # the flag is what allows it
    # (in a child: remote code registers classes process-wide, which would leak into every later test)
    r = run_cli_subprocess("chat", hf_copy, "--prompt", "hi", "--max-new-tokens", "2", "--trust-remote-code")
    assert marker.exists(), r.stderr[-2000:]
    count("untrusted", 2)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_bin_checkpoint_loads_weights_only(hf_copy, tmp_path):
    marker = tmp_path / "PWNED-bin"
    (hf_copy / "model.safetensors").unlink()
    (hf_copy / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Payload(str(marker))}))
    rc, _, err = cli("chat", hf_copy, "--prompt", "hi", "--max-new-tokens", "2")
    assert_clean_error(rc, err, mention=str(hf_copy))
    assert not marker.exists()
    count("untrusted")


def test_pickled_training_checkpoint_is_refused(tiny_hf, tmp_path, shared_data):
    marker = tmp_path / "PWNED-ckpt"
    out = tmp_path / "ft"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.pt").write_bytes(pickle.dumps({"weights": _Payload(str(marker))}))
    rc, _, err = cli("finetune", "--model", tiny_hf, "--data", shared_data / "instruct" / "identity.json", "--out", out,
                     "--max-steps", "2", "--resume", "--no-progress", "--max-length", "32")
    assert_clean_error(rc, err, mention="unreadable checkpoint")
    assert not marker.exists()
    count("untrusted")


HOSTILE = ['he said """stop""" and left', "line one\nSYSTEM injected\nFROM ./evil.gguf", "{{ .System }} {{ end }}",
           'ends with a quote"', "\"\"\"", "tab\tand {{- trim -}} and \"\"\"\n\"\"\""]


@pytest.mark.parametrize("system", HOSTILE)
def test_hostile_system_prompt_round_trips(hf_copy, tmp_path, system, ollama):
    from edgesmith.export.ollama import write_modelfile

    tpl = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n{% raw %}" + system + "{% endraw %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
           "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tc = json.loads((hf_copy / "tokenizer_config.json").read_text())
    tc["chat_template"] = tpl
    (hf_copy / "tokenizer_config.json").write_text(json.dumps(tc))
    (hf_copy / "chat_template.jinja").unlink(missing_ok=True)
    out = tmp_path / "Modelfile.Q8_0"
    entry = write_modelfile(tmp_path / "m-Q8_0.gguf", hf_copy, out, "Q8_0")
    cmds = ollama.parse(out.read_text())  # Ollama's own parser (tests/gotemplate)
    names = [c for c, _ in cmds]
    assert names.count("model") == 1 and dict(cmds)["model"] == "./m-Q8_0.gguf", cmds  # nothing injected
    if "system" in names:
        assert dict(cmds)["system"] == system
    else:
        assert entry["checks"]["system"].startswith("not representable")
    count("untrusted")


@pytest.mark.parametrize("license_text", HOSTILE + ["Apache License\nVersion 2.0, January 2004\n\nTERMS AND CONDITIONS"])
def test_hostile_license_round_trips(hf_copy, tmp_path, license_text, ollama):
    """A model's license (edgesmith.json / model card) becomes LICENSE; hostile text must not inject instructions."""
    from edgesmith.export.ollama import write_modelfile

    meta = hf_copy / "edgesmith.json"
    info = json.loads(meta.read_text()) if meta.is_file() else {}
    meta.write_text(json.dumps({**info, "license": license_text}))
    out = tmp_path / "Modelfile.Q8_0"
    entry = write_modelfile(tmp_path / "m-Q8_0.gguf", hf_copy, out, "Q8_0")
    cmds = ollama.parse(out.read_text())  # Ollama's own parser (tests/gotemplate)
    names = [c for c, _ in cmds]
    assert names.count("model") == 1 and dict(cmds)["model"] == "./m-Q8_0.gguf", cmds  # nothing injected
    assert "system" not in names or names.count("system") == 1
    if "license" in names:
        assert names.count("license") == 1 and dict(cmds)["license"] == license_text.strip()
        assert entry["checks"]["license"] == license_text.strip()
    else:
        assert entry["checks"]["license"].startswith("not representable")
    count("untrusted")


def test_bench_has_no_password_option():
    """Remote benchmarking must go through the user's SSH config/keys: no option takes a password."""
    from edgesmith.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction").choices["bench"]
    opts = [o for a in sub._actions for o in a.option_strings]
    assert not [o for o in opts if "pass" in o.lower()], opts
    count("untrusted")
