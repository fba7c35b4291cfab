"""`edgesmith bench`: accuracy and latency of HF, GGUF and ONNX artifacts, one child process each.

Read top to bottom: settings -> artifacts -> (reference log-probs) -> per-artifact child
(perplexity, tasks, agreement, latency) -> results JSON (schema 1) -> table.

Everything an artifact computes goes through the small interface in `bench/backends.py` and the arithmetic in
`bench/metrics.py` (perplexity by llama-perplexity's method, multiple choice as lm-evaluation-harness scores it,
KL/top-1 agreement, latency as llama-bench measures it), so the same token windows and the same arithmetic
score every backend. Agreement is computed at the scored positions of the first `agree_chunks` perplexity
windows, on the reference's exact token ids; the child is pinned to `threads` CPUs and its VmHWM recorded.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgesmith.bench.metrics import (gen_scores, kl_top1, mc_scores, measure_latency, nll_of, ppl_record,
                                     ppl_windows, window_logprobs)
from edgesmith.errors import ConfigError, EdgesmithError
from edgesmith.fsutil import data_dir
from edgesmith.machine import machine_info, peak_rss_mb, pin_threads

SCHEMA = 1


@dataclass
class BenchSettings:
    artifacts: list[str] = field(default_factory=list)
    """HF dirs, .gguf files, ONNX dirs, or `edgesmith export` output dirs (expanded to all their artifacts)."""
    ppl: bool = True
    """Measure perplexity on `ppl_text`."""
    ppl_text: str | None = None
    """Text file for perplexity and agreement (default: WikiText-2 raw test in data_dir), read as-is like llama-perplexity -f."""
    extra_texts: dict[str, str] = field(default_factory=dict)
    """More perplexity texts scored in the same model load, name -> file (results under `perplexity_on[name]`), e.g. the
    held-out distillation corpus: one load per artifact instead of one per text."""
    extra_chunks: int | None = 8
    """Windows scored on each of `extra_texts` (None = the whole text)."""
    ctx: int = 512
    """Perplexity window in tokens (llama-perplexity -c); the second half of each window is scored."""
    max_chunks: int | None = None
    """Score at most this many windows (llama-perplexity --chunks); None = the whole text."""
    tasks: list[str] = field(default_factory=list)
    """Task plug-ins (bench/tasks: arc_easy, piqa, winogrande, boolq, copa, alpaca) or FILE.jsonl."""
    data_dir: str | None = None
    """Folder with mc/, instruct/, lm/ (default ../shared/data when present)."""
    limit: int | None = None
    """First N items of each task (None = all)."""
    gen_max_new_tokens: int = 128
    """Greedy generation budget for generation tasks."""
    reference: str | None = None
    """Artifact to compare distributions with (KL, top-1 agreement), e.g. the F16 GGUF or the teacher."""
    agree_chunks: int = 4
    """Perplexity windows used for agreement (the reference's log-probs are kept on disk meanwhile)."""
    task_kinds: list[str] | None = None
    """Run `tasks` only on artifacts of these kinds (hf, gguf, onnx); None = every artifact. Accuracy on a few formats,
    perplexity/KL/latency on all, keeps a large item count affordable."""
    latency: bool = False
    """Measure load time, TTFT, prefill and decode speed, peak RSS."""
    threads: int = 0
    """Threads for every backend (0 = all CPUs this process may use); the child is pinned to that many CPUs."""
    repeat: int = 5
    """Timed repetitions (mean ± std) after one warm-up."""
    seed: int = 0
    """Seed (decoding is greedy; recorded for reproducibility)."""

    def __post_init__(self):
        if self.ctx < 8 or self.ctx % 2:
            raise ConfigError("ctx", f"expected an even number of tokens >= 8, got {self.ctx}")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ConfigError("max_chunks", f"expected >= 1, got {self.max_chunks}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit", f"expected >= 1, got {self.limit}")
        if self.repeat < 1:
            raise ConfigError("repeat", f"expected >= 1, got {self.repeat}")
        if self.threads < 0:
            raise ConfigError("threads", f"expected >= 0, got {self.threads}")
        if self.extra_chunks is not None and self.extra_chunks < 1:
            raise ConfigError("extra_chunks", f"expected >= 1, got {self.extra_chunks}")
        if self.agree_chunks < 1:
            raise ConfigError("agree_chunks", f"expected >= 1, got {self.agree_chunks}")


@dataclass
class BenchStage:
    """Settings of the pipeline's bench stage: which artifacts (the runner adds the teacher and every export), which
    measurements; turned into BenchSettings runs (edgesmith/stages.py)."""

    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "piqa"])
    """Multiple-choice tasks (run when their data is present: data_dir, EDGESMITH_DATA= or ../shared/data)."""
    limit: int | None = 100
    """First N items of each task."""
    max_chunks: int | None = 10
    """WikiText-2 windows of `ctx` tokens for perplexity."""
    ctx: int = 512
    """Perplexity window in tokens (llama-perplexity -c)."""
    corpus_chunks: int | None = 8
    """Windows of the held-out teacher corpus (distill stage) for a second perplexity."""
    latency: bool = True
    """Measure load time, TTFT, prefill and decode tokens/s, peak memory."""
    repeat: int = 3
    """Timed repetitions (mean ± std) after a warm-up."""
    threads: int = 0
    """Threads (0 = every CPU this process may use)."""
    data_dir: str | None = None
    """Evaluation data folder (mc/, lm/); default EDGESMITH_DATA, else ../shared/data when present."""
    teacher: bool = True
    """Also measure the starting model (HF, and its source GGUF when it came from one) as the reference row."""
    task_kinds: list[str] | None = None
    """Artifact kinds that get the multiple-choice tasks (hf, gguf, onnx; null = all): e.g. [hf] scores teacher and
    student on many items once, while every format still gets perplexity, KL to the teacher and latency."""
    export_formats: list[str] | None = None
    """Exported files to measure, by type (F16, Q4_0, Q4_K_M, Q5_K_M, Q8_0, onnx); null = every exported file."""
    teacher_quants: list[str] = field(default_factory=list)
    """Also export the teacher to these GGUF types (e.g. [Q4_K_M]) so speed and size compare at the same quantisation."""
    teacher_source_gguf: bool = True
    """Also measure the GGUF the teacher came from (the default model's shipped Q4_1, or the .gguf given as model)."""

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit", f"expected >= 1 or null, got {self.limit}")
        if self.repeat < 1:
            raise ConfigError("repeat", f"expected >= 1, got {self.repeat}")
        for i, k in enumerate(self.task_kinds or []):
            if k not in ("hf", "gguf", "onnx"):
                raise ConfigError(f"task_kinds[{i}]", f"expected hf, gguf or onnx, got {k!r}")


