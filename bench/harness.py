"""`edgesmith bench`: accuracy and latency of HF, GGUF and ONNX artifacts, one child process each.

Read top to bottom: settings -> artifacts -> (reference log-probs) -> per-artifact child
(perplexity, tasks, agreement, latency) -> results JSON (schema 1) -> table.

Everything an artifact computes goes through the small interface in `bench/backends.py`, so the
same token windows and the same arithmetic score every backend:

* perplexity: llama-perplexity's method. The whole text is tokenized once, cut into
  non-overlapping windows of `ctx` tokens (bos replaces the first token of each window only if the
  tokenizer adds bos -- SmolLM2's does not), and only the second half of each window is scored, so
  every scored token sees at least ctx/2 tokens of context.
* multiple choice: sum of log p(continuation | context) per choice (lm-evaluation-harness); `acc`
  picks the highest sum, `acc_norm` the highest sum per character of the choice.
* agreement: KL(reference || artifact) and top-1 agreement at the scored positions of the first
  `agree_chunks` perplexity windows, on the reference's exact token ids.
* latency: load, TTFT (128/512-token prompts), prefill tok/s (pp512), decode tok/s (tg128 from
  an empty cache, the first token excluded), VmHWM of the child; warm-up first, `repeat` runs,
  mean ± std, the child pinned to `threads` CPUs.
"""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgesmith import llamacpp
from edgesmith.errors import ConfigError, EdgesmithError
from edgesmith.fsutil import data_dir

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


# ---------------------------------------------------------------- math (pure)


def log_softmax(x: np.ndarray) -> np.ndarray:
    # x: [n, vocab] -> [n, vocab] in float64 (llama.cpp sums in double too)
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def ppl_windows(tokens: list[int], ctx: int, max_chunks: int | None, add_bos: bool, bos_id: int | None) -> list[list[int]]:
    """llama-perplexity's windows: non-overlapping ctx-token slices; bos replaces token 0 if the vocab adds bos."""
    n = len(tokens) // ctx
    if max_chunks:
        n = min(n, max_chunks)
    if n < 1:
        raise EdgesmithError(f"perplexity text has {len(tokens)} tokens: need at least ctx={ctx}")
    wins = [list(tokens[i * ctx:(i + 1) * ctx]) for i in range(n)]
    if add_bos and bos_id is not None:
        for w in wins:
            w[0] = bos_id
    return wins


