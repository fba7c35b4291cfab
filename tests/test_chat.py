"""`edgesmith chat`: llama.cpp, PyTorch and onnxruntime behind one sampler with the model's own sampling
defaults (the ones its Modelfile gets), streaming with stop strings, the speed line after each answer,
and the real default model through llama.cpp."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from edgesmith import chat
from edgesmith.export.ollama import Sampling, model_sampling, write_modelfile

SPEED = re.compile(r"^\[(llama\.cpp|PyTorch|onnxruntime): (\d+) new tokens, time to first token \d+\.\d\d s, "
                   r"decode (\d+\.\d tok/s|n/a), finish reason '(stop|length)'\]$", re.M)
RUNTIME = {"hf": "PyTorch", "gguf": "llama.cpp", "onnx": "onnxruntime"}
# what edgesmith's Modelfile for SmolLM2-tokenizer models says, plus Ollama's own defaults for the rest
SMOLLM2_SAMPLING = Sampling(temperature=0.2, top_p=0.9, top_k=40, repeat_penalty=1.1, repeat_last_n=64, stop=("<|im_end|>",))


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory, tokenizer_dir):
    """One tiny random Llama as HF fp32, GGUF F32 (llama.cpp's converter) and ONNX fp32 (optimum)."""
    from conftest import make_tiny_llama
    from edgesmith.export.gguf_convert import convert
    from edgesmith.export.onnx import export_onnx

    d = tmp_path_factory.mktemp("chatset")
    hf = make_tiny_llama(d / "hf", tokenizer_dir, hidden=64, intermediate=128, layers=2)
    gguf = convert(hf, d / "tiny-F32.gguf", "F32")
    export_onnx(hf, d / "onnx", check=False)
    return {"hf": hf, "gguf": gguf, "onnx": d / "onnx", "dir": d}


def _cli(*args) -> tuple[int, str, str]:
    """edgesmith.cli.main in-process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from edgesmith.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _spy_sampler(monkeypatch) -> list[dict]:
    """Record every call of the one sampler: the Sampling it got, the logits width and the rng's state."""
    calls, real = [], chat.sample

    def spy(logits, context, s, rng):
        calls.append({"s": s, "vocab": len(logits), "rng": rng.bit_generator.state, "context": len(context)})
        return real(logits, context, s, rng)

    monkeypatch.setattr(chat, "sample", spy)
    return calls


# ---------------------------------------------------------------- three runtimes, one sampler


def test_three_backends_give_the_same_greedy_tokens(tiny_set):
    """Greedy with Ollama's repeat penalty, without it, and with one strong enough to change the answer: the same
    prompt tokens and the same answer tokens from PyTorch, llama.cpp (GGUF F32) and onnxruntime."""
    msgs = [{"role": "user", "content": "Name three colours of the rainbow."}]
    penalties = (1.1, 1.0, 3.0)
    runs = {}
    for kind in ("hf", "gguf", "onnx"):
        bot = chat.open_backend(str(tiny_set[kind]), threads=1)
        try:
            assert bot.name == RUNTIME[kind]
            for pen in penalties:
                s = replace(SMOLLM2_SAMPLING, temperature=0.0, repeat_penalty=pen)
                runs[kind, pen] = chat.answer(bot, msgs, s, 24, np.random.default_rng(0))
        finally:
            bot.close()
    for pen in penalties:
        hf, gguf, onnx = (runs[k, pen] for k in ("hf", "gguf", "onnx"))
        assert hf.prompt_ids == gguf.prompt_ids == onnx.prompt_ids
        assert hf.ids == gguf.ids == onnx.ids, (pen, hf.ids, gguf.ids, onnx.ids)
        assert len(hf.ids) == 24 and hf.finish == gguf.finish == onnx.finish == "length"
        assert hf.text == onnx.text  # the same tokenizer library (llama.cpp detokenises with its own)
    assert runs["hf", 3.0].ids != runs["hf", 1.0].ids  # the penalty took part in the comparison


def test_sampling_defaults_reach_every_backend(tiny_set, tmp_path, monkeypatch):
    """The sampler each backend's chat calls gets the model's defaults (equal to what its Modelfile says, plus
    Ollama's top_k / repeat penalty), identical on all three, the flags on top of them, and the seeded rng."""
    entry = write_modelfile(tmp_path / "tiny-Q8_0.gguf", tiny_set["hf"], tmp_path / "Modelfile.Q8_0", "Q8_0")
    params = re.findall(r"^PARAMETER (\w+) (.+)$", Path(entry["path"]).read_text(), re.M)
    assert ("temperature", "0.2") in params and ("top_p", "0.9") in params and ("stop", '"<|im_end|>"') in params
    assert entry["checks"]["sampling"] == asdict(SMOLLM2_SAMPLING)  # recorded in export.json
    assert model_sampling(tiny_set["hf"]) == SMOLLM2_SAMPLING

    calls = _spy_sampler(monkeypatch)
    for kind in ("hf", "gguf", "onnx"):
        calls.clear()
        rc, out, err = _cli("chat", tiny_set[kind], "--prompt", "hi", "--max-new-tokens", "3", "--seed", "3", "--threads", "1")
        assert rc == 0, err
        assert len(calls) in (1, 2, 3) and all(c["s"] == SMOLLM2_SAMPLING for c in calls), (kind, calls[0]["s"])
        assert calls[0]["vocab"] == 49152 and calls[0]["rng"] == np.random.default_rng(3).bit_generator.state
        assert f"through {RUNTIME[kind]}; sampling: temperature 0.2, top_p 0.9, top_k 40, repeat_penalty 1.1 (last 64)" in err

        calls.clear()
        rc, _, err = _cli("chat", tiny_set[kind], "--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0.7",
                          "--top-p", "0.5", "--top-k", "7", "--repeat-penalty", "1", "--threads", "1")
        assert rc == 0, err
        assert calls and all(c["s"] == replace(SMOLLM2_SAMPLING, temperature=0.7, top_p=0.5, top_k=7, repeat_penalty=1.0)
                             for c in calls), (kind, calls[0]["s"])
        # the penalty looks back over the prompt too (as Ollama feeds the prompt to its sampler)
        assert calls[0]["context"] > 20


def test_gguf_and_onnx_chat_need_no_torch(tiny_set):
    """On an `edgesmith[device]` install (no torch, no transformers) GGUF and ONNX models still chat."""
    block = ("import sys\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('torch', 'transformers'): raise ImportError('blocked ' + name)\n"
             "sys.meta_path.insert(0, Block())\n"
             "from edgesmith.cli import main\n")
    for kind in ("gguf", "onnx"):
        code = block + f"sys.exit(main(['chat', {str(tiny_set[kind])!r}, '--prompt', 'hi', '--max-new-tokens', '3', '--threads', '1']))\n"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert SPEED.search(r.stderr).group(1) == RUNTIME[kind]


def test_gguf_sampling_defaults_match_the_hf_model(tiny_set):
    """Derived from what the GGUF carries (template, control tokens), the defaults equal the HF dir's."""
    bot = chat.open_backend(str(tiny_set["gguf"]), threads=1)
    try:
        assert bot.sampling == model_sampling(tiny_set["hf"]) == SMOLLM2_SAMPLING
    finally:
        bot.close()


def test_seed_makes_sampled_answers_reproducible(tiny_set):
    s = replace(SMOLLM2_SAMPLING, temperature=1.0)  # a random model: wide distributions, every draw matters
    msgs = [{"role": "user", "content": "hi"}]
    bot = chat.open_backend(str(tiny_set["gguf"]), threads=1)
    try:
        a, b, c = (chat.answer(bot, msgs, s, 16, np.random.default_rng(seed)).ids for seed in (7, 7, 8))
    finally:
        bot.close()
    assert a == b and a != c


def test_export_dir_runs_its_gguf_with_the_modelfiles_sampling(tiny_set, tmp_path):
    """An export directory chats through llama.cpp with what its Modelfile says, even where that came from the
    source model's generation config (which the GGUF does not carry)."""
    src = tmp_path / "src"
    shutil.copytree(tiny_set["hf"], src, ignore=shutil.ignore_patterns("*.safetensors"))
    (src / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.8, "eos_token_id": 2}))
    d = tmp_path / "export"
    d.mkdir()
    shutil.copy(tiny_set["gguf"], d / "tiny-F32.gguf")
    mf = write_modelfile(d / "tiny-F32.gguf", src, d / "Modelfile.F32", "F32")
    (d / "export.json").write_text(json.dumps({"name": "tiny", "files": [
        {"path": "tiny-F32.gguf", "type": "gguf-F32", "checks": {}}, {**mf, "path": "Modelfile.F32"}]}))
    want = replace(SMOLLM2_SAMPLING, temperature=0.6, top_p=0.8)
    bot = chat.open_backend(str(d), threads=1)
    try:
        assert bot.name == "llama.cpp" and bot.path == d / "tiny-F32.gguf"
        assert bot.sampling == want
        assert bot.model_sampling() == SMOLLM2_SAMPLING  # what the GGUF alone would have given
    finally:
        bot.close()
    rc, out, err = _cli("chat", d, "--prompt", "hi", "--max-new-tokens", "4", "--threads", "1")
    assert rc == 0, err
    assert "through llama.cpp; sampling: temperature 0.6, top_p 0.8" in err
    assert SPEED.search(err).group(1) == "llama.cpp"