# ---------------------------------------------------------------- inputs


def resolve_settings(s: BenchSettings) -> BenchSettings:
    """Fill defaults that depend on the machine/filesystem, validate paths (in the parent)."""
    from edgesmith.bench.tasks import parse_tasks

    s.tasks = parse_tasks(s.tasks)
    if s.data_dir is None:
        d = data_dir()
        s.data_dir = str(d) if d else None
    elif not Path(s.data_dir).is_dir():
        raise EdgesmithError(f"--data-dir {s.data_dir}: no such directory")
    if (s.ppl or s.reference) and s.ppl_text is None:
        if s.data_dir is None:
            raise EdgesmithError("no perplexity text: pass --ppl-text FILE or --data-dir (../shared/data not found)")
        s.ppl_text = str(Path(s.data_dir) / "lm" / "wikitext-2-raw" / "wiki.test.raw")
    if s.ppl_text is not None and not Path(s.ppl_text).is_file():
        raise EdgesmithError(f"--ppl-text {s.ppl_text}: no such file")
    for name, f in s.extra_texts.items():
        if not Path(f).is_file():
            raise EdgesmithError(f"extra_texts.{name}: {f}: no such file")
    if any(not t.endswith(".jsonl") for t in s.tasks) and s.data_dir is None:
        raise EdgesmithError("tasks need --data-dir (../shared/data not found)")
    if s.threads == 0:
        s.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return s


