"""Vocabulary trimming (`edgesmith trim-vocab`, compress/vocab.py) on a tiny random Llama with the real SmolLM2
byte-level BPE tokenizer (seconds). What is proved: text built only from kept tokens, not just the corpus, tokenises
exactly as before (renumbered); text outside still tokenises and decodes back to itself; the trimmed model's logits
are the original's restricted to the kept ids; the files are consistent (config, generation config, tokenizer
config). The SentencePiece path (Gemma 3's tokenizer.model, llama.cpp's tokeniser on the exported GGUF) runs on the
real Gemma 3 270M in tests/test_gemma3_real.py."""
from __future__ import annotations

import json
import random

import pytest
import torch

from edgesmith.compress.vocab import bpe_path, path_closure

CORPUS = [
    "The river flows past the old mill and the bridge, where children play in the summer.",
    "A recipe: mix two cups of flour with one egg, then bake it for twenty minutes at 180 degrees.",
    "Question: what is the capital of France?\nAnswer: Paris is the capital of France.",
    "def add(a, b):\n    return a + b  # small functions are easy to test",
    "Numbers like 1,024 and 3.14 appear in text; so do dates such as 2026-12-02.",
]


def test_bpe_path_takes_the_lowest_rank_merge_first():
    ranks = {("b", "c"): 0, ("a", "b"): 1, ("a", "bc"): 2, ("abc", "d"): 3}
    # "bc" is made before "ab" could be: the path to "abcd" never passes through "ab"
    assert bpe_path("abcd", ranks) == {"a", "b", "c", "d", "bc", "abc", "abcd"}
    vocab = {t: i for i, t in enumerate(["a", "b", "c", "d", "ab", "bc", "abc", "abcd", "zz"])}
    assert path_closure(vocab, ranks, [vocab["abcd"]]) == {vocab[t] for t in ("a", "b", "c", "d", "bc", "abc", "abcd")}


@pytest.fixture
def trimmed(tmp_path, tiny_llama):
    from edgesmith.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS) + "\n", encoding="utf-8")
    out = tmp_path / "trimmed"
    assert main(["trim-vocab", str(tiny_llama), "--corpus", str(corpus), "--out", str(out)]) == 0
    return tiny_llama, out


def test_trimmed_tokenizer_is_exact_on_kept_text_and_total_elsewhere(trimmed):
    from edgesmith.modelio import tokenizer_from_dir

    src, out = trimmed
    report = json.loads((out / "trim_report.json").read_text())
    keep = report["old_ids"]
    new_id = {o: n for n, o in enumerate(keep)}
    assert report["vocab"]["before"] == 49152 and report["vocab"]["after"] == len(keep) < 1000
    assert report["checks"]["corpus_tokenisation_equal"] and report["checks"]["texts_checked"] == len(CORPUS)
    a, b = tokenizer_from_dir(src), tokenizer_from_dir(out)
    assert len(b) == len(keep)
    # new texts made of the corpus's words in another order: every original token is kept, so the split is the same
    words = " ".join(CORPUS).split(" ")
    rng = random.Random(0)
    for _ in range(50):
        text = " ".join(rng.sample(words, 12))
        ids = a(text, add_special_tokens=False)["input_ids"]
        if all(i in new_id for i in ids):
            assert b(text, add_special_tokens=False)["input_ids"] == [new_id[i] for i in ids], text
    # outside the domain: longer, but it still tokenises and decodes back
    for text in ("Zwölf Boxkämpfer jagen Viktor", "日本語 🤖 xylophone quartz"):
        ids = b(text, add_special_tokens=False)["input_ids"]
        assert b.decode(ids) == text and len(ids) >= len(a(text, add_special_tokens=False)["input_ids"])
    assert b.convert_tokens_to_ids(b.eos_token) == new_id[a.eos_token_id]


def test_trimmed_model_logits_are_the_originals_on_kept_ids(trimmed):
    from transformers import AutoModelForCausalLM

    from edgesmith.modelio import tokenizer_from_dir

    src, out = trimmed
    keep = json.loads((out / "trim_report.json").read_text())["old_ids"]
    new_id = {o: n for n, o in enumerate(keep)}
    a = tokenizer_from_dir(src)
    ids = a(CORPUS[2])["input_ids"]
    m0 = AutoModelForCausalLM.from_pretrained(src).eval()
    m1 = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.inference_mode():
        ref = m0(torch.tensor([ids])).logits[0][:, keep]
        got = m1(torch.tensor([[new_id[i] for i in ids]])).logits[0]
    assert torch.equal(ref, got)
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert cfg["vocab_size"] == len(keep) and m1.get_input_embeddings().weight.shape == (len(keep), 64)
    assert (cfg["eos_token_id"], gen["eos_token_id"], gen["bos_token_id"]) == (new_id[2], new_id[2], new_id[1])
    assert not (out / "vocab.json").exists() and not (out / "merges.txt").exists()  # they would describe the old ids


def test_trim_needs_a_corpus_and_a_bpe_tokenizer(tmp_path, tiny_llama, capsys):
    from edgesmith.cli import main

    assert main(["trim-vocab", str(tiny_llama), "--out", str(tmp_path / "o")]) == 2
    assert "corpus" in capsys.readouterr().err
    tj = json.loads((tiny_llama / "tokenizer.json").read_text())
    tj["model"]["type"] = "WordPiece"
    (tiny_llama / "tokenizer.json").write_text(json.dumps(tj))
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n")
    assert main(["trim-vocab", str(tiny_llama), "--corpus", str(corpus), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "WordPiece" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_trimmed_gguf_tokenises_and_predicts_like_the_trimmed_hf_model(trimmed, tmp_path):
    """Byte-level BPE through llama.cpp's converter (its pre-tokenizer is recognised by the vocabulary's hash, which
    trimming changes: the source GGUF's name is used) and llama.cpp's tokeniser and F32 logits."""
    import numpy as np

    from edgesmith import llamacpp
    from edgesmith.cli import main
    from edgesmith.modelio import tokenizer_from_dir
    from edgesmith.native import run_isolated

    src, out = trimmed
    exp = tmp_path / "export"
    assert main(["export", str(out), "--out", str(exp), "--gguf", "F32"]) == 0
    manifest = json.loads((exp / "export.json").read_text())
    assert manifest["all_checks_ok"], [e.get("failed_checks") for e in manifest["files"]]
    gguf = str(next(exp.glob("*-F32.gguf")))
    tok = tokenizer_from_dir(out)
    texts = CORPUS + ["Zwölf Boxkämpfer jagen Viktor", "日本語 🤖 xylophone quartz"]
    assert run_isolated(llamacpp.tokenize, gguf, texts) == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = tok(CORPUS[0])["input_ids"]
    from transformers import AutoModelForCausalLM

    with torch.inference_mode():
        hf = AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor([ids])).logits[0].numpy()
    lc = run_isolated(llamacpp.logits, gguf, ids, threads=1)
    assert lc.shape == hf.shape and np.abs(lc - hf).max() < 1e-3
