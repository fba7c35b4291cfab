"""`edgesmith chat MODEL`: talk to an HF directory, a GGUF file or an ONNX export, streaming tokens
and stopping at the model's end-of-turn token. `--prompt` answers once and exits."""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import EdgesmithError


class HFChat:
    """transformers backend: chat template from the tokenizer, eos from generation_config."""

    def __init__(self, spec: str, threads: int | None = None):
        import torch

        from .modelio import load

        if threads:
            torch.set_num_threads(threads)
        self.model, self.tok = load(spec)

    def reply(self, messages, max_new_tokens, temperature, out) -> tuple[str, str]:
        import torch
        from transformers import TextStreamer

        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")

        class _Stream(TextStreamer):
            def on_finalized_text(self, text, stream_end=False):
                out.write(text)
                out.flush()

        gen = self.model.generation_config
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=gen.pad_token_id)
        if temperature > 0:
            kw.update(temperature=temperature, top_p=0.95)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            seq = self.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=_Stream(self.tok, skip_prompt=True, skip_special_tokens=True), **kw)
        new = seq[0, ids.shape[1]:].tolist()
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        finish = "stop" if new and new[-1] in eos else "length"
        return self.tok.decode(new, skip_special_tokens=True), finish

    def close(self):
        pass


def _probe_gguf(path: str) -> bool:
    """Child process: load the GGUF in llama.cpp and decode one token (a crash here is contained)."""
    import llama_cpp

    try:
        llm = llama_cpp.Llama(path, n_ctx=64, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise EdgesmithError(f"{path}: llama.cpp could not load this GGUF ({e})") from None
    try:
        llm.eval([max(llm.token_bos(), 0)])
    finally:
        llm.close()
    return True


class GGUFChat:
    """llama.cpp backend: the GGUF's own chat template and end-of-turn token."""

    def __init__(self, path: str, threads: int | None = None, n_ctx: int = 2048):
        import llama_cpp

        from .modelio import facts

        facts(path)  # validate header, architecture and tensor table before native code sees the file
        from .native import run_isolated

        # the first load + decode happens in a child: an abort in llama.cpp ends that child, not the chat
        run_isolated(_probe_gguf, str(path), what=f"llama.cpp loading {Path(path).name}")
        try:
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise EdgesmithError(f"{path}: llama.cpp could not load this GGUF ({e})") from None

    def reply(self, messages, max_new_tokens, temperature, out) -> tuple[str, str]:
        text, finish = [], "length"
        for chunk in self.llm.create_chat_completion(messages, max_tokens=max_new_tokens, temperature=temperature,
                                                     top_p=0.95 if temperature > 0 else 1.0, top_k=40 if temperature > 0 else 1,
                                                     stream=True, seed=0):
            ch = chunk["choices"][0]
            piece = ch["delta"].get("content") or ""
            if piece:
                out.write(piece)
                out.flush()
                text.append(piece)
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
        return "".join(text), finish

    def close(self):
        self.llm.close()


class OnnxChat:
    """onnxruntime backend (an `edgesmith export --onnx` directory), no torch needed."""

    def __init__(self, path: str, threads: int | None = None):
        from .export.onnx import OnnxLM

        self.lm = OnnxLM(path, threads=threads)

    def reply(self, messages, max_new_tokens, temperature, out) -> tuple[str, str]:
        return self.lm.chat(messages, max_new_tokens=max_new_tokens, temperature=temperature, stream=out)

    def close(self):
        pass


def open_backend(spec: str, threads: int | None = None):
    from .modelio import is_gguf_file

    p = Path(spec)
    if spec != "default" and p.is_file():
        if not is_gguf_file(p):
            raise EdgesmithError(f"{p}: not a GGUF file (bad magic)")
        return GGUFChat(spec, threads)
    if p.is_dir() and any(p.glob("*.onnx")):
        return OnnxChat(spec, threads)
    return HFChat(spec, threads)


def cmd_chat(args) -> int:
    bot = open_backend(args.model, args.threads)
    history = [{"role": "system", "content": args.system}] if args.system else []
    out = sys.stdout
    try:
        if args.prompt is not None:
            _, finish = bot.reply(history + [{"role": "user", "content": args.prompt}], args.max_new_tokens, args.temperature, out)
            out.write("\n")
            if finish != "stop":
                print(f"[stopped after {args.max_new_tokens} tokens: finish reason '{finish}']", file=sys.stderr)
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
            history.append({"role": "user", "content": line})
            text, _ = bot.reply(history, args.max_new_tokens, args.temperature, out)
            out.write("\n")
            history.append({"role": "assistant", "content": text})
    finally:
        bot.close()


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (HF dir, .gguf, ONNX dir or 'default')", description=__doc__)
    p.add_argument("model", help="HF model directory, .gguf file, ONNX export directory, or 'default'")
    p.add_argument("--prompt", help="answer this one message and exit (no interactive loop)")
    p.add_argument("--system", help="system prompt (default: the chat template's own, if any)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: library default)")
    p.set_defaults(func=cmd_chat)
