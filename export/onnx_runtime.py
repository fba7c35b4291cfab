"""`OnnxLM`: an `edgesmith export --onnx` directory (optimum's decoder with KV cache) run with onnxruntime, numpy and
tokenizers only -- no torch, no transformers -- so chat and the bench's ONNX backend work the same on a small device.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from edgesmith.chat_template import render_chat_template
from edgesmith.errors import EdgesmithError

MODEL_FILE = "model.onnx"


class OnnxLM:
    """Greedy/sampled generation over an ONNX export directory with onnxruntime + tokenizers only.

    lm = OnnxLM("out/onnx"); ids = lm.tokenize("Hello")
    lm.logits(ids)                       # [len(ids), vocab] float32, one pass, no cache
    lm.generate(ids, 32)                 # new token ids, KV cache, stops at eos (eos_ids=() never stops)
    lm.chat(messages, 64, 0.0, stream)   # (text, "stop"|"length") with the model's chat template
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        self.dir = Path(path)
        files = sorted(self.dir.glob("*.onnx"))
        model = self.dir / MODEL_FILE if (self.dir / MODEL_FILE).is_file() else (files[0] if files else None)
        if model is None:
            raise EdgesmithError(f"{self.dir}: no .onnx model in this directory")
        if not (self.dir / "tokenizer.json").is_file():
            raise EdgesmithError(f"{self.dir}: tokenizer.json missing (expected an `edgesmith export --onnx` directory)")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - a corrupt/foreign file is a user error
            raise EdgesmithError(f"{model}: onnxruntime cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]
        # past_key_values.{i}.key / .value -> (name, [batch, kv_heads, past, head_dim], dtype)
        self.past_inputs = [(i.name, i.shape, i.type) for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_for = {n: n.replace("past_key_values.", "present.") for n, _, _ in self.past_inputs}
        missing = [p for p in self.present_for.values() if p not in self.output_names]
        if missing or "input_ids" not in self.input_names or "logits" not in self.output_names:
            raise EdgesmithError(f"{model}: not a decoder with KV cache (inputs {self.input_names[:4]}..., outputs {self.output_names[:3]}...)")
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        self.config = _read_json(self.dir / "config.json")
        self.tok_config = _read_json(self.dir / "tokenizer_config.json")
        gen = _read_json(self.dir / "generation_config.json")
        eos = gen.get("eos_token_id", self.config.get("eos_token_id"))
        self.eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._float = np.float16 if any("float16" in t for _, _, t in self.past_inputs) else np.float32

    # -- text
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- model
    def _empty_past(self) -> dict[str, np.ndarray]:
        out = {}
        for name, shape, _ in self.past_inputs:
            dims = [1 if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(shape)]  # past length 0
            out[name] = np.zeros(dims, dtype=self._float)
        return out

    def _step(self, ids: list[int], past: dict[str, np.ndarray], start: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        # ids: the new tokens at positions start..start+len(ids); past holds `start` cached positions
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], dtype=np.int64)}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = np.ones((1, start + n), dtype=np.int64)
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
        feed.update(past)
        outs = self.sess.run(None, feed)
        by_name = dict(zip(self.output_names, outs))
        new_past = {p: by_name[o] for p, o in self.present_for.items()}
        return by_name["logits"][0], new_past  # logits: [n, vocab]

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits at every position of `ids`: [len(ids), vocab] (one pass, empty cache)."""
        if not ids:
            raise EdgesmithError("logits: empty token list")
        lg, _ = self._step(list(ids), self._empty_past(), 0)
        return lg.astype(np.float32)

    def perplexity(self, ids: list[int]) -> float:
        return ppl_every_position(self.logits(ids), list(ids))

    def generate(self, ids: list[int], max_new_tokens: int, eos_ids: Iterable[int] | None = None,
                 temperature: float = 0.0, top_p: float = 0.95, seed: int = 0,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """New token ids after `ids` (prefill once, then one token per step through the KV cache).
        Stops after an eos id (included in the result); eos_ids=None -> the model's, () -> never."""
        eos = set(self.eos_ids if eos_ids is None else eos_ids)
        rng = np.random.default_rng(seed)
        logits, past = self._step(list(ids), self._empty_past(), 0)
        pos, out = len(ids), []
        for _ in range(max_new_tokens):
            nxt = _pick(logits[-1].astype(np.float64), temperature, top_p, rng)
            out.append(nxt)
            if on_token:
                on_token(nxt)
            if nxt in eos or len(out) == max_new_tokens:
                break
            logits, past = self._step([nxt], past, pos)
            pos += 1
        return out

    # -- chat
    def chat_template(self) -> str:
        f = self.dir / "chat_template.jinja"
        tpl = f.read_text(encoding="utf-8") if f.is_file() else self.tok_config.get("chat_template")
        if isinstance(tpl, list):  # named templates: take the default one
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
        if not tpl:
            raise EdgesmithError(f"{self.dir}: no chat template (chat_template.jinja or tokenizer_config.json)")
        return tpl

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools=None) -> str:
        """The prompt text transformers' apply_chat_template(tokenize=False) would give."""
        return render_chat_template(self.chat_template(), messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, special=self.tok_config)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0, stream=None) -> tuple[str, str]:
        """Answer the conversation; stream decoded text to `stream` (a file) as it comes. -> (text, finish)."""
        prompt = self.apply_chat_template(messages)
        ids = self.tokenize(prompt, add_special_tokens=False)  # the template already has bos etc.
        new: list[int] = []
        shown = ""

        def emit(tok: int) -> None:
            nonlocal shown
            new.append(tok)
            text = self.decode([t for t in new if t not in self.eos_ids])
            if stream is not None and not text.endswith("\ufffd") and len(text) > len(shown):  # hold half UTF-8 chars
                stream.write(text[len(shown):])
                stream.flush()
                shown = text

        self.generate(ids, max_new_tokens, temperature=temperature, on_token=emit)
        finish = "stop" if new and new[-1] in self.eos_ids else "length"
        return self.decode([t for t in new if t not in self.eos_ids]), finish


def _pick(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgesmithError(f"{p}: invalid JSON ({e})") from None


def ppl_every_position(logits: np.ndarray, ids: list[int]) -> float:
    # logits: [T, V] for ids[0..T); predicts ids[1..T): the bench's log-softmax and NLL, over every position
    from edgesmith.bench.metrics import log_softmax, nll_of

    return float(np.exp(nll_of(log_softmax(logits[:-1]), np.asarray(ids[1:])).mean()))
