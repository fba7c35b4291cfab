"""ONNX export: a decoder with KV cache via optimum-onnx, greedy parity with HF fp32, int8/int4
weight quantisation, and OnnxLM (export/onnx_runtime.py: onnxruntime + tokenizers only) for chat and benchmarks.
One export per module (tiny random Llama for the unit tests, the real default model for the slow one)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_llama
from edgesmith.errors import EdgesmithError
from edgesmith.chat_template import render_chat_template
from edgesmith.export.onnx import PROVENANCE, export_onnx, onnx_model_bytes
from edgesmith.export.onnx_runtime import OnnxLM


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("onnx") / "tiny", tokenizer_dir)


@pytest.fixture(scope="module")
def exported(tiny) -> dict:
    out = tiny.parent / "export"
    fp32 = export_onnx(tiny, out / "onnx")  # check=True: raises unless 3 prompts x 32 tokens match HF
    int8 = export_onnx(tiny, out / "onnx-int8", "int8")  # reuses ../onnx (same weights, see provenance)
    return {"fp32": fp32, "int8": int8, "out": out}


def test_fp32_export_layout_and_parity(exported, tiny):
    e = exported["fp32"]
    d = Path(e["path"])
    assert e["type"] == "onnx-fp32" and e["checks"]["parity_ok"] is True
    assert "3 prompts x 32 tokens identical" in e["checks"]["greedy_parity"]
    for f in ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", PROVENANCE):
        assert (d / f).is_file(), f
    assert e["size_bytes"] == sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert not list(d.parent.glob(".onnx*tmp*")), "temporary export directories left behind"


def test_optimum_loads_the_export_and_agrees_with_onnxlm(exported):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    d = Path(exported["fp32"]["path"])
    model = ORTModelForCausalLM.from_pretrained(d, use_cache=True)
    assert model.use_cache
    lm = OnnxLM(d)
    ids = lm.tokenize("The capital of France is")
    seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert seq[0, len(ids):].tolist() == lm.generate(ids, 12, eos_ids=())


def test_onnxlm_logits_match_hf(exported, tiny):
    import torch
    from transformers import AutoModelForCausalLM

    lm = OnnxLM(exported["fp32"]["path"])
    ids = lm.tokenize("Hello world, this is a test of the KV cache.")
    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    got = lm.logits(ids)
    assert got.shape == ref.shape == (len(ids), 49152)
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)
    # incremental decoding through the cache gives the same last-position logits as one pass
    _, past = lm._step(ids[:-3], lm._empty_past(), 0)
    for k, t in enumerate(ids[-3:]):
        step, past = lm._step([t], past, len(ids) - 3 + k)
    np.testing.assert_allclose(step[-1], got[-1], atol=2e-4, rtol=1e-3)


def test_int8_runs_smaller_and_close_to_fp32(exported):
    e = exported["int8"]
    c = e["checks"]
    fp32_dir, q_dir = Path(exported["fp32"]["path"]), Path(e["path"])
    assert e["type"] == "onnx-int8" and c["runs"] is True
    assert c["model_bytes"] == onnx_model_bytes(q_dir) and c["fp32_model_bytes"] == onnx_model_bytes(fp32_dir)
    assert c["size_ratio_vs_fp32"] == round(c["model_bytes"] / c["fp32_model_bytes"], 4) < 1
    assert c["top1_agreement_vs_fp32"] >= 0.95
    assert abs(c["perplexity_short_text"] / c["fp32_perplexity_short_text"] - 1) < 0.02
    assert json.loads((q_dir / PROVENANCE).read_text())["type"] == "onnx-int8"


def test_int4_matmulnbits(exported, tiny):
    e = export_onnx(tiny, exported["out"] / "onnx-int4", "int4")
    import onnx

    g = onnx.load(str(Path(e["path"]) / "model.onnx")).graph
    big = {i.name for i in g.initializer if np.prod(i.dims) >= 64 * 64}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= {n.op_type for n in g.node}
    # every weight MatMul (lm_head included) and the embedding Gather are quantised; only attention's
    # activation x activation MatMuls stay
    assert not [n.name for n in g.node if n.op_type in ("MatMul", "Gather") and any(i in big for i in n.input)]
    assert e["checks"]["runs"] and e["checks"]["model_bytes"] < exported["int8"]["checks"]["model_bytes"]
    assert e["checks"]["top1_agreement_vs_fp32"] >= 0.9


def _embedding_source(d: Path) -> tuple[str, set]:
    """(what the embedding lookup reads, the initializers bigger than one 64 x 64 matrix) of d/model.onnx."""
    import onnx

    g = onnx.load(str(d / "model.onnx")).graph
    made_by = {o: n for n in g.node for o in n.output}
    look = next(n for n in g.node if n.op_type in ("Gather", "GatherBlockQuantized") and "input_ids" in n.input)
    src = made_by.get(look.input[0])
    return (f"{look.op_type}<-{src.op_type}({src.input[0]})" if src else f"{look.op_type}<-{look.input[0]}",
            {i.name for i in g.initializer if np.prod(i.dims) > 64 * 64})


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_tied_embedding_table_is_stored_once(exported, tiny, tokenizer_dir, tmp_path, quant):
    """Tied: the embedding lookup gathers the lm_head's quantised blocks (GatherBlockQuantized on a Reshape of the
    MatMulNBits weight), so the vocabulary table is in the file once; the export still agrees with fp32. Untied:
    the embedding keeps its own quantised table."""
    tied = export_onnx(tiny, exported["out"] / f"onnx-{quant}-shared", quant)
    src, big = _embedding_source(Path(tied["path"]))
    assert tied["checks"]["shared_embedding"] == 1 and src == f"GatherBlockQuantized<-Reshape(model.embed_tokens.weight_untied_T_Q{quant[-1]})"
    q = f"model.embed_tokens.weight_untied_T_Q{quant[-1]}"
    assert q in big and {n for n in big if "embed_tokens" in n} <= {q, "model.embed_tokens.weight_untied_T_scales"}, big
    assert tied["checks"]["top1_agreement_vs_fp32"] >= 0.9
    untied_dir = make_tiny_llama(tmp_path / "untied", tokenizer_dir, tie=False)
    untied = export_onnx(untied_dir, tmp_path / f"onnx-{quant}", quant)
    src, big = _embedding_source(Path(untied["path"]))
    assert untied["checks"]["shared_embedding"] == 0 and "untied_T" not in src and "embed_tokens" in src
    # a random untied head has near-flat logits: 4 bits on both tables flip more argmaxes (measured 0.77)
    assert untied["checks"]["top1_agreement_vs_fp32"] >= (0.9 if quant == "int8" else 0.6)
    assert tied["checks"]["model_bytes"] < 0.75 * untied["checks"]["model_bytes"]  # the 49152 x 64 table once, not twice


def test_quant_refuses_a_foreign_fp32_dir(exported, tiny, tmp_path):
    with pytest.raises(EdgesmithError, match="not an fp32 ONNX export"):
        export_onnx(tiny, tmp_path / "onnx-int8", "int8", fp32_dir=Path(exported["int8"]["path"]))
    with pytest.raises(EdgesmithError, match="expected one of int8, int4"):
        export_onnx(tiny, tmp_path / "x", "int3")
    assert not (tmp_path / "x").exists() and not (tmp_path / "onnx-int8").exists()


def test_onnxlm_errors_are_one_line(tmp_path):
    with pytest.raises(EdgesmithError, match="no .onnx model"):
        OnnxLM(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(EdgesmithError, match="onnxruntime cannot load it"):
        OnnxLM(tmp_path)


def test_chat_template_and_streaming(exported, tokenizer_dir):
    from transformers import AutoTokenizer

    lm = OnnxLM(exported["fp32"]["path"])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for conv in ([{"role": "user", "content": "Hi"}],
                 [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                  {"role": "user", "content": "Q2"}]):
        assert lm.apply_chat_template(conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert lm.tokenize(lm.apply_chat_template(conv), add_special_tokens=False) == tok.apply_chat_template(conv, add_generation_prompt=True)
    buf = io.StringIO()
    text, finish = lm.chat([{"role": "user", "content": "hello"}], max_new_tokens=6, stream=buf)
    assert finish == "length" and buf.getvalue() == text  # a random model never ends its turn in 6 tokens
    assert render_chat_template("{{ bos_token }}{{ messages[0]['content'] }}", [{"role": "user", "content": "x"}],
                                special={"bos_token": "<s>"}) == "<s>x"


def test_onnxlm_needs_no_torch(exported):
    """Device installs have onnxruntime + tokenizers but no torch/transformers."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from edgesmith.export.onnx_runtime import OnnxLM\n"
            f"lm = OnnxLM({str(exported['fp32']['path'])!r}, threads=1)\n"
            "ids = lm.tokenize('Hello'); out = lm.generate(ids, 4, eos_ids=())\n"
            "print(len(out), lm.logits(ids).shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "4"


