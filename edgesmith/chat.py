"""`edgesmith chat MODEL`: a preview of what the device will do with a model.

A GGUF file, `default` (the embedded model is a GGUF) and an `edgesmith export` directory run through
llama.cpp, the runtime Ollama uses; an HF directory runs through PyTorch, an ONNX export through
onnxruntime. Sampling defaults are the model's own, from the source the Modelfile writer uses
(export/ollama.py `sampling_defaults`: its temperature, top_p and stop strings, plus Ollama's top_k and
repeat penalty for what a Modelfile leaves unset), so an answer here previews `ollama run` on the exported
files. `--temperature 0` is greedy, `--repeat-penalty 1` turns the penalty off, `--seed` makes sampled
answers reproducible. After each answer one line on stderr: new tokens, time to first token, decode
tok/s and finish reason. `--prompt` answers once and exits.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass

from .chat_backends import open_backend
from .errors import EdgesmithError

# ---------------------------------------------------------------- sampling, stopping, streaming


def sample(logits, context: list[int], s, rng) -> int:
    """One token from next-token logits with llama.cpp's sampler chain, the one Ollama's llama.cpp runner
    applies to every PARAMETER: repeat penalty on the distinct tokens among the last `repeat_last_n` of the
    context (the prompt included: Ollama feeds the prompt to its sampler too; logits <= 0 multiplied, others
    divided) -> top-k -> top-p on the softmax of what is left -> temperature -> a draw from `rng`.
    Temperature 0 is greedy, still after the penalty (llama.cpp's temperature-0 sampler does the same)."""
    import numpy as np

    x = np.array(logits, dtype=np.float32)  # a copy: the runtime's buffer (llama.cpp's) is not ours to change
    n = len(context) if s.repeat_last_n < 0 else min(s.repeat_last_n, len(context))
    if s.repeat_penalty != 1.0 and n > 0:
        seen = np.unique(np.asarray(context[-n:], dtype=np.int64))
        v = x[seen]
        x[seen] = np.where(v <= 0, v * s.repeat_penalty, v / s.repeat_penalty)
    if s.temperature <= 0:
        return int(x.argmax())
    k = s.top_k if 0 < s.top_k < len(x) else len(x)  # top_k <= 0: the whole vocabulary (as llama.cpp)
    top = np.argpartition(-x, k - 1)[:k] if k < len(x) else np.arange(len(x))
    top = top[np.argsort(-x[top], kind="stable")]
    v = x[top].astype(np.float64)
    if s.top_p < 1.0:
        p = np.exp(v - v[0])
        keep = int(np.searchsorted(np.cumsum(p / p.sum()), s.top_p)) + 1  # smallest set reaching top_p
        top, v = top[:keep], v[:keep]
    c = np.cumsum(np.exp((v - v[0]) / s.temperature))
    return int(top[min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), len(top) - 1)])


class _Stream:
    """The visible answer, written as it grows. Tokens are decoded over a short window, not one by one: a
    token can end half a UTF-8 character or change how its neighbour decodes. A tail that could be the start
    of a stop string is held back until it is known not to be one, so a stop string is never shown."""

    def __init__(self, decode, stops: list[str], out):
        self.decode, self.stops, self.out = decode, [s for s in stops if s], out
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.held, self.parts = "", []

    def push(self, tok: int) -> bool:
        """Add a token; True when the answer now contains a stop string (the text before it is kept)."""
        self.ids.append(tok)
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return False  # nothing visible yet, or an incomplete character
        self.held += now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._emit(self.held[:min(hits)])
            self.held = ""
            return True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        self._emit(self.held[:len(self.held) - keep])
        self.held = self.held[len(self.held) - keep:]
        return False

    def finish(self) -> str:
        self._emit(self.held)
        self.held = ""
        return "".join(self.parts)

    def _emit(self, text: str) -> None:
        if text:
            self.parts.append(text)
            if self.out is not None:
                self.out.write(text)
                self.out.flush()


@dataclass
class Answer:
    text: str
    finish: str             # "stop": end-of-turn token or stop string; "length": max_new_tokens or a full context
    ids: list[int]          # every sampled token, the end-of-turn token included
    prompt_ids: list[int]
    ttft_s: float           # template + tokenisation + prefill + first sample
    decode_tps: float | None  # tokens after the first / the time they took


def answer(bot, messages, s, max_new_tokens: int, rng, out=None) -> Answer:
    """Generate one answer with `bot` and sampling `s`, streaming the visible text to `out`."""
    t0 = time.perf_counter()
    prompt = bot.encode(bot.prompt_text(messages))
    if bot.n_ctx and len(prompt) >= bot.n_ctx:
        raise EdgesmithError(f"the conversation ({len(prompt)} tokens) fills the context of {bot.n_ctx}: /reset to start over")
    # a stop string that is one special token is matched as that token: special tokens never reach the
    # visible text, so a text match could not see them; other stop strings are matched in the text
    stop_ids, text_stops = set(bot.eos_ids), []
    for st in s.stop:
        ids = bot.encode(st)
        if len(ids) == 1 and bot.decode(ids) == "":
            stop_ids.add(ids[0])
        else:
            text_stops.append(st)
    stream = _Stream(bot.decode, text_stops, out)
    context, new, finish = list(prompt), [], "length"
    logits = bot.first(prompt)
    t_first = None
    for i in range(max_new_tokens):
        tok = sample(logits, context, s, rng)
        new.append(tok)
        t_first = t_first or time.perf_counter()
        if tok in stop_ids or stream.push(tok):
            finish = "stop"
            break
        context.append(tok)
        if i + 1 == max_new_tokens or (bot.n_ctx and len(context) >= bot.n_ctx):
            break
        logits = bot.next(tok)
    t_end = time.perf_counter()
    steps = len(new) - 1
    return Answer(stream.finish(), finish, new, prompt, t_first - t0,
                  steps / (t_end - t_first) if steps > 0 and t_end > t_first else None)


