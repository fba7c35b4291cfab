"""edgesmith bench / report: the same numbers on every backend (HF, GGUF via llama.cpp, ONNX via
onnxruntime) for one model, llama-perplexity's windowing, task plug-ins, results schema, report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from edgesmith.bench import harness as H
from edgesmith.bench import metrics as M
from edgesmith.bench.tasks import TASKS, parse_tasks
from edgesmith.errors import EdgesmithError
from edgesmith.native import run_isolated

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- pure pieces


def test_cli_task_choices_equal_registry_keys():
    from edgesmith.cli import build_parser

    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["bench"].format_help().split())
    listed = help_text.split("comma-separated:")[1].split(", or FILE.jsonl")[0]
    assert [t.strip() for t in listed.split(",")] == list(TASKS)
    assert parse_tasks("arc_easy,piqa") == ["arc_easy", "piqa"]
    with pytest.raises(EdgesmithError, match="unknown task 'hellaswag'"):
        parse_tasks("hellaswag")


def test_ppl_windows_follow_llama_perplexity():
    toks = list(range(10, 10 + 1000))
    w = M.ppl_windows(toks, 256, None, add_bos=False, bos_id=1)
    assert len(w) == 3 and w[1][0] == 266 and all(len(x) == 256 for x in w)  # non-overlapping, remainder dropped
    assert M.ppl_windows(toks, 256, 2, add_bos=True, bos_id=1)[1][0] == 1  # bos replaces token 0 of each window
    with pytest.raises(EdgesmithError, match="at least ctx"):
        M.ppl_windows(toks[:100], 256, None, False, None)


def test_kl_and_logsoftmax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 50))
    lp = M.log_softmax(x)
    assert np.allclose(np.exp(lp).sum(-1), 1)
    kl, top = M.kl_top1(lp, lp)
    assert np.allclose(kl, 0) and top.all()
    kl2, _ = M.kl_top1(lp, M.log_softmax(x + rng.normal(size=x.shape)))
    assert (kl2 > 0).all()


def test_tasks_load_real_formats(shared_data, tmp_path):
    from edgesmith.bench import tasks as T

    for name in TASKS:
        items = T.get(name).load(shared_data, 3)
        assert len(items) == 3, name
        if T.get(name).KIND == "mc":
            assert all(0 <= it["gold"] < len(it["pairs"]) for it in items)
    wino = T.get("winogrande").load(shared_data, 1)[0]
    assert wino["pairs"][0][1] == wino["pairs"][1][1] and wino["pairs"][0][0] != wino["pairs"][1][0]  # partial scoring
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"query": "Q", "choices": ["a", "b"], "gold": 5}\n')
    with pytest.raises(EdgesmithError, match=r"mine.jsonl: row 1: 'gold'"):
        T.get(str(bad)).load(bad)


# ---------------------------------------------------------------- one tiny model, three backends


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama as HF fp32, GGUF F32 (llama.cpp's converter) and ONNX fp32 (optimum)."""
    from conftest import make_tiny_llama
    from edgesmith.export.gguf_convert import convert
    from edgesmith.export.onnx import export_onnx

    d = tmp_path_factory.mktemp("benchset")
    hf = make_tiny_llama(d / "hf", tokenizer_dir, hidden=64, intermediate=128, layers=2)
    gguf = convert(hf, d / "tiny-F32.gguf", "F32")
    onnx = d / "onnx"
    export_onnx(hf, onnx, check=False)
    return {"hf": hf, "gguf": gguf, "onnx": onnx, "dir": d}


def _text(tmp_path, shared_data) -> Path:
    # ~3 windows of 64 tokens of real English (WikiText-2 raw)
    t = tmp_path / "wiki.txt"
    t.write_text((shared_data / "lm" / "wikitext-2-raw" / "wiki.test.raw").read_text()[:2000])
    return t