def expand_artifacts(specs: list[str]) -> list[Path]:
    """Each spec -> artifact paths; an `edgesmith export` dir (export.json) -> every artifact it lists."""
    from edgesmith.bench.backends import kind_of
    from edgesmith.modelio import default_gguf

    out: list[Path] = []
    for spec in specs:
        p = default_gguf() if spec == "default" else Path(spec).expanduser()
        if not p.exists():
            raise EdgesmithError(f"{spec}: no such artifact (expected an HF dir, a .gguf, an ONNX dir or an export dir)")
        manifest = p / "export.json" if p.is_dir() else None
        if manifest is not None and manifest.is_file():
            out += _export_artifacts(manifest)
        else:
            kind_of(p)
            out.append(p)
    seen, uniq = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            uniq.append(p)
    if not uniq:
        raise EdgesmithError("no artifacts to benchmark")
    return uniq


def _export_artifacts(manifest: Path) -> list[Path]:
    """Every `path`/`file` entry of an export.json that names an existing artifact."""
    from edgesmith.bench.backends import kind_of

    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EdgesmithError(f"{manifest}: unreadable export manifest ({e})") from None
    found: list[Path] = []

    def walk(x):
        # an importance matrix or a LoRA adapter GGUF is not a model one can run alone
        if isinstance(x, dict) and str(x.get("type", "")).startswith(("imatrix", "gguf-lora")):
            return
        if isinstance(x, dict):
            for k in ("path", "file"):
                v = x.get(k)
                if isinstance(v, str):
                    q = Path(v)
                    for cand in (q, manifest.parent / q, manifest.parent / q.name):
                        if cand.exists():
                            try:
                                kind_of(cand)
                                found.append(cand)
                            except EdgesmithError:
                                pass
                            break
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(data)
    if not found:
        raise EdgesmithError(f"{manifest}: lists no existing artifact (expected entries with a 'path')")
    return found


# ---------------------------------------------------------------- one artifact (in a child)


def artifact_facts(path: Path, kind: str) -> tuple[float, float | None, int | None]:
    """(size MiB, bits per weight, parameters) without loading weights."""
    from edgesmith.fsutil import dir_size

    if kind == "onnx":
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and (f.suffix in (".onnx", ".data") or f.name.endswith("onnx_data")))
    elif kind == "hf":
        size = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
    else:
        size = dir_size(path)
    params = None
    try:
        if kind == "gguf":
            from edgesmith.gguf_check import validate_gguf

            params = validate_gguf(path)["params"]  # from the tensor table: no metadata parse
        elif kind == "hf":
            from edgesmith.facts import facts

            params = facts(path).params_total
        else:
            import onnx

            m = onnx.load(str(next(iter(sorted(path.glob("*.onnx"))))), load_external_data=False)
            params = sum(int(np.prod(t.dims)) for t in m.graph.initializer if len(t.dims) >= 1 and np.prod(t.dims) > 1)
    except Exception:  # noqa: BLE001 - bpw is informative; no onnx package on a device
        params = None
    bpw = round(size * 8 / params, 3) if params else None
    return round(size / 2**20, 2), bpw, params


