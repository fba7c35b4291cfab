"""The three runtimes `edgesmith chat` drives: llama.cpp for a GGUF, `default` or an export directory (the
runtime Ollama uses), onnxruntime for an ONNX export, PyTorch for an HF directory; and `open_backend`, which picks
one for a MODEL argument. Each carries `.sampling`, the model's own defaults.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import EdgesmithError

# Each runtime below only turns tokens into next-token logits (prompt_text/encode/decode/first/next).
# Templating, sampling, stopping, streaming and timing are the one loop in `answer`, so the three
# backends cannot drift apart: same sampler, same stop rules, speed measured the same way.


class HFChat:
    """PyTorch (transformers) over an HF directory, KV cache kept between tokens."""

    name = "PyTorch"
    n_ctx = None  # no fixed KV allocation: the model's position limit is the only bound

    def __init__(self, spec: str, threads: int | None = None):
        import torch

        from .export.ollama import model_sampling
        from .modelio import load, resolve

        if threads:
            torch.set_num_threads(threads)
        self.torch, self.spec = torch, spec
        self.model, self.tok = load(spec)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        eos = self.model.config.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.sampling = model_sampling(resolve(spec))
        self.raw = not self.tok.chat_template  # a base model: raw completion (see raw_prompt)

    def prompt_text(self, messages) -> str:
        if self.raw:
            return raw_prompt(messages)
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except ValueError as e:  # transformers' "no chat template" is a property of the model, not a bug
            raise EdgesmithError(f"{self.spec}: {e}") from None

    def encode(self, text: str) -> list[int]:
        # the template already wrote bos etc.; a raw prompt gets what the tokenizer adds (bos)
        return self.tok.encode(text, add_special_tokens=self.raw)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def first(self, ids):
        t = self.torch
        with t.inference_mode():
            out = self.model(input_ids=t.tensor([list(ids)]), use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def next(self, tok: int):
        t = self.torch
        with t.inference_mode():
            out = self.model(input_ids=t.tensor([[tok]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def close(self):
        self.model = None


def raw_prompt(messages) -> str:
    """The prompt of a model without a chat template: the last user message as is, what Ollama sends with the
    exported Modelfile's `TEMPLATE {{ .Prompt }}` (no turns, no system prompt, no history)."""
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


def _probe_gguf(path: str) -> bool:
    """Child process: load the GGUF in llama.cpp and decode one token (a crash here is contained)."""
    from .bench.backends import GGUFLM

    lm = GGUFLM(Path(path), threads=1, n_ctx=64)
    try:
        lm.prefill([max(lm.bos_id, 0)])
    finally:
        lm.close()
    return True


