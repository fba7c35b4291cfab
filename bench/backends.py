"""Three ways to run a model, one small interface, so every score and timing is computed by the same
code in `bench/harness.py`:

    lm = open_lm(path, threads)          # "hf" (torch), "gguf" (llama.cpp low-level API), "onnx" (onnxruntime)
    lm.encode(text) -> [ids]             # no special tokens; the artifact's own tokenizer
    lm.add_bos, lm.bos_id, lm.eos_ids, lm.n_vocab
    lm.logits(ids, first) -> [len(ids) - first, n_vocab] float32   # one forward pass, fresh state
    lm.prefill(ids) -> next id           # fresh state, whole prompt in one batch, greedy next token
    lm.step(id) -> next id               # one token on top of the current state (decode)
    lm.close()

The gguf and onnx backends import numpy, llama_cpp / onnxruntime and `tokenizers` only: they run on
an `edgesmith[device]` install without torch or transformers.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from edgesmith.errors import EdgesmithError


def kind_of(path: Path) -> str:
    """'gguf' | 'onnx' | 'hf' for an artifact path (bad paths get a one-line error)."""
    from edgesmith.gguf_check import is_gguf_file

    if path.is_file():
        if is_gguf_file(path):
            return "gguf"
        raise EdgesmithError(f"{path}: not a GGUF file (bad magic); expected a .gguf, an HF dir or an ONNX dir")
    if path.is_dir():
        if any(path.glob("*.onnx")):
            return "onnx"
        if (path / "config.json").is_file():
            return "hf"
    raise EdgesmithError(f"{path}: not a benchmarkable artifact (expected a .gguf file, an HF directory or an ONNX directory)")


def open_lm(path: str | os.PathLike, threads: int, n_ctx: int = 2048):
    path = Path(path)
    kind = kind_of(path)
    return {"gguf": GGUFLM, "onnx": OnnxBenchLM, "hf": HFLM}[kind](path, threads=threads, n_ctx=n_ctx)


class _HFTokenizer:
    """The artifact's tokenizer.json through the `tokenizers` library (no transformers needed)."""

    def __init__(self, d: Path):
        from tokenizers import Tokenizer

        f = d / "tokenizer.json"
        if not f.is_file():
            raise EdgesmithError(f"{d}: tokenizer.json missing (needed to score text)")
        self.tok = Tokenizer.from_file(str(f))
        cfg = {}
        for name in ("tokenizer_config.json", "config.json", "generation_config.json"):
            if (d / name).is_file():
                cfg.update({k: v for k, v in json.loads((d / name).read_text()).items() if v is not None and k not in cfg})
        plain = self.tok.encode("a", add_special_tokens=False).ids
        special = self.tok.encode("a", add_special_tokens=True).ids
        # bos is added exactly when the tokenizer's post-processor adds it (SmolLM2: no)
        self.add_bos = len(special) > len(plain) and special[-len(plain):] == plain
        self.bos_id = special[0] if self.add_bos else cfg.get("bos_token_id")
        eos = cfg.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in cfg.items()
                        if k.endswith("_token") and isinstance(v, (str, dict))}
        self.chat_template = cfg.get("chat_template")
        if not self.chat_template and (d / "chat_template.jinja").is_file():
            self.chat_template = (d / "chat_template.jinja").read_text()

    def encode(self, text: str, special: bool = False) -> list[int]:
        # tokenizers always matches added special tokens in the text; `special` is for GGUF parity
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


# ---------------------------------------------------------------- GGUF: llama.cpp low-level API