def test_same_scores_on_every_backend(tiny_set, shared_data, tmp_path):
    """Same model -> same perplexity (1%), same MC log-likelihoods, on HF, GGUF and ONNX."""
    s = H.resolve_settings(H.BenchSettings(ppl_text=str(_text(tmp_path, shared_data)), ctx=64, max_chunks=3,
                                           tasks=["arc_easy", "winogrande"], data_dir=str(shared_data), limit=8, threads=1))
    res = {k: run_isolated(H.run_artifact, str(tiny_set[k]), asdict(s), what=k) for k in ("hf", "gguf", "onnx")}
    ppl = {k: r["perplexity"]["value"] for k, r in res.items()}
    assert all(r["perplexity"]["chunks"] == 3 and r["perplexity"]["tokens_scored"] == 3 * 31 for r in res.values())
    assert 1000 < ppl["hf"] < 200000  # a random model over a 49k vocabulary
    for k in ("gguf", "onnx"):
        assert abs(ppl[k] - ppl["hf"]) / ppl["hf"] < 0.01, ppl
        for t in ("arc_easy", "winogrande"):
            assert abs(res[k]["tasks"][t]["acc"] - res["hf"]["tasks"][t]["acc"]) <= 0.005, (k, t, res[k]["tasks"], res["hf"]["tasks"])
            assert res[k]["tasks"][t]["n"] == 8
    assert res["gguf"]["backend"] == "gguf" and res["onnx"]["backend"] == "onnx"
    assert 32 <= res["gguf"]["bpw"] < 40  # F32 weights + the tokenizer metadata of a 3M-param model


def test_continuation_loglik_equals_the_sum_over_one_full_pass(tiny_set):
    from edgesmith.bench.backends import open_lm

    lm = open_lm(tiny_set["onnx"], threads=1)
    ctx, cont = "Question: What is the capital of France?\nAnswer:", " Paris"
    ll = M.continuation_loglik(lm, ctx, cont)
    whole = lm.encode(ctx + cont)
    lp = M.log_softmax(lm.logits(whole))
    n = len(lm.encode(ctx))
    expected = sum(lp[i - 1, whole[i]] for i in range(n, len(whole)))
    assert ll == pytest.approx(expected, rel=1e-6) and ll < 0