def run_artifact(path: str, s: dict, ref_file: str | None = None, ref_only: bool = False) -> dict:
    """Everything for one artifact; runs in its own child process. ref_only: just save log-probs."""
    from edgesmith.bench import tasks as T
    from edgesmith.bench.backends import kind_of, open_lm

    s = BenchSettings(**s)
    p = Path(path)
    kind = kind_of(p)
    cpus = pin_threads(s.threads)
    np.random.seed(s.seed)
    t0 = time.perf_counter()
    lm = open_lm(p, s.threads, n_ctx=max(2048, s.ctx))
    # a backend that validates the file first reports only the runtime's own load time
    load_s = getattr(lm, "load_s", None) or time.perf_counter() - t0
    try:
        res: dict = {"artifact": str(p), "backend": kind}
        text_tokens = None
        if s.ppl_text and (s.ppl or s.reference or s.latency or ref_only):
            text_tokens = lm.encode(Path(s.ppl_text).read_text(encoding="utf-8"))
        if ref_only:
            wins = ppl_windows(text_tokens, s.ctx, min(s.agree_chunks, s.max_chunks or s.agree_chunks), lm.add_bos, lm.bos_id)
            lps = np.stack([window_logprobs(lm, w)[0].astype(np.float32) for w in wins])
            np.savez(ref_file, windows=np.asarray(wins, dtype=np.int64), logp=lps)
            return {"windows": len(wins)}
        res["file_mb"], res["bpw"], res["params"] = artifact_facts(p, kind)
        took = {"load": load_s}
        kept: dict[tuple, np.ndarray] = {}  # window ids -> log-probs from the perplexity pass
        if s.latency:
            # first, right after loading: the peak memory is then what running the model takes (load + generate),
            # not the accuracy passes' full-vocabulary log-prob arrays that come later in this process
            t1 = time.perf_counter()
            lat = {"load_s": round(load_s, 3)}
            lat.update(measure_latency(lm, text_tokens[:512] if text_tokens else list(range(100, 612)), s.repeat))
            lat["threads"] = s.threads
            lat["cpus"] = cpus
            lat["peak_rss_mb"] = peak_rss_mb()
            res["latency"] = lat
            took["latency"] = time.perf_counter() - t1
        if s.ppl:
            t1 = time.perf_counter()
            wins = ppl_windows(text_tokens, s.ctx, s.max_chunks, lm.add_bos, lm.bos_id)
            nlls = []
            for w in wins:
                lp, targets = window_logprobs(lm, w)
                nlls.append(nll_of(lp, targets))
                if ref_file and len(kept) < s.agree_chunks:  # the agreement pass can reuse these (same windows)
                    kept[tuple(w)] = lp.astype(np.float32)
            res["perplexity"] = ppl_record(np.concatenate(nlls), wins, s.ctx, s.ppl_text, len(text_tokens))
            took["perplexity"] = time.perf_counter() - t1
        for name, f in s.extra_texts.items():
            t1 = time.perf_counter()
            toks = lm.encode(Path(f).read_text(encoding="utf-8"))
            wins = ppl_windows(toks, s.ctx, s.extra_chunks, lm.add_bos, lm.bos_id)
            nll = np.concatenate([nll_of(*window_logprobs(lm, w)) for w in wins])
            res.setdefault("perplexity_on", {})[name] = ppl_record(nll, wins, s.ctx, f, len(toks))
            took[f"perplexity:{name}"] = time.perf_counter() - t1
        if s.tasks and (s.task_kinds is None or kind in s.task_kinds):
            res["tasks"] = {}
            for name in s.tasks:
                t1 = time.perf_counter()
                mod = T.get(name)
                src = name if name.endswith(".jsonl") else s.data_dir
                items = mod.load(src, s.limit)
                if items and "pairs" in items[0]:  # multiple choice (a user's .jsonl may be either kind)
                    res["tasks"][T.task_key(name)] = mc_scores(lm, items)
                else:
                    res["tasks"][T.task_key(name)] = gen_scores(lm, items, s.gen_max_new_tokens)
                took[f"task:{T.task_key(name)}"] = time.perf_counter() - t1
        if ref_file:
            t1 = time.perf_counter()
            ref = np.load(ref_file)
            kls, tops = [], []
            for w, ref_lp in zip(ref["windows"], ref["logp"]):
                ids = [int(t) for t in w]
                lp = kept.pop(tuple(ids), None)
                if lp is None:  # another tokenizer or more windows than the perplexity pass scored
                    lp, _ = window_logprobs(lm, ids)
                if lp.shape != ref_lp.shape:
                    raise EdgesmithError(f"{p}: vocabulary {lp.shape[-1]} differs from the reference's {ref_lp.shape[-1]}")
                kl, top = kl_top1(ref_lp.astype(np.float64), lp)
                kls.append(kl)
                tops.append(top)
            res["agreement"] = {"reference": s.reference, "kl": float(np.concatenate(kls).mean()),
                                "top1": float(np.concatenate(tops).mean()), "positions": int(sum(k.size for k in kls)),
                                "windows": len(kls)}
            took["agreement"] = time.perf_counter() - t1
        res["runtime"] = lm.info()
        res["peak_rss_mb"] = peak_rss_mb()
        res["seconds"] = {k: round(v, 2) for k, v in took.items()}
        return res
    finally:
        lm.close()


