"""Hugging Face chat templates: read one from a model directory, render it as transformers does, and read
off what exporters need from it (the default system prompt, the stop strings).

Only json and jinja2 are imported (jinja2 ships with llama-cpp-python), so the device-side harness can render
templates without torch or transformers.
"""
from __future__ import annotations

import json
from pathlib import Path

from edgesmith.errors import EdgesmithError


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, tools=None,
                         special: dict | None = None, **extra) -> str:
    """Render a Hugging Face Jinja chat template the way transformers does (same environment and
    helpers), with jinja2 only (it ships with llama-cpp-python, so device installs have it)."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise EdgesmithError("chat templates need jinja2: pip install jinja2") from None
    from datetime import datetime

    def raise_exception(msg):
        raise EdgesmithError(f"chat template: {msg}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    kw = special_strings(special or {})  # bos_token, eos_token, ... as plain strings
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                tools=tools, **kw, **extra)
    except jinja2.TemplateError as e:
        raise EdgesmithError(f"chat template: {e}") from None


def read_chat_template(hf_dir: Path) -> tuple[str | None, dict]:
    """(Jinja chat template or None, tokenizer_config) from an HF directory."""
    cfg_path = hf_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    f = hf_dir / "chat_template.jinja"
    tpl = f.read_text(encoding="utf-8") if f.is_file() else cfg.get("chat_template")
    if isinstance(tpl, list):
        tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
    return tpl, cfg


def special_strings(cfg: dict) -> dict[str, str]:
    """bos_token/eos_token/... of a tokenizer_config as plain strings."""
    out = {}
    for k, v in cfg.items():
        if k.endswith("_token") and isinstance(v, (str, dict)):
            s = v.get("content") if isinstance(v, dict) else v
            if isinstance(s, str):
                out[k] = s
    return out


def _render(tpl: str, messages, cfg: dict) -> str:
    return render_chat_template(tpl, messages, add_generation_prompt=True, special=cfg)


def default_system_prompt(tpl: str, cfg: dict) -> str | None:
    """The system text the template inserts when the conversation has none (None if it adds none)."""
    sys_mark, user = "\u27e6SYSTEM-MARK\u27e7", [{"role": "user", "content": "\u27e6USER-MARK\u27e7"}]
    try:
        a = _render(tpl, [{"role": "system", "content": sys_mark}] + user, cfg)
        b = _render(tpl, user, cfg)
    except EdgesmithError:
        return None
    if sys_mark not in a:
        return None
    pre = a[: a.index(sys_mark)]
    post = a[a.index(sys_mark) + len(sys_mark):]
    if b.startswith(pre) and b.endswith(post) and len(b) > len(pre) + len(post):
        return b[len(pre): len(b) - len(post)]
    return None


def stop_strings(tpl: str, cfg: dict) -> list[str]:
    """The special token(s) the template writes right after an assistant turn, plus eos if the
    template uses it: what the model emits to end its answer. Nothing else (over-broad stops cut answers)."""
    specials = sorted({v.get("content") for v in (cfg.get("added_tokens_decoder") or {}).values()
                       if isinstance(v, dict) and v.get("special") and v.get("content")}
                      | set(special_strings(cfg).values()), key=len, reverse=True)
    mark = "\u27e6ANSWER-MARK\u27e7"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}, {"role": "user", "content": "again"}]
    stops: list[str] = []
    try:
        text = _render(tpl, conv, cfg)
    except EdgesmithError:
        text = ""
    if mark in text:
        after = text[text.index(mark) + len(mark):].lstrip(" \n")
        stops += [s for s in specials if after.startswith(s)][:1]
    eos = special_strings(cfg).get("eos_token")
    if eos and eos not in stops and (eos in text or not stops):
        stops.append(eos)
    return stops