class GGUFLM:
    """llama.cpp through llama_cpp's C bindings: one llama_batch, llama_decode, llama_get_logits_ith.

    No per-token Python work beyond filling a preallocated batch and one argmax, which is what
    makes decode speed match `llama-bench` (the high-level `Llama.eval` copies every logit row).
    """

    backend = "gguf"

    def __init__(self, path: Path, threads: int, n_ctx: int = 2048):
        from edgesmith import llamacpp
        from edgesmith.gguf_check import validate_gguf

        validate_gguf(path)  # header, architecture and tensor table checked before native code sees the file
        t0 = time.perf_counter()
        # a whole scoring window in one llama_decode, llama-bench's default micro-batch (512)
        self._loaded = llamacpp.load(path, threads, n_ctx)
        L = self.L = self._loaded.L
        self.model, self.ctx = self._loaded.model, self._loaded.ctx
        self.mem = L.llama_get_memory(self.ctx)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.bos_id = L.llama_vocab_bos(self.vocab)
        self.eos_ids = {t for t in (L.llama_vocab_eos(self.vocab), L.llama_vocab_eot(self.vocab)) if t >= 0}
        self.batch = L.llama_batch_init(n_ctx, 0, 1)
        for i in range(n_ctx):  # every token belongs to sequence 0, set once
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
        self._tok = np.ctypeslib.as_array(self.batch.token, shape=(n_ctx,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_ctx,))
        self._out = np.ctypeslib.as_array(self.batch.logits, shape=(n_ctx,))
        self.n_past = 0
        self.load_s = time.perf_counter() - t0  # llama.cpp's own load + context, what a device app pays
        tpl = L.llama_model_chat_template(self.model, None)
        self.chat_template = tpl.decode("utf-8", errors="replace") if tpl else None
        self.special = {"bos_token": self._piece(self.bos_id), "eos_token": self._piece(L.llama_vocab_eos(self.vocab))}
        self.path = path

    # tokenizer: llama.cpp's own, so token windows are exactly what llama-perplexity sees
    def encode(self, text: str, special: bool = False) -> list[int]:
        """special=True parses control tokens in the text (chat prompts), like tokenizers does."""
        L = self.L
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, False, special)
        return list(buf[:n])

    def _piece(self, t: int) -> str:
        import ctypes

        buf = ctypes.create_string_buffer(256)
        n = self.L.llama_token_to_piece(self.vocab, t, buf, 256, 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", errors="replace")

    def decode(self, ids) -> str:
        import ctypes

        L = self.L
        out = []
        buf = ctypes.create_string_buffer(256)
        for t in ids:
            if t in self.eos_ids or L.llama_vocab_is_control(self.vocab, t):
                continue
            n = L.llama_token_to_piece(self.vocab, t, buf, 256, 0, False)
            out.append(buf.raw[:max(n, 0)])
        return b"".join(out).decode("utf-8", errors="replace")

    def _decode(self, ids, pos0: int, want) -> None:
        n = len(ids)
        if pos0 + n > self.n_ctx:
            raise EdgesmithError(f"{self.path}: {pos0 + n} tokens exceed the context of {self.n_ctx}")
        self._tok[:n] = ids
        self._pos[:n] = np.arange(pos0, pos0 + n)
        self._out[:n] = want
        self.batch.n_tokens = n
        rc = self.L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise EdgesmithError(f"{self.path}: llama_decode failed with code {rc}")

    def _row(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def logits(self, ids, first: int = 0) -> np.ndarray:
        self.L.llama_memory_clear(self.mem, True)
        want = np.zeros(len(ids), dtype=np.int8)
        want[first:] = 1
        self._decode(ids, 0, want)
        out = np.empty((len(ids) - first, self.n_vocab), dtype=np.float32)
        for j, i in enumerate(range(first, len(ids))):
            out[j] = self._row(i)
        self.n_past = len(ids)
        return out

    # multiple choice: the shared context once, then each continuation on top of its cached KV
    def prefix(self, ids) -> np.ndarray:
        """Decode `ids` into a fresh KV cache and keep it; -> next-token logits after them [vocab]."""
        self.L.llama_memory_clear(self.mem, True)
        want = np.zeros(len(ids), dtype=np.int8)
        want[-1] = 1
        self._decode(ids, 0, want)
        self.n_prefix = len(ids)
        return self._row(len(ids) - 1).copy()

    def extend(self, ids) -> np.ndarray:
        """Logits at every position of `ids` placed right after the kept prefix [len(ids), vocab]."""
        self.L.llama_memory_seq_rm(self.mem, 0, self.n_prefix, -1)  # drop the previous continuation
        self._decode(ids, self.n_prefix, np.ones(len(ids), dtype=np.int8))
        return np.stack([self._row(i) for i in range(len(ids))])

    def prefill(self, ids) -> int:
        self.L.llama_memory_clear(self.mem, True)
        want = np.zeros(len(ids), dtype=np.int8)
        want[-1] = 1
        self._decode(ids, 0, want)
        self.n_past = len(ids)
        return int(np.argmax(self._row(len(ids) - 1)))

    def step(self, tok: int) -> int:
        self._decode([tok], self.n_past, 1)
        self.n_past += 1
        return int(np.argmax(self._row(0)))

    def info(self) -> dict:
        from edgesmith import llamacpp

        return {"llama_cpp_python": llamacpp.version(), "system_info": llamacpp.system_info()}

    def close(self):
        if getattr(self, "_loaded", None) is not None:
            self._loaded.close(getattr(self, "batch", None))
            self._loaded = self.batch = self.ctx = self.model = None


# ---------------------------------------------------------------- ONNX: onnxruntime, numpy only


class OnnxBenchLM:
    """An `edgesmith export --onnx` directory (optimum decoder with KV cache) through the export
    stage's torch-free `OnnxLM` (onnxruntime + numpy + tokenizers)."""

    backend = "onnx"

    def __init__(self, path: Path, threads: int, n_ctx: int = 2048):
        from edgesmith.export.onnx_runtime import OnnxLM

        self.lm = OnnxLM(path, threads=threads)
        self.tok = _HFTokenizer(path)
        self.add_bos, self.bos_id, self.eos_ids = self.tok.add_bos, self.tok.bos_id, self.tok.eos_ids
        self.chat_template, self.special = self.tok.chat_template, self.tok.special
        self.n_vocab = self.lm.config.get("vocab_size")
        self.past, self.n_past = None, 0

    def encode(self, text, special=False):
        return self.tok.encode(text, special)

    def decode(self, ids):
        return self.tok.decode(ids)

    def logits(self, ids, first: int = 0) -> np.ndarray:
        lg, _ = self.lm._step(list(ids), self.lm._empty_past(), 0)
        return np.ascontiguousarray(lg[first:], dtype=np.float32)

    def prefix(self, ids) -> np.ndarray:
        lg, self._prefix_past = self.lm._step(list(ids), self.lm._empty_past(), 0)
        self.n_prefix = len(ids)
        return np.asarray(lg[-1], dtype=np.float32)

    def extend(self, ids) -> np.ndarray:
        lg, _ = self.lm._step(list(ids), self._prefix_past, self.n_prefix)  # the past arrays are not modified
        return np.ascontiguousarray(lg, dtype=np.float32)

    def prefill(self, ids) -> int:
        lg, self.past = self.lm._step(list(ids), self.lm._empty_past(), 0)
        self.n_past = len(ids)
        return int(np.argmax(lg[-1]))

    def step(self, tok: int) -> int:
        lg, self.past = self.lm._step([tok], self.past, self.n_past)
        self.n_past += 1
        return int(np.argmax(lg[-1]))

    def info(self) -> dict:
        return {"onnxruntime": _version("onnxruntime")}

    def close(self):
        self.lm = None


# ---------------------------------------------------------------- HF: transformers fp32


def pack_group(ctx: list[int], conts: list[list[int]]):
    """One context and its continuations as one sequence: ids [n], position ids [n], which positions each may
    attend to [n, n] (bool: the context, and its own continuation up to itself), and per continuation the rows
    that predict its tokens with those tokens. Scored this way each continuation gets exactly the logits it would
    get appended to the context alone."""
    seq, positions, seg = list(ctx), list(range(len(ctx))), [0] * len(ctx)
    preds = []
    for k, cont in enumerate(conts, 1):
        start = len(seq)
        seq += cont
        positions += range(len(ctx), len(ctx) + len(cont))
        seg += [k] * len(cont)
        # the context's last token predicts cont[0]; cont[q] predicts cont[q + 1]
        preds.append(([len(ctx) - 1] + list(range(start, start + len(cont) - 1)), list(cont)))
    s = np.asarray(seg)
    n = len(seq)
    causal = np.tril(np.ones((n, n), dtype=bool))
    seen = causal & ((s[None, :] == 0) | (s[None, :] == s[:, None]))   # [query, key]
    return seq, positions, seen, preds


class HFLM:
    backend = "hf"

    def __init__(self, path: Path, threads: int, n_ctx: int = 2048):
        import torch

        from edgesmith.modelio import load_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_model(str(path), dtype="float32")
        self.model.eval()
        if (path / "tokenizer.json").is_file():
            self.tok = _HFTokenizer(path)
        else:
            raise EdgesmithError(f"{path}: tokenizer.json missing (needed to score text)")
        self.add_bos, self.bos_id, self.eos_ids = self.tok.add_bos, self.tok.bos_id, self.tok.eos_ids
        self.chat_template, self.special = self.tok.chat_template, self.tok.special
        self.n_vocab = self.model.config.vocab_size
        self.past = None
        self.n_past = 0

    @classmethod
    def wrap(cls, model) -> "HFLM":
        """Score a model already in memory (e.g. prune's result before it is saved) with the same code as a loaded one:
        logits/score_pairs only (no tokenizer)."""
        import torch

        lm = cls.__new__(cls)
        lm.torch, lm.model, lm.n_vocab = torch, model.eval(), model.config.vocab_size
        lm.past, lm.n_past = None, 0
        return lm

    def encode(self, text, special=False):
        return self.tok.encode(text, special)

    def decode(self, ids):
        return self.tok.decode(ids)

    def logits(self, ids, first: int = 0) -> np.ndarray:
        t = self.torch
        with t.inference_mode():
            out = self.model(t.tensor([list(ids)]), use_cache=False)
        return out.logits[0, first:].float().numpy()

    def prefix(self, ids) -> np.ndarray:
        t = self.torch
        with t.inference_mode():
            out = self.model(t.tensor([list(ids)]), use_cache=True)
        self._prefix_cache, self.n_prefix = out.past_key_values, len(ids)
        return out.logits[0, -1].float().numpy()

    def extend(self, ids) -> np.ndarray:
        t = self.torch
        with t.inference_mode():
            out = self.model(t.tensor([list(ids)]), past_key_values=self._prefix_cache, use_cache=True)
        self._prefix_cache.crop(self.n_prefix)  # back to the shared context for the next continuation
        return out.logits[0].float().numpy()

    def score_pairs(self, pairs: list[tuple[list[int], list[int]]], max_batch_tokens: int = 4096) -> np.ndarray:
        """sum log p(cont | ctx) for many (ctx ids, cont ids) pairs, batched. Pairs that share their context (the
        choices of one ARC/PIQA item) are packed into one sequence, context once and every continuation after it
        (`pack_group`: each continuation sees the context and itself, at the positions it would have alone), so an
        item with four choices costs its context once instead of four times. Sequences are sorted by length and
        right-padded into forwards of <= max_batch_tokens; the output layer runs only on the rows that predict
        continuation tokens, their log-softmax in float64 (as the one-by-one path)."""
        t = self.torch
        out = np.empty(len(pairs))
        groups: dict[tuple, list[int]] = {}               # context ids -> the pairs that continue it
        for j, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(j)
        packed = [pack_group(list(ctx), [list(pairs[j][1]) for j in js]) + (js,) for ctx, js in groups.items()]
        packed.sort(key=lambda g: -len(g[0]))
        head = self.model.get_output_embeddings()
        neg = t.finfo(self.model.dtype).min
        i = 0
        while i < len(packed):
            L = len(packed[i][0])                                           # the longest in this batch
            batch = packed[i:i + max(1, max_batch_tokens // L)]
            i += len(batch)
            ids = t.zeros((len(batch), L), dtype=t.long)
            pos = t.zeros((len(batch), L), dtype=t.long)
            allow = t.eye(L, dtype=t.bool).repeat(len(batch), 1, 1)          # padding rows see themselves (no NaN)
            rows, targets, owner = [], [], []
            for b, (seq, positions, seen, preds, js) in enumerate(batch):
                n = len(seq)
                ids[b, :n], pos[b, :n] = t.tensor(seq), t.tensor(positions)
                allow[b, :n, :n] = t.from_numpy(seen)
                for j, (qs, cont) in zip(js, preds):
                    rows += [(b, q) for q in qs]
                    targets += cont
                    owner += [j] * len(cont)
            mask = t.zeros(allow.shape, dtype=self.model.dtype).masked_fill_(~allow, neg)[:, None]  # [B, 1, L, L]
            with t.inference_mode():
                h = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                               logits_to_keep=1).hidden_states[-1]
                bi, qi = t.tensor([r[0] for r in rows]), t.tensor([r[1] for r in rows])
                lp = t.log_softmax(head(h[bi, qi]).double(), dim=-1)         # [R, V] float64, continuation rows only
                tok_lp = lp.gather(-1, t.tensor(targets)[:, None])[:, 0].numpy()
            sums: dict[int, float] = {}
            for j, v in zip(owner, tok_lp):
                sums[j] = sums.get(j, 0.0) + float(v)
            for *_, js in batch:
                for j in js:
                    out[j] = sums[j]
        return out

    def prefill(self, ids) -> int:
        t = self.torch
        with t.inference_mode():
            out = self.model(t.tensor([list(ids)]), use_cache=True)
        self.past, self.n_past = out.past_key_values, len(ids)
        return int(out.logits[0, -1].argmax())

    def step(self, tok: int) -> int:
        t = self.torch
        with t.inference_mode():
            out = self.model(t.tensor([[tok]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.n_past += 1
        return int(out.logits[0, -1].argmax())

    def info(self) -> dict:
        import transformers

        return {"torch": self.torch.__version__, "transformers": transformers.__version__}

    def close(self):
        self.model = None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