# ---------------------------------------------------------------- the run (parent)


def run(s: BenchSettings, progress=None) -> dict:
    """Benchmark every artifact in its own child process; return the results document."""
    from edgesmith.native import run_isolated

    s = resolve_settings(s)
    arts = expand_artifacts(s.artifacts)
    settings = asdict(s)
    doc = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(s.threads),
           "settings": settings, "results": []}
    with tempfile.TemporaryDirectory(prefix="edgesmith-bench-") as tmp:
        ref_file = None
        if s.reference:
            ref = expand_artifacts([s.reference])[0]
            ref_file = str(Path(tmp) / "reference.npz")
            run_isolated(run_artifact, str(ref), settings, ref_file, True, what=f"bench reference {ref.name}")
            settings["reference"] = str(ref)
        for i, a in enumerate(arts):
            if progress:
                progress(i, len(arts), a)
            try:
                r = run_isolated(run_artifact, str(a), settings, ref_file, what=f"bench {a.name}")
            except EdgesmithError as e:  # one crash never hides the others' numbers
                r = {"artifact": str(a), "error": str(e)}
            r["summary"] = summary_line(r)
            doc["results"].append(r)
            if progress:
                progress(i + 1, len(arts), a, r)
    return doc


def summary_line(r: dict) -> str:
    """gpt-fast style: one line per artifact."""
    if "error" in r:
        return f"{Path(r['artifact']).name}: FAILED: {r['error']}"
    parts = [f"{Path(r['artifact']).name} [{r['backend']}]", f"{r['file_mb']:.1f} MiB"]
    if r.get("bpw"):
        parts.append(f"{r['bpw']:.2f} bpw")
    if r.get("perplexity"):
        parts.append(f"ppl {r['perplexity']['value']:.3f}")
    for name, v in (r.get("perplexity_on") or {}).items():
        parts.append(f"ppl[{name}] {v['value']:.3f}")
    for k, v in (r.get("tasks") or {}).items():
        parts.append(f"{k} {100 * v['acc']:.1f}" if "acc" in v else f"{k} rougeL {v['rougeL']:.3f}")
    if r.get("agreement"):
        parts.append(f"KL {r['agreement']['kl']:.4f} top1 {100 * r['agreement']['top1']:.1f}%")
    lat = r.get("latency")
    if lat:
        parts.append(f"load {lat['load_s']:.2f} s, TTFT {lat['ttft_ms']:.0f} ms, pp512 {lat['prefill_tok_s']:.1f} tok/s, "
                     f"tg128 {lat['decode_tok_s']:.1f}±{lat['decode_tok_s_std']:.1f} tok/s, {lat['peak_rss_mb']:.0f} MB peak")
    return ", ".join(parts)