class GGUFChat:
    """llama.cpp through bench's GGUFLM (the same access code the latency numbers come from): the GGUF's
    own tokenizer and chat template, one llama_decode per token."""

    name = "llama.cpp"

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        from .bench.backends import GGUFLM
        from .export.ollama import MAX_NUM_CTX
        from .llamacpp import physical_threads
        from .gguf_check import validate_gguf
        from .native import run_isolated

        path = Path(path)
        validate_gguf(path)  # header, architecture and tensor table before native code sees the file
        # the first load + decode happens in a child: an abort in llama.cpp ends that child, not the chat
        run_isolated(_probe_gguf, str(path), what=f"llama.cpp loading {path.name}")
        # Ollama's context for the exported model (the Modelfile's num_ctx for any model that long)
        self.lm = GGUFLM(path, threads=threads or physical_threads(), n_ctx=MAX_NUM_CTX)
        self.n_ctx, self.path = MAX_NUM_CTX, path
        self.eos_ids = set(self.lm.eos_ids)
        self.raw = not self.lm.chat_template  # a base model: raw completion (see raw_prompt)
        self.sampling = self.model_sampling()

    def model_sampling(self):
        """sampling_defaults from what the GGUF carries: its template, its control tokens as the special tokens
        (what `added_tokens_decoder` marks special in an HF tokenizer_config), no generation config."""
        from .export.ollama import sampling_defaults

        L, lm = self.lm.L, self.lm
        specials = {str(t): {"content": lm._piece(t), "special": True}
                    for t in range(lm.n_vocab) if L.llama_vocab_is_control(lm.vocab, t)}
        return sampling_defaults(lm.chat_template, {**lm.special, "added_tokens_decoder": specials}, {})

    def prompt_text(self, messages) -> str:
        from .chat_template import render_chat_template

        if self.raw:
            return raw_prompt(messages)
        return render_chat_template(self.lm.chat_template, messages, add_generation_prompt=True, special=self.lm.special)

    def encode(self, text: str) -> list[int]:
        ids = self.lm.encode(text, special=True)
        # a vocabulary that wants bos gets it once, unless the template already wrote it
        bos = self.lm.special.get("bos_token")
        if self.lm.add_bos and self.lm.bos_id >= 0 and not (bos and text.startswith(bos)):
            ids = [self.lm.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self.lm.decode(ids)

    # GGUFLM.prefill/step return the greedy token; the full logits row they computed is still in
    # llama.cpp's buffer (a view, no copy), and the sampler below copies it before changing anything
    def first(self, ids):
        self.lm.prefill(list(ids))
        return self.lm._row(len(ids) - 1)

    def next(self, tok: int):
        self.lm.step(tok)
        return self.lm._row(0)

    def close(self):
        self.lm.close()


class OnnxChat:
    """onnxruntime over an `edgesmith export --onnx` directory (no torch needed), KV cache between tokens."""

    name = "onnxruntime"
    n_ctx = None

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        from .export.ollama import model_sampling
        from .export.onnx_runtime import OnnxLM

        self.lm = OnnxLM(path, threads=threads)
        self.eos_ids = set(self.lm.eos_ids)
        self.sampling = model_sampling(Path(path))

    def prompt_text(self, messages) -> str:
        return self.lm.apply_chat_template(messages)

    def encode(self, text: str) -> list[int]:
        return self.lm.tokenize(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.lm.decode(list(ids), skip_special_tokens=True)

    def first(self, ids):
        logits, self.past = self.lm._step(list(ids), self.lm._empty_past(), 0)
        self.pos = len(ids)
        return logits[-1]

    def next(self, tok: int):
        logits, self.past = self.lm._step([tok], self.past, self.pos)
        self.pos += 1
        return logits[-1]

    def close(self):
        self.lm = None


# ---------------------------------------------------------------- choosing the runtime


def _export_dir_choice(d: Path):
    """An `edgesmith export` directory -> (GGUF to run, the sampling its Modelfile was written with or None).
    Q4_K_M first: the quant the pipeline tells users to `ollama create`."""
    from .export.ollama import Sampling

    try:
        files = json.loads((d / "export.json").read_text(encoding="utf-8")).get("files") or []
    except (OSError, ValueError, AttributeError) as e:
        raise EdgesmithError(f"{d / 'export.json'}: unreadable export manifest ({e})") from None
    ggufs = []
    for e in files:
        t = str(e.get("type", "")) if isinstance(e, dict) else ""
        if t.startswith("gguf-") and not t.startswith("gguf-lora") and isinstance(e.get("path"), str):
            p = Path(e["path"]) if Path(e["path"]).is_absolute() else d / e["path"]
            if p.is_file():
                ggufs.append((t, p))
    if not ggufs:
        return None, None
    path = next((p for t, p in ggufs if t == "gguf-Q4_K_M"), ggufs[0][1])
    for e in files:
        checks = e.get("checks") if isinstance(e, dict) and e.get("type") == "modelfile" else None
        rec = checks.get("sampling") if isinstance(checks, dict) and checks.get("from") == f"./{path.name}" else None
        if isinstance(rec, dict):
            try:
                return path, Sampling(**{**rec, "stop": tuple(rec.get("stop") or ())})
            except TypeError:  # written by a different edgesmith version: derive from the GGUF instead
                break
    return path, None


def open_backend(spec: str, threads: int | None = None):
    """The runtime for MODEL: llama.cpp for `default`, a .gguf or an export directory; onnxruntime for an
    ONNX directory; PyTorch for an HF directory. It carries `.sampling`, the model's defaults."""
    from .gguf_check import is_gguf_file
    from .modelio import default_gguf, source_path

    if spec == "default":
        bot = GGUFChat(default_gguf(), threads)
        bot.label = f"default ({bot.path.name})"
        return bot
    p = source_path(spec)  # a path that does not exist gets its one-line error here
    bot = None
    if p.is_file():
        if not is_gguf_file(p):
            raise EdgesmithError(f"{p}: not a GGUF file (bad magic)")
        bot = GGUFChat(p, threads)
    elif any(p.glob("*.onnx")):
        bot = OnnxChat(p, threads)
    elif (p / "export.json").is_file() and not (p / "config.json").is_file():
        gguf, recorded = _export_dir_choice(p)
        if gguf is not None:
            bot = GGUFChat(gguf, threads)
            bot.sampling = recorded or bot.sampling
        elif any((p / "onnx").glob("*.onnx")):
            bot = OnnxChat(p / "onnx", threads)
        else:
            raise EdgesmithError(f"{p}: the export directory has no GGUF or ONNX model to chat with")
    if bot is None:
        bot = HFChat(spec, threads)
    bot.label = str(getattr(bot, "path", spec))
    return bot