# ---------------------------------------------------------------- the sampler and the stream


def test_sampler_follows_llama_cpp_chain():
    """penalty (window, distinct tokens, sign rule) -> top-k -> top-p -> temperature, and the input untouched."""
    rng = np.random.default_rng(0)
    logits = np.array([1.0, 1.9, -0.5, 0.0, 1.5], dtype=np.float32)
    keep = logits.copy()
    greedy = Sampling(temperature=0.0, top_p=1.0, repeat_penalty=2.0, repeat_last_n=2)
    assert chat.sample(logits, [1, 1], greedy, rng) == 4         # 1.9 / 2 < 1.5
    assert chat.sample(logits, [1, 3, 3], greedy, rng) == 1      # token 1 is outside the last 2
    assert chat.sample(logits, [1, 1], replace(greedy, repeat_penalty=1.0), rng) == 1
    neg = np.array([-0.4, -0.3], dtype=np.float32)
    assert chat.sample(neg, [1], greedy, rng) == 0               # -0.3 * 2 = -0.6 < -0.4: negatives are multiplied
    assert np.array_equal(logits, keep)
    s = Sampling(temperature=1.0, top_p=1.0, top_k=2, repeat_penalty=1.0)
    assert {chat.sample(logits, [], s, rng) for _ in range(300)} == {1, 4}
    # top-p on the untempered softmax: p(1) = 0.43 alone reaches 0.3; 0.43 + 0.29 reaches 0.7
    assert {chat.sample(logits, [], replace(s, top_k=0, top_p=0.3), rng) for _ in range(100)} == {1}
    # temperature applies after top-p: a huge one flattens the two survivors, it does not let others back in
    assert {chat.sample(logits, [], replace(s, top_k=0, top_p=0.7, temperature=100.0), rng) for _ in range(300)} == {1, 4}
    draws = [chat.sample(logits, [], replace(s, top_k=0), np.random.default_rng(5)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw


def test_stream_never_shows_a_stop_string():
    import io

    out = io.StringIO()
    st = chat._Stream(lambda ids: "".join(map(chr, ids)), ["<|end|>"], out)
    assert not any(st.push(ord(c)) for c in "Hi <|x <|")
    assert out.getvalue() == "Hi <|x "                          # "<|" could still become "<|end|>": held back
    assert not any(st.push(ord(c)) for c in "en")
    assert [st.push(ord(c)) for c in "d|>"] == [False, False, True]
    assert st.finish() == "Hi <|x " and out.getvalue() == "Hi <|x "


# ---------------------------------------------------------------- the command


def test_chat_prompt_and_interactive(tiny_llama):
    r = subprocess.run([sys.executable, "-m", "edgesmith", "chat", str(tiny_llama), "--prompt", "hi", "--max-new-tokens", "5"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # a random model never says <|im_end|> in 5 tokens; the speed line follows the answer
    lines = SPEED.findall(r.stderr)
    assert len(lines) == 1 and lines[0][:2] == ("PyTorch", "5") and lines[0][3] == "length", r.stderr
    r = subprocess.run([sys.executable, "-m", "edgesmith", "chat", str(tiny_llama), "--max-new-tokens", "3"],
                       input="hello\n/reset\nagain\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 3  # a prompt per input line plus the final one before EOF
    assert len(SPEED.findall(r.stderr)) == 2  # one line per answer


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"), ("--repeat-penalty", "0"),
                                        ("--max-new-tokens", "0"), ("--seed", "-1"), ("--threads", "0"), ("--temperature", "nan")])
def test_bad_flags_are_one_line_errors(flag, value):
    rc, out, err = _cli("chat", "default", "--prompt", "hi", flag, value)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"edgesmith chat: error: {flag} must be"), err


def test_chat_gguf_rejects_garbage(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 20)
    r = subprocess.run([sys.executable, "-m", "edgesmith", "chat", str(f), "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not a readable GGUF" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_default_answers_through_llama_cpp_and_stops():
    """`chat default` runs the embedded GGUF in llama.cpp with the Modelfile's sampling: it names Paris, ends
    its turn itself (finish reason 'stop', not the length limit) and prints the speed line."""
    # one thread: a test machine's cores are shared, and llama.cpp's spinning threads crawl on busy cores
    r = subprocess.run([sys.executable, "-m", "edgesmith", "chat", "default", "--prompt", "What is the capital of France?",
                        "--seed", "0", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, r.stdout
    assert "through llama.cpp; sampling: temperature 0.2, top_p 0.9, top_k 40, repeat_penalty 1.1 (last 64), stop ['<|im_end|>']" in r.stderr
    m = SPEED.search(r.stderr)
    assert m and m.group(1) == "llama.cpp" and m.group(4) == "stop" and m.group(3) != "n/a", r.stderr
    assert "<|im_end|>" not in r.stdout


@pytest.mark.slow
def test_default_sampling_is_the_same_from_the_gguf_and_the_hf_dir(default_hf):
    """The embedded GGUF (llama.cpp) and its HF materialisation (PyTorch) preview with the same defaults,
    the ones `edgesmith export default --modelfile` writes."""
    bot = chat.open_backend("default", threads=1)
    try:
        assert bot.name == "llama.cpp" and bot.sampling == model_sampling(default_hf) == SMOLLM2_SAMPLING
    finally:
        bot.close()