def window_logprobs(lm, win: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs at the scored positions of one window and the targets they predict.

    Scored like llama-perplexity: logits of positions first..ctx-2 (first = ctx/2) predict tokens
    first+1..ctx-1. -> (logp [ctx/2 - 1, vocab], targets [ctx/2 - 1])
    """
    first = len(win) // 2
    lg = lm.logits(win[:-1], first)              # [ctx-1-first, vocab]
    return log_softmax(lg), np.asarray(win[first + 1:])


def windows_nll(lm, wins: list[list[int]]) -> np.ndarray:
    """Per-token NLL at every scored position of every window (llama-perplexity's method: the second half of each
    window); perplexity = exp(mean). The one perplexity of the project: the bench, prune's held-out evaluation."""
    return np.concatenate([nll_of(*window_logprobs(lm, w)) for w in wins])


def ppl_record(nll: np.ndarray, wins: list[list[int]], ctx: int, text: str, text_tokens: int) -> dict:
    # nll: [scored positions] -> the perplexity entry of a results JSON
    return {"value": float(np.exp(nll.mean())), "ctx": ctx, "chunks": len(wins), "windows": windows_record(wins, ctx),
            "text": text, "tokens_scored": int(nll.size), "text_tokens": text_tokens,
            "nll_stderr": float(nll.std(ddof=1) / math.sqrt(nll.size))}


def windows_record(wins: list[list[int]], ctx: int) -> dict:
    """The exact token windows, compactly: where each starts in the text's tokens, and a hash of the ids
    (two runs -- or two backends with the same tokenizer -- scored the same tokens iff the hashes match)."""
    import hashlib

    ids = np.asarray(wins, dtype=np.int32)
    return {"starts": [i * ctx for i in range(len(wins))], "scored": [ctx // 2 + 1, ctx - 1],
            "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}


def nll_of(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    # logp: [n, vocab], targets: [n] -> [n]
    return -logp[np.arange(len(targets)), targets]


def kl_top1(ref_logp: np.ndarray, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # [n, vocab] x2 -> KL(ref || model) [n], top-1 equal [n]
    kl = (np.exp(ref_logp) * (ref_logp - logp)).sum(-1)
    # KL >= 0; rounding in log-softmax leaves ~-1e-9 where the two are the same model
    return np.maximum(kl, 0.0), ref_logp.argmax(-1) == logp.argmax(-1)


def split_pair(lm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: encode the whole; the
    continuation is what follows the context's own tokens."""
    whole = lm.encode(context + continuation)
    n_ctx = len(lm.encode(context))
    prefix = [lm.bos_id] if lm.add_bos and lm.bos_id is not None else []
    ids = prefix + whole
    start = len(prefix) + n_ctx  # first continuation token
    if start >= len(ids):
        raise EdgesmithError(f"continuation {continuation!r} tokenizes to nothing")
    if start == 0:
        raise EdgesmithError("empty context and no bos token: cannot score the first token")
    return ids[:start], ids[start:]


def continuation_loglik(lm, context: str, continuation: str) -> float:
    """sum log p(continuation | context) in one pass over context + continuation."""
    ctx_ids, cont = split_pair(lm, context, continuation)
    ids = ctx_ids + cont
    lg = lm.logits(ids[:-1], len(ctx_ids) - 1)   # rows predict cont
    return float(-nll_of(log_softmax(lg), np.asarray(cont)).sum())


def choice_logliks(lm, pairs: list[tuple[str, str]]) -> np.ndarray:
    """sum log p(continuation | context) for each pair; choices that share their context tokens (ARC,
    PIQA, BoolQ, COPA) evaluate the context once and each continuation on its cached KV."""
    if not hasattr(lm, "extend"):
        return np.array([continuation_loglik(lm, c, x) for c, x in pairs])
    split = [split_pair(lm, c, x) for c, x in pairs]
    out = np.empty(len(pairs))
    done: dict[tuple, np.ndarray] = {}
    for i, (ctx_ids, cont) in enumerate(split):
        key = tuple(ctx_ids)
        if key not in done:
            done.clear()  # the backend keeps one prefix: a new context replaces the last one
            done[key] = lm.prefix(ctx_ids)       # [vocab]: predicts cont[0]
        rows = [done[key][None]]
        if len(cont) > 1:
            rows.append(lm.extend(cont[:-1]))    # [len(cont)-1, vocab]: predict cont[1:]
        out[i] = -nll_of(log_softmax(np.concatenate(rows)), np.asarray(cont)).sum()
    return out


def mc_scores(lm, items: list[dict]) -> dict:
    """acc / acc_norm with standard errors, plus every choice's log-likelihood (`logliks`, one list per item):
    cross-backend comparisons and paired significance tests need the per-item numbers, not only the means."""
    acc, acc_norm, lls = [], [], []
    batched = None
    if hasattr(lm, "score_pairs"):  # a backend that scores many sequences per forward (HF): all items at once
        flat = lm.score_pairs([split_pair(lm, c, x) for it in items for c, x in it["pairs"]])
        cuts = np.cumsum([0] + [len(it["pairs"]) for it in items])
        batched = [flat[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    for n, it in enumerate(items):
        ll = batched[n] if batched is not None else choice_logliks(lm, it["pairs"])
        chars = np.array([max(1, len(x.lstrip(" "))) for _, x in it["pairs"]])
        acc.append(int(ll.argmax() == it["gold"]))
        acc_norm.append(int((ll / chars).argmax() == it["gold"]))
        lls.append([round(float(x), 5) for x in ll])

    def stderr(x):
        return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None

    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "n": len(items),
            "acc_stderr": stderr(acc), "acc_norm_stderr": stderr(acc_norm),
            "gold": [int(it["gold"]) for it in items], "logliks": lls}


def chat_prompt(lm, messages: list[dict]) -> list[int]:
    if lm.chat_template:
        from edgesmith.chat_template import render_chat_template

        text = render_chat_template(lm.chat_template, messages, add_generation_prompt=True, special=lm.special)
    else:  # documented plain fallback (edgesmith.data.render)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return lm.encode(text, special=True)


def generate(lm, ids: list[int], max_new: int) -> tuple[list[int], bool]:
    """Greedy; -> (new ids without eos, stopped at eos)."""
    out = []
    tok = lm.prefill(ids)
    for _ in range(max_new):
        if tok in lm.eos_ids:
            return out, True
        out.append(tok)
        if len(out) == max_new:
            break
        tok = lm.step(tok)
    return out, False


def gen_scores(lm, items: list[dict], max_new: int) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps, refs, stopped, lens, secs = [], [], [], [], []
    for it in items:
        ids = chat_prompt(lm, it["messages"])
        t0 = time.perf_counter()
        new, stop = generate(lm, ids, max_new)
        secs.append(time.perf_counter() - t0)
        hyps.append(lm.decode(new).strip())
        refs.append(it["reference"].strip())
        stopped.append(stop and bool(hyps[-1]))
        lens.append(len(new))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)]
    return {
        "exact_match": float(np.mean([h == r for h, r in zip(hyps, refs)])),
        "rougeL": float(np.mean(rouge)),
        "bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
        "chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score),
        "success_rate": float(np.mean(stopped)),  # ended with eos, non-empty, within the budget
        "mean_output_tokens": float(np.mean(lens)),
        "mean_gen_s": float(np.mean(secs)),
        "n": len(items), "max_new_tokens": max_new,
    }


def mean_std(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def measure_latency(lm, prompt: list[int], repeat: int, n_gen: int = 128) -> dict:
    """TTFT for 128/512-token prompts, pp512 and tg128 (llama-bench's tests), one warm-up first."""
    if len(prompt) < 512:
        prompt = (prompt * (512 // max(1, len(prompt)) + 1))[:512]
    p128, p512 = prompt[:128], prompt[:512]

    def once(n_gen=n_gen):
        t0 = time.perf_counter()
        lm.prefill(p128)
        t128 = time.perf_counter() - t0
        t0 = time.perf_counter()
        lm.prefill(p512)
        t512 = time.perf_counter() - t0
        tok = lm.prefill(p512[:1])               # first token (excluded from decode speed)
        t0 = time.perf_counter()
        for _ in range(n_gen):
            tok = lm.step(tok)
        tg = time.perf_counter() - t0
        return t128, t512, tg

    once(16)  # warm-up: page in weights, allocate buffers, let caches settle (16 decode steps are enough)
    runs = [once() for _ in range(repeat)]
    t128 = [r[0] for r in runs]
    t512 = [r[1] for r in runs]
    pp = [512 / r[1] for r in runs]
    tg = [n_gen / r[2] for r in runs]
    out = {}
    out["ttft_ms"], out["ttft_ms_std"] = (round(v * 1000, 2) for v in mean_std(t128))
    out["ttft_512_ms"], out["ttft_512_ms_std"] = (round(v * 1000, 2) for v in mean_std(t512))
    out["prefill_tok_s"], out["prefill_tok_s_std"] = (round(v, 2) for v in mean_std(pp))
    out["decode_tok_s"], out["decode_tok_s_std"] = (round(v, 2) for v in mean_std(tg))
    out["repeat"] = repeat
    return out


def vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


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


def pin_threads(threads: int) -> list[int] | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        cpus = cpus[:threads]
        os.sched_setaffinity(0, cpus)
    return cpus


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
            lat["peak_rss_mb"] = vm_hwm_mb()
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
        res["peak_rss_mb"] = vm_hwm_mb()
        res["seconds"] = {k: round(v, 2) for k, v in took.items()}
        return res
    finally:
        lm.close()


# ---------------------------------------------------------------- machine


def machine_info(threads: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    cpu, flags = platform.processor() or "?", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("?", "", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith(("flags", "Features")) and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    keep = ("sse3", "ssse3", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
            "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "sve")
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    libs = {}
    for d in ("edgesmith", "numpy", "llama_cpp_python", "onnxruntime", "tokenizers", "torch", "transformers", "gguf"):
        try:
            libs[d] = version(d)
        except PackageNotFoundError:
            pass
    return {
        "cpu": cpu, "cpu_flags": [f for f in flags if f in keep], "cores": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem, "os": platform.platform(), "python": platform.python_version(), "libraries": libs,
        "llama_cpp": llamacpp.build_info(), "threads": threads, "hostname": platform.node(),
    }


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
