"""llama.cpp access through llama-cpp-python, in one place: loading a GGUF (threads, context, batch sizes,
logits for every position or not), quiet or captured logging, the build's features, and short whole runs
(tokenise, logits, score, chat) that tests and studies run in a child process.

Two ways in, both here:
  * `load(path, ...)`: the low-level C API (llama_model_load_from_file + llama_init_from_model), what
    `bench` (and through it `edgesmith chat`) decodes with: no per-token Python copies, so decode speed
    matches llama-bench.
  * `open_llama(path, ...)`: the high-level `llama_cpp.Llama`, for the export checks and the short runs
    below (its tokenizer and chat-completion API are what they need).
Native code can abort: callers run the first load of an untrusted file in a child (`edgesmith.native`).
"""
from __future__ import annotations

import ctypes
import os

from .errors import EdgesmithError


def physical_threads() -> int:
    """Physical cores (Ollama's default num_thread), within this process's CPU affinity: llama.cpp's threads
    spin-wait at every step, so a thread sharing a core with another (or a busy one) slows decoding down."""
    import psutil

    n = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        n = min(n, len(os.sched_getaffinity(0)))
    return max(1, n)


def version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version as _v

    try:
        return _v("llama_cpp_python")
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------- logging


def _quiet_log(level, text, user_data):  # llama.cpp logs every tensor at load: keep stderr readable
    return None


try:  # the callback object must outlive every llama.cpp call
    _LOG_CB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(_quiet_log)
except Exception:  # noqa: BLE001
    _LOG_CB = None


def capture_logs() -> list[str]:
    """Send llama.cpp's log to a list (returned, filled as it logs) instead of stderr. For a child process:
    the callback stays installed for the life of the process."""
    import llama_cpp

    logs: list[str] = []

    @llama_cpp.llama_log_callback
    def on_log(level, text, user_data):
        logs.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    _KEEP.append(on_log)
    return logs


_KEEP: list = []


# ---------------------------------------------------------------- loading


class Loaded:
    """A model and one context from the low-level API; `close()` frees both (and a batch, if given one)."""

    def __init__(self, L, model, ctx):
        self.L, self.model, self.ctx = L, model, ctx

    def close(self, batch=None):
        L = self.L
        if batch is not None:
            L.llama_batch_free(batch)
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None


def load(path, threads: int, n_ctx: int, n_batch: int | None = None, n_ubatch: int = 512) -> Loaded:
    """A GGUF through the C API with llama.cpp's logging silenced: n_batch tokens per llama_decode (default:
    the whole context), llama-bench's default micro-batch, `threads` for decode and prompt alike."""
    import llama_cpp as L

    L.llama_backend_init()
    L.llama_log_set(_LOG_CB, None)
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise EdgesmithError(f"{path}: llama.cpp could not load this GGUF")
    cp = L.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = n_batch or n_ctx
    cp.n_ubatch = n_ubatch
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        L.llama_model_free(model)
        raise EdgesmithError(f"{path}: llama.cpp could not create a context (n_ctx={n_ctx})")
    return Loaded(L, model, ctx)


def open_llama(path: str, n_ctx: int = 512, logits_all: bool = False, vocab_only: bool = False,
               threads: int | None = None, lora_path: str | None = None):
    """The high-level `llama_cpp.Llama` (quiet, seed 0, all cores unless `threads`, batch <= 512)."""
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=n_ctx, logits_all=logits_all, vocab_only=vocab_only, verbose=False,
                 n_threads=threads or os.cpu_count() or 1, n_batch=min(n_ctx, 512), seed=0, lora_path=lora_path)


# ---------------------------------------------------------------- the build


def system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def build_info() -> dict:
    """llama-cpp-python's version and the instruction sets its llama.cpp was built to use, as the library itself
    reports them (`llama_print_system_info`, not assumed from the CPU): a bench number is only as fast as the build."""
    v = version()
    if v is None:
        return {}
    out: dict = {"llama_cpp_python": v}
    try:
        info = system_info()
    except Exception as e:  # noqa: BLE001 - a broken install still gets its version recorded
        out["system_info_error"] = f"{type(e).__name__}: {e}"
        return out
    out["system_info"] = info
    out["cpu_features"] = parse_system_info(info)
    return out


def parse_system_info(info: str) -> list[str]:
    """'CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | ...' -> the enabled features: ['SSE3', 'AVX2', ...]."""
    feats = []
    for part in info.split("|"):
        name, _, val = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if name and val.strip() == "1":
            feats.append(name)
    return feats


# ---------------------------------------------------------------- short whole runs (child processes)


def tokenize(path: str, texts: list[str]) -> list[list[int]]:
    """llama.cpp's token ids for each text (no BOS added; special tokens in the text parsed). Child only."""
    llm = open_llama(path, vocab_only=True)
    try:
        return [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
    finally:
        llm.close()


def logits(path: str, ids: list[int], threads: int | None = None, lora_path: str | None = None):
    """llama.cpp's logits [T, vocab] (float32) for every position of `ids` (with a GGUF LoRA applied if
    given). Child only; small inputs."""
    import numpy as np

    llm = open_llama(path, n_ctx=max(32, len(ids)), logits_all=True, threads=threads, lora_path=lora_path)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def score(path: str, windows: list[list[int]], threads: int | None = None) -> list[dict]:
    """For each token window: llama.cpp's argmax and the NLL of the next token at every position. Child only."""
    import numpy as np

    n_ctx = max(len(w) for w in windows)
    llm = open_llama(path, n_ctx=n_ctx, logits_all=True, threads=threads)
    out = []
    try:
        for w in windows:
            llm.reset()
            llm.eval(w)
            lg = np.asarray(llm.scores[: len(w)], dtype=np.float64)  # [T, vocab]
            m = lg.max(-1, keepdims=True)
            lse = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[:, 0]
            tgt = np.asarray(w[1:])
            nll = lse[:-1] - lg[np.arange(len(w) - 1), tgt]
            out.append({"argmax": lg.argmax(-1).tolist(), "nll": nll.tolist(), "finite": bool(np.isfinite(lg).all())})
    finally:
        llm.close()
    return out


def complete(path: str, prompt: str, max_tokens: int = 16, threads: int | None = None) -> dict:
    """Greedy raw completion of `prompt` (BOS added when the GGUF asks for it, no chat template): {text,
    finish_reason}. Child only."""
    llm = open_llama(path, n_ctx=512, threads=threads)
    try:
        r = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1, seed=0)
        c = r["choices"][0]
        return {"text": c["text"], "finish_reason": c["finish_reason"]}
    finally:
        llm.close()


def chat(path: str, messages: list[dict], max_tokens: int = 48) -> dict:
    """Greedy chat completion with the GGUF's own chat template; {text, finish_reason}. Child only."""
    llm = open_llama(path, n_ctx=512)
    try:
        r = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1, seed=0)
        c = r["choices"][0]
        return {"text": c["message"]["content"], "finish_reason": c["finish_reason"]}
    finally:
        llm.close()