def test_cli_bench_export_dir_agreement_latency_and_report(tiny_set, shared_data, tmp_path):
    """End to end through the CLI: an export dir expands to its artifacts, each in its own child;
    the reference agrees with itself exactly; JSON schema 1; report writes markdown + PNGs."""
    exp = tmp_path / "export"
    exp.mkdir()
    (exp / "export.json").write_text(json.dumps({"artifacts": [{"path": str(tiny_set["gguf"]), "type": "gguf-F32"},
                                                               {"path": str(tiny_set["onnx"]), "type": "onnx-fp32"}]}))
    out = tmp_path / "r.json"
    cmd = [str(REPO / ".venv/bin/edgesmith"), "bench", str(exp), "--ppl-text", str(_text(tmp_path, shared_data)),
           "--ctx", "64", "--max-chunks", "2", "--tasks", "copa", "--limit", "4", "--data-dir", str(shared_data),
           "--reference", str(tiny_set["gguf"]), "--agree-chunks", "2", "--latency", "--repeat", "2", "--threads", "1",
           "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["settings"]["ctx"] == 64 and doc["machine"]["cores"] >= 1
    assert [r["backend"] for r in doc["results"]] == ["gguf", "onnx"]
    g, o = doc["results"]
    assert g["agreement"]["kl"] == pytest.approx(0, abs=1e-6) and g["agreement"]["top1"] == 1.0
    assert o["agreement"]["kl"] < 1e-3 and o["agreement"]["top1"] > 0.95 and o["agreement"]["positions"] == 2 * 31
    for r in (g, o):
        lat = r["latency"]
        assert lat["threads"] == 1 and lat["repeat"] == 2 and lat["decode_tok_s"] > 0 and lat["prefill_tok_s"] > 0
        assert lat["ttft_ms"] > 0 and lat["peak_rss_mb"] > 10 and lat["load_s"] > 0
        assert set(r["tasks"]["copa"]) >= {"acc", "acc_norm", "n"} and r["file_mb"] > 0
    assert "tg128" in p.stdout and "KL" in p.stdout
    rep = subprocess.run([str(REPO / ".venv/bin/edgesmith"), "report", str(out), "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "tiny-F32" in md and "| onnx |" in md
    for png in ("accuracy_vs_size.png", "decode_vs_size.png", "perplexity_vs_size.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_are_one_line_errors(tmp_path):
    from edgesmith.cli import main

    assert main(["bench", str(tmp_path / "nope.gguf")]) == 2
    f = tmp_path / "x.gguf"
    f.write_text("not a gguf")
    with pytest.raises(EdgesmithError, match="bad magic"):
        H.expand_artifacts([str(f)])
    with pytest.raises(EdgesmithError, match="schema"):
        (tmp_path / "r.json").write_text('{"foo": 1}')
        from edgesmith.bench.report import load_results

        load_results([str(tmp_path / "r.json")])


def test_device_backends_import_no_torch(tiny_set):
    """gguf/onnx scoring must work on `edgesmith[device]` (no torch, no transformers)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'): raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edgesmith.bench.backends import open_lm\n"
        "from edgesmith.bench.metrics import continuation_loglik\n"
        f"for p in [{str(tiny_set['gguf'])!r}, {str(tiny_set['onnx'])!r}]:\n"
        "    lm = open_lm(p, 1); print(continuation_loglik(lm, 'The cat', ' sat')); lm.close()\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = map(float, p.stdout.split()[-2:])
    assert a == pytest.approx(b, rel=1e-3)


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_default_model_hf_gguf_f16_onnx_agree(default_hf, shared_data, tmp_path):
    """SmolLM2-135M: HF fp32, GGUF F16 and ONNX fp32 within 1% perplexity and 0.5 points MC."""
    from edgesmith.export.gguf_convert import convert
    from edgesmith.export.onnx import export_onnx

    gguf = convert(default_hf, tmp_path / "smol-F16.gguf", "F16")
    onnx = tmp_path / "onnx"
    export_onnx(default_hf, onnx, check=False)
    s = H.resolve_settings(H.BenchSettings(ctx=256, max_chunks=2, tasks=["arc_easy", "piqa"], data_dir=str(shared_data),
                                           limit=20, threads=2))
    res = {k: run_isolated(H.run_artifact, str(p), asdict(s), what=k) for k, p in (("hf", default_hf), ("gguf", gguf), ("onnx", onnx))}
    ppl = {k: r["perplexity"]["value"] for k, r in res.items()}
    assert 5 < ppl["hf"] < 60, ppl
    for k in ("gguf", "onnx"):
        assert abs(ppl[k] - ppl["hf"]) / ppl["hf"] < 0.01, ppl
        for t in ("arc_easy", "piqa"):
            # per-choice log-likelihoods agree within a tolerance; a changed choice is accepted only where
            # HF's own margin between the two choices is inside that tolerance (F16 kernels differ by CPU:
            # AVX-512 flips near-ties that AVX2 does not, so bit-identical choices are not a property)
            for i, (a, b) in enumerate(zip(res["hf"]["tasks"][t]["logliks"], res[k]["tasks"][t]["logliks"])):
                a, b = np.array(a), np.array(b)
                tol = 0.02 + 0.002 * np.abs(a)                     # nats: fp16 rounding grows with length
                assert np.all(np.abs(a - b) <= tol), (k, t, i, a, b)
                if a.argmax() != b.argmax():
                    pair = [a.argmax(), b.argmax()]
                    assert abs(a[pair[0]] - a[pair[1]]) <= tol[pair].sum(), (k, t, i, a, b)
    assert res["hf"]["tasks"]["arc_easy"]["acc"] > 0.3  # better than chance (25%) on 20 items


@pytest.mark.slow
def test_multiple_choice_equals_lm_evaluation_harness(default_hf, shared_data, tmp_path, monkeypatch):
    """The first 200 items of ARC-Easy and PIQA on the default model through lm-eval's own HF model and a local-file
    task with the same prompt: the same predicted choice on every item (acc and acc_norm), every choice's
    log-likelihood within 1e-4 relative (lm-eval's log-softmax is float32, ours float64)."""
    lm_eval = pytest.importorskip("lm_eval") if not os.environ.get("CI") else __import__("lm_eval")
    from lm_eval.models.huggingface import HFLM as LMEvalHF
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval_tasks import LM_EVAL_TASKS, OURS, write_tasks

    n = 200
    tasks = write_tasks(shared_data, tmp_path, n)
    ref = lm_eval.simple_evaluate(model=LMEvalHF(pretrained=str(default_hf), batch_size=8, device="cpu", dtype="float32"),
                                  tasks=list(LM_EVAL_TASKS), num_fewshot=0, limit=n, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks)))
    s = H.resolve_settings(H.BenchSettings(ppl=False, tasks=["arc_easy", "piqa"], data_dir=str(shared_data), limit=n, threads=2))
    ours = run_isolated(H.run_artifact, str(default_hf), asdict(s), what="hf")["tasks"]
    for mine, theirs in OURS.items():
        samples = sorted(ref["samples"][theirs], key=lambda x: x["doc_id"])
        assert len(samples) == len(ours[mine]["logliks"]) == n
        worst = 0.0
        for smp, ll in zip(samples, ours[mine]["logliks"]):
            want = np.array([float(r[0]) for r in smp["filtered_resps"]])
            got = np.array(ll)
            worst = max(worst, float(np.max(np.abs(got - want) / np.abs(want))))
            assert np.all(np.abs(got - want) <= 1e-4 * np.abs(want)), (mine, smp["doc_id"], got, want)
            assert int(got.argmax()) == int(want.argmax()), (mine, smp["doc_id"])
        for metric in ("acc", "acc_norm"):
            assert ours[mine][metric] == pytest.approx(ref["results"][theirs][f"{metric},none"], abs=1e-9), (mine, metric)
        print(f"{mine}: lm-eval parity on {n} items, largest relative log-likelihood gap {worst:.2e}")


@pytest.mark.slow
def test_default_gguf_generation_task(shared_data):
    """Alpaca generation on the embedded GGUF: real answers that stop at <|im_end|>, scored."""
    from edgesmith.modelio import default_gguf

    s = H.resolve_settings(H.BenchSettings(ppl=False, tasks=["alpaca"], data_dir=str(shared_data), limit=2,
                                           gen_max_new_tokens=96, threads=2))
    r = run_isolated(H.run_artifact, str(default_gguf()), asdict(s), what="gguf")
    a = r["tasks"]["alpaca"]
    assert a["n"] == 2 and a["mean_output_tokens"] > 3 and a["rougeL"] > 0.02
    assert a["success_rate"] in (0.0, 0.5, 1.0)  # the fraction of the 2 answers that stopped on their own


def test_user_jsonl_generation_rows_and_task_files(tmp_path, shared_data):
    """A user's .jsonl may hold generation rows (Alpaca or chat style, e.g. `data prepare`'s test.jsonl);
    every built-in plug-in names the data files it reads (what --remote copies)."""
    from edgesmith.bench import tasks as T
    from edgesmith.bench.remote import Remote, task_files

    f = tmp_path / "gen.jsonl"
    f.write_text('{"instruction": "Name a primary color.", "input": "", "output": "Red."}\n'
                 '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n')
    items = T.get(str(f)).load(f)
    assert [it["reference"] for it in items] == ["Red.", "Hello!"] and items[1]["messages"] == [{"role": "user", "content": "Hi"}]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(f.read_text().splitlines()[0] + '\n{"query": "Q", "choices": ["a", "b"], "gold": 0}\n')
    with pytest.raises(EdgesmithError, match="mixes multiple-choice and generation"):
        T.get(str(mixed)).load(mixed)
    for name in TASKS:
        files = task_files(name, str(shared_data))
        assert files and all(p.is_file() and rel.startswith("data/") for p, rel in files), name
    assert task_files(str(f), None) == [(f, "tasks/gen.jsonl")]
    for bad in ("-oProxyCommand=x", "host:port", "a b"):
        with pytest.raises(EdgesmithError, match="--remote"):
            Remote(bad)


def test_windows_record_identifies_the_scored_tokens():
    toks = list(range(5, 5 + 700))
    w = M.ppl_windows(toks, 256, None, add_bos=False, bos_id=None)
    rec = M.windows_record(w, 256)
    assert rec["starts"] == [0, 256] and rec["scored"] == [129, 255]
    assert rec["sha256"] == M.windows_record(M.ppl_windows(toks, 256, None, False, None), 256)["sha256"]
    assert rec["sha256"] != M.windows_record(M.ppl_windows(toks[1:], 256, None, False, None), 256)["sha256"]


def test_export_dir_skips_adapters_and_importance_matrices(tiny_set, tmp_path):
    # a LoRA adapter GGUF or an imatrix file listed in export.json cannot run alone: never benchmark it
    import shutil

    exp = tmp_path / "export"
    exp.mkdir()
    for name in ("m-F32.gguf", "m-lora-F16.gguf", "m.imatrix.gguf"):
        shutil.copy(tiny_set["gguf"], exp / name)
    (exp / "export.json").write_text(json.dumps({"artifacts": [
        {"path": str(exp / "m-F32.gguf"), "type": "gguf-F32"},
        {"path": str(exp / "m-lora-F16.gguf"), "type": "gguf-lora-F16"},
        {"path": str(exp / "m.imatrix.gguf"), "type": "imatrix"}]}))
    assert [p.name for p in H.expand_artifacts([str(exp)])] == ["m-F32.gguf"]


@pytest.mark.parametrize("kind", ["hf", "gguf", "onnx"])
def test_shared_context_scoring_equals_one_pass_scoring(tiny_set, shared_data, kind):
    """Multiple choice evaluates a shared context once and each choice on its cached KV: the log-likelihoods
    must equal scoring every (context + choice) in one pass, including contexts that differ per choice."""
    from edgesmith.bench import tasks as T
    from edgesmith.bench.backends import open_lm

    lm = open_lm(tiny_set[kind], 1)
    try:
        items = T.get("arc_easy").load(str(shared_data), 4) + T.get("winogrande").load(str(shared_data), 3)
        one_passes = []
        for it in items:
            shared = M.choice_logliks(lm, it["pairs"])
            one_pass = np.array([M.continuation_loglik(lm, c, x) for c, x in it["pairs"]])
            np.testing.assert_allclose(shared, one_pass, rtol=1e-4, atol=1e-3)
            one_passes.append(one_pass)
        if hasattr(lm, "score_pairs"):  # batched: the choices of an item packed after their context, many items per forward
            packed = lm.score_pairs([M.split_pair(lm, c, x) for it in items for c, x in it["pairs"]], max_batch_tokens=256)
            np.testing.assert_allclose(packed, np.concatenate(one_passes), rtol=1e-4, atol=1e-3)
    finally:
        lm.close()


def test_headline_reports_kept_accuracy_above_chance_and_noise():
    """The pipeline report's teacher-vs-student lines: accuracy kept above chance only where the teacher is more than
    two standard errors above chance, differences flagged against 2σ of the pair, ratios of ppl and Q4_K_M speed."""
    from edgesmith.bench.report import headline, kept_above_chance, kept_fraction

    t_tasks = {"arc_easy": {"acc": 0.49, "acc_stderr": 0.022, "n": 500}, "piqa": {"acc": 0.65, "acc_stderr": 0.021, "n": 500},
               "winogrande": {"acc": 0.51, "acc_stderr": 0.022, "n": 500}}
    s_tasks = {"arc_easy": {"acc": 0.41, "acc_stderr": 0.022, "n": 500}, "piqa": {"acc": 0.64, "acc_stderr": 0.021, "n": 500},
               "winogrande": {"acc": 0.50, "acc_stderr": 0.022, "n": 500}}
    assert kept_fraction(s_tasks["arc_easy"], t_tasks["arc_easy"], "arc_easy") == pytest.approx(16 / 24)
    assert kept_fraction(s_tasks["winogrande"], t_tasks["winogrande"], "winogrande") is None  # teacher within noise of chance
    assert kept_above_chance(s_tasks, t_tasks) == pytest.approx((16 / 24 + 14 / 15) / 2)
    lat = lambda d: {"decode_tok_s": d, "prefill_tok_s": 2 * d}  # noqa: E731
    rows = [{"model": "teacher", "format": "HF fp32", "perplexity": {"value": 20.0}, "tasks": t_tasks, "params_non_embedding": 100},
            {"model": "student", "format": "HF fp32", "perplexity": {"value": 30.0}, "tasks": s_tasks, "params_non_embedding": 65},
            {"model": "teacher", "format": "GGUF Q4_K_M", "latency": lat(80.0), "file_mb": 100.0},
            {"model": "student", "format": "GGUF Q4_K_M", "latency": lat(120.0), "file_mb": 75.0}]
    text = "\n".join(headline(rows))
    assert "(**1.50×**); student non-embedding parameters 65%" in text
    assert "arc_easy (n=500): student 41.0 ± 2.2 vs teacher 49.0 ± 2.2: -8.0 points, outside noise" in text
    assert "piqa (n=500): student 64.0 ± 2.1 vs teacher 65.0 ± 2.1: -1.0 points, within noise" in text
    assert "winogrande" in text and "winogrande (n=500): student 50.0 ± 2.2 vs teacher 51.0 ± 2.2: -1.0 points, within noise (2σ = 6.2)\n" in text + "\n"
    assert f"mean accuracy above chance kept: **{(16 / 24 + 14 / 15) / 2:.0%}**" in text
    assert "(**1.50×**), prefill 1.50×, file 75.0 vs 100.0 MiB" in text
