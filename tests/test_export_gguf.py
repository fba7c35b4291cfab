"""GGUF export: llama.cpp's converter + quantiser on odd/pruned shapes (tiny random Llamas, fast) and
fidelity of the real default model's export (slow: tokenisation, logits, perplexity, chat, sizes).

Every conversion is done once per module (fixtures) because each one runs llama.cpp's converter."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgesmith.errors import EdgesmithError
from edgesmith import llamacpp
from edgesmith.export import gguf_checks, gguf_convert, imatrix, quantize
from edgesmith.gguf_read import read as read_gguf
from edgesmith.native import run_isolated

from conftest import make_tiny_llama


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    with torch.inference_mode():
        return m(torch.tensor([ids])).logits[0].float().numpy()


# ---------------------------------------------------------------- fast: names, registry, CLI


def test_type_names_match_llama_cpp_and_bad_names_fail_in_one_line():
    import llama_cpp

    table = quantize.ftype_table()
    for name, value in table.items():
        const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert getattr(llama_cpp, const) == value, name
    assert quantize.parse_types("F16, q4_k_m,Q8_0") == ["F16", "q4_k_m", "Q8_0"]  # kept exactly as given
    with pytest.raises(EdgesmithError) as e:
        quantize.parse_types("F16,Q4_K_XL")
    msg = str(e.value)
    assert "Q4_K_XL" in msg and "Q4_K_M" in msg and "Q5_K_M" in msg and "\n" not in msg


def test_cli_choices_equal_exporters_and_unknown_quant_is_a_cli_error(capsys, tmp_path):
    from edgesmith.cli import COMMANDS, build_parser, main
    from edgesmith.export.cli import EXPORTER_FLAGS
    from edgesmith.export.run import EXPORTERS

    assert COMMANDS["export"] == "edgesmith.export.cli"
    assert set(EXPORTER_FLAGS) == set(EXPORTERS)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["export"]
    flags = {s for a in sub._actions for s in a.option_strings}
    assert set(EXPORTER_FLAGS.values()) <= flags
    rc = main(["export", "default", "--out", str(tmp_path / "x"), "--gguf", "F16,Q9_9"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("edgesmith export: error: gguf: unknown GGUF type 'Q9_9'; valid: F32, F16, Q4_0")
    assert not (tmp_path / "x" / "export.json").exists()


# ---------------------------------------------------------------- tiny odd shapes, through `run`

ODD = dict(hidden=96, intermediate=160, layers=2, heads=3, kv_heads=1, tie=False)


@pytest.fixture(scope="module")
def odd_export(tmp_path_factory, tokenizer_dir, shared_data):
    """hidden 96 / intermediate 160 (neither a multiple of 256; 96 = 3x32), 3 heads / 1 kv head,
    untied embeddings, exported with an imatrix from WikiText, plus Modelfiles."""
    from edgesmith.export.run import ExportConfig, run

    root = tmp_path_factory.mktemp("odd")
    model = make_tiny_llama(root / "model", tokenizer_dir, **ODD)
    calib = root / "calib.txt"
    calib.write_text(" ".join((shared_data / "lm/wikitext-2-raw/wiki.test.raw").read_text().split()[:3000]))
    out = run(ExportConfig(model=str(model), out=str(root / "out"), name="odd", gguf=["F16", "Q4_0", "Q4_K_M"],
                           modelfile=True, imatrix=str(calib), recipe_hash="0123abcd", threads=2), say=lambda m: None)
    return model, out, json.loads((out / "export.json").read_text())


def test_odd_shapes_layout_file_types_and_checks(odd_export):
    model, out, report = odd_export
    by_type = {e["type"]: e for e in report["files"]}
    assert {"gguf-F16", "gguf-Q4_0", "gguf-Q4_K_M", "imatrix", "modelfile"} <= set(by_type)
    for q in ("F16", "Q4_0", "Q4_K_M"):
        e = by_type[f"gguf-{q}"]
        assert e["path"] == f"odd-{q}.gguf" and (out / e["path"]).stat().st_size == e["size_bytes"]
        assert e["gguf"]["file_type_ok"] and e["gguf"]["file_type_name"] == q
        # loads in llama.cpp, tokenises like HF (incl. a chat with special tokens), finite logits
        assert e["checks"]["loads"] and e["checks"]["tokenizer_ids_match_hf"] and e["checks"]["finite_logits"]
        assert (out / f"Modelfile.{q}").read_text().count(f"FROM ./odd-{q}.gguf") == 1
    assert report["all_checks_ok"] and not any(e["failed_checks"] for e in report["files"])
    for q in ("F16", "Q4_0", "Q4_K_M"):  # provenance survives quantisation
        fields = read_gguf(out / f"odd-{q}.gguf").fields
        assert fields["edgesmith.recipe_hash"] == "0123abcd" and fields["edgesmith.source_model"] == str(model)
        assert fields["general.name"] == "odd" and fields["tokenizer.ggml.eot_token_id"] == 2
    assert report["recipe_hash"] == "0123abcd"
    tm = by_type["gguf-F16"]["checks"]["tokenizer_metadata"]
    assert tm["ok"] and tm["pre_tokenizer"] == "smollm" and tm["tokenizer_model"] == "gpt2"
    assert not list(out.glob(".*")), "temporary files left behind"


def test_odd_shapes_fallbacks_are_reported_with_their_widths(odd_export):
    _, out, report = odd_export
    q4k = next(e for e in report["files"] if e["type"] == "gguf-Q4_K_M")["gguf"]
    fb = q4k["fallbacks"]
    # every 2-D weight has rows of 96 or 160 values: no K-quant block (256) fits, llama.cpp says so
    assert fb["count"] >= 2 * 7 and set(fb["widths"]) <= {96, 160} and 96 in fb["widths"]
    assert "Q4_K" not in q4k["tensor_types"] and "Q5_0" in q4k["tensor_types"]
    tensors = read_gguf(out / "odd-Q4_K_M.gguf").tensors
    assert sum(t["type"] not in ("F32",) for t in tensors) >= fb["count"]
    warn = gguf_checks.fallback_warning("odd-Q4_K_M.gguf", q4k)
    assert "96" in warn and "256" in warn
    # 32-wide blocks fit 96 and 160: Q4_0 keeps its own type for the layer weights
    q40 = next(e for e in report["files"] if e["type"] == "gguf-Q4_0")["gguf"]
    assert q40["tensor_types"].get("Q4_0", 0) >= 2 * 7


def test_odd_shapes_imatrix_is_llama_cpp_format_and_used(odd_export):
    _, out, report = odd_export
    data, info = imatrix.load_imatrix(out / "odd.imatrix.gguf")
    assert info["chunk_count"] >= 1 and info["datasets"] == ["calib.txt"]
    tensors = read_gguf(out / "odd-F16.gguf").tensors
    ne0 = {t["name"]: t["shape"][0] for t in tensors}
    # one entry per linear layer (7 per block + output), each as long as the tensor's rows
    assert len(data) == 2 * 7 + 1 and all(ne0[k] == v.size for k, v in data.items())
    assert all((v > 0).all() for v in data.values())
    for q in ("Q4_0", "Q4_K_M"):
        e = next(e for e in report["files"] if e["type"] == f"gguf-{q}")
        # llama.cpp took every entry; only the embedding lookup has none (as with llama-imatrix's own files)
        assert e["gguf"]["imatrix"] == {"entries": len(data), "tensors_without_data": ["token_embd.weight"]}
        fields = read_gguf(out / e["path"]).fields
        assert fields["quantize.imatrix.entries_count"] == len(data)


def test_odd_shapes_f16_logits_match_hf_fp32(odd_export):
    model, out, _ = odd_export
    tok = gguf_checks.hf_tokenizer(model)
    ids = tok("The quick brown fox jumps over the lazy dog. 1234567 café 🤖", add_special_tokens=False)["input_ids"]
    ref = hf_logits(model, ids)
    got = run_isolated(llamacpp.logits, str(out / "odd-F16.gguf"), ids, 2, what="llama.cpp logits")
    assert got.shape == ref.shape
    # F16 weights: differences are rounding-sized compared with the spread of the logits
    assert np.abs(got - ref).max() < 0.05 * ref.std() + 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() == 1.0


@pytest.mark.slow  # ~25 s idle (an ONNX export + 3 GGUF files + checks): the layout `make export` relies on
def test_full_set_side_by_side_lists_every_file_in_export_json(tmp_path, tiny_llama):
    """What `make export` writes (GGUF + quants, ONNX fp32 + int8, Modelfiles), with the GGUF and ONNX halves
    and two quantisations running side by side (jobs=2): every file on disk is in export.json with its real
    size, its type and the checks it passed."""
    from edgesmith.export.run import ExportConfig, run

    out = run(ExportConfig(model=str(tiny_llama), out=str(tmp_path / "out"), name="t", gguf=["F16", "Q4_0", "Q8_0"],
                           onnx=True, onnx_quant=["int8"], modelfile=True, threads=1, jobs=2), say=lambda m: None)
    report = json.loads((out / "export.json").read_text())
    types = [e["type"] for e in report["files"]]
    assert types == ["gguf-F16", "gguf-Q4_0", "gguf-Q8_0", "onnx-fp32", "onnx-int8"] + ["modelfile"] * 3
    failed = {e["path"]: e["failed_checks"] for e in report["files"] if e["failed_checks"]}
    # a 64-wide toy is mostly graph and layer norms, so its int8 file misses the < 40% size target (the real
    # model meets it: tests/test_export_onnx.py::test_default_model_onnx_fp32_int8_int4); everything else passes
    assert failed in ({}, {"onnx-int8": ["size_ratio_ok"]}), failed
    assert report["settings"]["onnx_quant"] == ["int8"]
    on_disk = {p.name for p in out.iterdir()} - {"export.json"}
    assert on_disk == {e["path"] for e in report["files"]}
    for e in report["files"]:
        p = out / e["path"]
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        assert e["size_bytes"] == size and e["checks"], e["path"]
    assert report["files"][3]["checks"]["parity_ok"] and report["files"][4]["checks"]["runs"]
    assert all(report["files"][i]["checks"]["tokenizer_ids_match_hf"] for i in range(3))


# ---------------------------------------------------------------- pruned-like shapes + a LoRA adapter


def test_pruned_shapes_from_a_lora_adapter_merge_convert_and_match(tmp_path, tokenizer_dir):
    """Heads pruned (2 heads x 32 = 64 != hidden 96, GQA 2:1 kept), 1 layer, intermediate 64; given as
    a LoRA adapter directory, which export merges in float32 before converting."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgesmith.export.run import ExportConfig, run

    base = make_tiny_llama(tmp_path / "base", tokenizer_dir, hidden=96, intermediate=64, layers=1, heads=2,
                           kv_heads=1, head_dim=32, tie=True)
    torch.manual_seed(1)
    m = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                              init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    out = run(ExportConfig(model=str(tmp_path / "adapter"), out=str(tmp_path / "out"), name="pruned",
                           gguf=["F16"], check=False), say=lambda m: None)
    report = json.loads((out / "export.json").read_text())
    assert [e["path"] for e in report["files"]] == ["pruned-F16.gguf"]
    assert "adapter merged" in report["model"] and not list(out.glob(".merged-*"))
    fields = read_gguf(out / "pruned-F16.gguf").fields
    assert fields["llama.attention.head_count"] == 2 and fields["llama.attention.head_count_kv"] == 1
    assert fields["llama.attention.key_length"] == 32 and fields["llama.embedding_length"] == 96
    assert fields["llama.block_count"] == 1 and fields["llama.feed_forward_length"] == 64
    assert fields["general.name"] == "pruned" and str(tmp_path / "adapter") in fields["edgesmith.source_model"]
    # reference: the same adapter merged by peft in the test
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                       str(tmp_path / "adapter")).merge_and_unload()
    ids = gguf_checks.hf_tokenizer(base)("Pruned models still speak: 42 tokens, more or less.", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        ref = merged(torch.tensor([ids])).logits[0].numpy()
    base_ref = hf_logits(base, ids)
    got = run_isolated(llamacpp.logits, str(out / "pruned-F16.gguf"), ids, 2, what="llama.cpp logits")
    assert np.abs(got - ref).max() < 0.05 * ref.std() + 1e-3
    assert np.abs(got - base_ref).max() > 10 * np.abs(got - ref).max(), "the adapter was not merged"


def test_lora_adapter_exports_as_gguf_lora_that_llama_cpp_applies(tmp_path, tokenizer_dir):
    """`edgesmith export ADAPTER --gguf-lora --gguf none`: llama.cpp's convert_lora_to_gguf writes the adapter
    alone; llama.cpp loading the base F16 GGUF with lora_path= reproduces peft's merged model."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgesmith.cli import main

    base = make_tiny_llama(tmp_path / "base", tokenizer_dir, hidden=64, intermediate=128, layers=2, heads=4,
                           kv_heads=2, tie=True)
    torch.manual_seed(2)
    m = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    get_peft_model(m, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                 init_lora_weights=False)).save_pretrained(str(tmp_path / "adapter"))
    rc = main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "out"), "--name", "tiny",
               "--gguf", "none", "--gguf-lora"])  # base taken from adapter_config.json
    assert rc == 0
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    (e,) = report["files"]
    assert e["path"] == "tiny-lora-F16.gguf" and e["type"] == "gguf-lora-F16" and e["lora_alpha"] == 16
    assert e["checks"]["ok"] and e["checks"]["lora_tensor_pairs"] == 2 * 4 and not e["failed_checks"]
    assert not list((tmp_path / "out").glob(".*")), "temporary files left behind"
    base_gguf = gguf_convert.convert(base, tmp_path / "base-F16.gguf", "F16", "base")
    ids = gguf_checks.hf_tokenizer(base)("Adapters ride on any quant of their base: 12 tokens or so.", add_special_tokens=False)["input_ids"]
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                       str(tmp_path / "adapter")).merge_and_unload()
    with torch.inference_mode():
        ref = merged(torch.tensor([ids])).logits[0].numpy()
    got = run_isolated(llamacpp.logits, str(base_gguf), ids, 2, str(tmp_path / "out" / e["path"]), what="llama.cpp + LoRA")
    plain = run_isolated(llamacpp.logits, str(base_gguf), ids, 2, what="llama.cpp logits")
    assert np.abs(got - ref).max() < 0.05 * ref.std() + 1e-3
    assert np.abs(plain - ref).max() > 10 * np.abs(got - ref).max(), "the adapter was not applied"


def test_gguf_lora_needs_an_adapter_dir(tmp_path, tiny_llama):
    from edgesmith.export.run import ExportConfig

    with pytest.raises(EdgesmithError, match="gguf_lora.*adapter"):
        ExportConfig(model=str(tiny_llama), out=str(tmp_path), gguf_lora=True)


# ---------------------------------------------------------------- the real default model (slow)


@pytest.fixture(scope="module")
def default_export(tmp_path_factory, default_hf):
    from edgesmith.export.run import ExportConfig, run

    out = run(ExportConfig(model="default", out=str(tmp_path_factory.mktemp("default")),
                           gguf=["F16", "Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0"], recipe_hash="feedbeef", threads=2),
              say=lambda m: None)
    return out, json.loads((out / "export.json").read_text())


def _wiki_lines(shared_data: Path, n: int) -> list[str]:
    lines = [ln.rstrip("\n") for ln in (shared_data / "lm/wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln.strip()][:n]


@pytest.mark.slow
def test_default_sizes_order_file_types_and_metadata(default_export):
    out, report = default_export
    assert report["all_checks_ok"], [e["failed_checks"] for e in report["files"]]
    size = {e["type"][5:]: e["size_bytes"] for e in report["files"] if e["type"].startswith("gguf-")}
    assert size["Q4_0"] < size["Q4_K_M"] < size["Q5_K_M"] < size["Q8_0"] < size["F16"]
    for q in size:
        fields = read_gguf(out / f"smollm2-135m-instruct-{q}.gguf").fields
        assert fields["general.file_type"] == quantize.ftype_table()[q]
        assert fields["general.name"] == "smollm2-135m-instruct" and fields["general.size_label"] == "135M"
        assert fields["general.license"] == "apache-2.0" and fields["edgesmith.source_model"] == "default"
        assert fields["edgesmith.recipe_hash"] == "feedbeef" and fields["edgesmith.version"]
    f16 = gguf_checks.tokenizer_fields(out / "smollm2-135m-instruct-F16.gguf")
    src = gguf_checks.tokenizer_fields(gguf_convert._source_gguf(Path(report["hf_dir"])))
    # faithful tokenizer: the converter recognised SmolLM2's pre-tokenizer and reproduced the vocabulary
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
              "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert f16.get(k) == src.get(k), k
    assert f16["tokenizer.ggml.pre"] == "smollm" and f16["tokenizer.ggml.eot_token_id"] == 2
    q4k = next(e for e in report["files"] if e["type"] == "gguf-Q4_K_M")["gguf"]["fallbacks"]
    assert q4k["count"] > 0 and q4k["widths"] == [576]


@pytest.mark.slow
def test_default_tokenisation_matches_hf_on_wikitext_and_chat(default_export, default_hf, shared_data):
    out, _ = default_export
    tok = gguf_checks.hf_tokenizer(default_hf)
    texts = _wiki_lines(shared_data, 200)
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi <b>there</b> 🤖"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count: 1 2 3"}],
    ]
    texts += [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    ref = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    got = run_isolated(llamacpp.tokenize, str(out / "smollm2-135m-instruct-F16.gguf"), texts, what="llama.cpp tokenize")
    bad = [t for t, a, b in zip(texts, ref, got) if a != b]
    assert not bad, f"{len(bad)} texts differ, first: {bad[0]!r}"
    assert got[-1][0] == 1 and 2 in got[-1]  # <|im_start|> / <|im_end|> parsed as single special tokens


@pytest.mark.slow
def test_default_f16_top1_agreement_and_perplexity_match_hf(default_export, default_hf, shared_data):
    import torch
    from transformers import AutoModelForCausalLM

    out, _ = default_export
    tok = gguf_checks.hf_tokenizer(default_hf)
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "In 1869, the Suez Canal",
               tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=False,
                                       add_generation_prompt=True),
               " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor ."]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids = tok("\n".join(_wiki_lines(shared_data, 400)), add_special_tokens=False)["input_ids"]
    windows = [ids[i * 512:(i + 1) * 512] for i in range(3)]
    m = AutoModelForCausalLM.from_pretrained(str(default_hf), dtype=torch.float32, local_files_only=True).eval()
    with torch.inference_mode():
        ref = [m(torch.tensor([w])).logits[0] for w in prompt_ids + windows]
    got = run_isolated(llamacpp.score, str(out / "smollm2-135m-instruct-F16.gguf"), prompt_ids + windows, 2,
                       what="llama.cpp scoring")
    agree = [a == b for r, g in zip(ref[:5], got[:5]) for a, b in zip(r.argmax(-1).tolist(), g["argmax"])]
    assert sum(agree) / len(agree) >= 0.99, f"top-1 agreement {sum(agree)}/{len(agree)}"
    hf_nll = [torch.nn.functional.cross_entropy(r[:-1], torch.tensor(w[1:]), reduction="none").tolist()
              for r, w in zip(ref[5:], windows)]
    ppl_hf = math.exp(np.mean(np.concatenate(hf_nll)))
    ppl_gguf = math.exp(np.mean(np.concatenate([g["nll"] for g in got[5:]])))
    assert abs(ppl_gguf / ppl_hf - 1) < 0.01, (ppl_hf, ppl_gguf)


@pytest.mark.slow
def test_default_q8_0_chat_says_paris_and_stops_on_end_of_turn(default_export):
    """Greedy chat through llama.cpp with the GGUF's own template stops on <|im_end|> (finish 'stop').

    With the template's *default* system prompt the first answer token is a near tie in HF fp32
    ("The" -1.88 vs "L" -1.96 nats): F16 follows HF ("The capital of France is Paris."), while Q8_0
    (WikiText perplexity +0.14% vs F16) and the shipped Q4_1 source GGUF flip it and ramble. So the
    Q8_0 file is asked with an explicit system prompt, where the margin is 0.46 nats."""
    out, _ = default_export
    q = [{"role": "user", "content": "What is the capital of France?"}]
    f16 = run_isolated(llamacpp.chat, str(out / "smollm2-135m-instruct-F16.gguf"), q, 64, what="llama.cpp chat")
    q8 = run_isolated(llamacpp.chat, str(out / "smollm2-135m-instruct-Q8_0.gguf"),
                      [{"role": "system", "content": "You are a helpful assistant."}] + q, 64, what="llama.cpp chat")
    for r in (f16, q8):
        assert "Paris" in r["text"] and r["finish_reason"] == "stop", r
        assert "<|im_end|>" not in r["text"] and "<|im_start|>" not in r["text"]