def speed_line(a: Answer, runtime: str) -> str:
    rate = f"{a.decode_tps:.1f} tok/s" if a.decode_tps else "n/a"
    return (f"[{runtime}: {len(a.ids)} new tokens, time to first token {a.ttft_s:.2f} s, decode {rate}, "
            f"finish reason '{a.finish}']")


def describe(s) -> str:
    mode = "greedy" if s.temperature <= 0 else f"temperature {s.temperature:g}, top_p {s.top_p:g}, top_k {s.top_k}"
    pen = f"repeat_penalty {s.repeat_penalty:g} (last {s.repeat_last_n})" if s.repeat_penalty != 1.0 else "no repeat penalty"
    return f"{mode}, {pen}, stop {list(s.stop)}"


# ---------------------------------------------------------------- the command


# flag -> (valid?, what is valid); top_k takes any integer (<= 0: the whole vocabulary)
_LIMITS = {"temperature": (lambda v: v >= 0, ">= 0 (0 = greedy)"), "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
           "repeat_penalty": (lambda v: v > 0, "> 0 (1 = off)"), "max_new_tokens": (lambda v: v >= 1, ">= 1"),
           "threads": (lambda v: v >= 1, ">= 1"), "seed": (lambda v: v >= 0, ">= 0")}
SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "repeat_penalty")


def _check_flags(args) -> None:
    for k, (ok, want) in _LIMITS.items():
        v = getattr(args, k)
        if v is not None and not (math.isfinite(v) and ok(v)):
            raise EdgesmithError(f"--{k.replace('_', '-')} must be {want}, got {v}")


def cmd_chat(args) -> int:
    import numpy as np

    _check_flags(args)  # before a model is loaded
    bot = open_backend(args.model, args.threads)
    try:
        # the model's defaults, with the flags given on top
        s = dataclasses.replace(bot.sampling, **{k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None})
        rng = np.random.default_rng(args.seed)  # seed None: fresh entropy, as Ollama's default seed -1
        print(f"edgesmith chat: {bot.label} through {bot.name}; sampling: {describe(s)}"
              + (f", seed {args.seed}" if args.seed is not None else ""), file=sys.stderr)
        if getattr(bot, "raw", False):
            print(f"edgesmith chat: warning: {bot.label} has no chat template (a base model): each prompt is completed "
                  "as raw text, without turns, system prompt or history (as its Modelfile's TEMPLATE {{ .Prompt }})",
                  file=sys.stderr)
        history = [{"role": "system", "content": args.system}] if args.system else []
        out = sys.stdout
        if args.prompt is not None:
            a = answer(bot, history + [{"role": "user", "content": args.prompt}], s, args.max_new_tokens, rng, out)
            out.write("\n")
            out.flush()
            print(speed_line(a, bot.name), file=sys.stderr)
            return 0
        print("edgesmith chat: type a message, /reset to clear history, /exit or Ctrl-D to quit", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip() == "/reset":
                history = history[:1] if args.system else []
                continue
            if not line.strip():
                continue
            try:
                a = answer(bot, history + [{"role": "user", "content": line}], s, args.max_new_tokens, rng, out)
            except EdgesmithError as e:  # a full context ends this turn, not the session
                print(f"edgesmith chat: {e}", file=sys.stderr)
                continue
            out.write("\n")
            out.flush()
            print(speed_line(a, bot.name), file=sys.stderr)
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": a.text}]
    finally:
        bot.close()


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (default, .gguf, export dir, HF dir or ONNX dir)", description=__doc__)
    p.add_argument("model", help="'default', a .gguf file or an `edgesmith export` directory (llama.cpp), "
                                 "an HF model directory (PyTorch), or an ONNX export directory (onnxruntime)")
    p.add_argument("--prompt", help="answer this one message and exit (no interactive loop)")
    p.add_argument("--system", help="system prompt (default: the chat template's own, if any)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the model's (its Modelfile's, e.g. 0.2)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: the model's, e.g. 0.9)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens; 0 = all (default 40, Ollama's)")
    p.add_argument("--repeat-penalty", type=float, default=None,
                   help="penalty on tokens among the last 64 of the context; 1 = off (default 1.1, Ollama's)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling: the same seed gives the same answer (default: random)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp the physical cores, as Ollama; PyTorch/onnxruntime their own)")
    p.set_defaults(func=cmd_chat)