def test_edgesmith_chat_on_an_onnx_dir(exported):
    r = subprocess.run([sys.executable, "-m", "edgesmith", "chat", exported["fp32"]["path"], "--prompt", "hi",
                        "--max-new-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "finish reason 'length'" in r.stderr


@pytest.mark.slow
def test_default_model_onnx_fp32_int8_int4(default_hf, shared_data, tmp_path_factory):
    """The real SmolLM2-135M: fp32 greedy parity (3 prompts x 32 tokens, inside export_onnx), int8 < 40%
    and int4 < 25% of fp32, and their WikiText-2 perplexity on a short window next to fp32's."""
    out = tmp_path_factory.mktemp("onnx-default")
    fp32 = export_onnx(default_hf, out / "onnx")
    assert fp32["checks"]["parity_ok"]
    int8 = export_onnx(default_hf, out / "onnx-int8", "int8")
    int4 = export_onnx(default_hf, out / "onnx-int4", "int4", check=False)
    assert int8["checks"]["size_ratio_vs_fp32"] < 0.40 and int8["checks"]["size_ratio_ok"]
    assert int4["checks"]["size_ratio_vs_fp32"] < 0.25 and int4["checks"]["size_ratio_ok"]
    text = (shared_data / "lm" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    ppl = {}
    for name, e in (("fp32", fp32), ("int8", int8), ("int4", int4)):
        lm = OnnxLM(e["path"])
        ids = lm.tokenize(text)[:512]
        ppl[name] = lm.perplexity(ids)
    print("wikitext-2 perplexity (first 512 tokens):", {k: round(v, 3) for k, v in ppl.items()},
          "size ratios:", int8["checks"]["size_ratio_vs_fp32"], int4["checks"]["size_ratio_vs_fp32"])
    assert ppl["int8"] < ppl["fp32"] * 1.03
    assert ppl["int4"] < ppl["fp32"] * 1.5
