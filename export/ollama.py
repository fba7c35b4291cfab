"""Ollama Modelfiles: `FROM ./NAME-QUANT.gguf` plus the model's Jinja chat template translated into
Ollama's Go-template syntax (the `.Messages` range form), its stop strings, sampling defaults and
default system prompt.

The translator walks jinja2's own parse tree (parsed with transformers' settings: trim_blocks,
lstrip_blocks) and emits the equivalent Go-template actions for the subset chat templates use:
`for` over messages/tools, `if/elif/else`, `set` (plain and namespace), comparisons, and/or/not,
`loop.first/last/index0`, `messages[0]`, `add_generation_prompt`, string concatenation and a few
filters. Anything else raises `Untranslatable`, and the Modelfile then leaves TEMPLATE out so Ollama
uses the template embedded in the GGUF (with a comment and a message saying why).

Ollama's Modelfile parser has no escape characters: a value ends at the first newline where the text
so far is a complete quoted string. So quoting is chosen per value (plain, "...", or \"\"\"...\"\"\") by
checking that the parser would read back exactly the value; literal template text that could close the
quotes (`\"\"\"`), open a Go action (`{{`) or be dropped by the parser (non-printable characters) is
written as a Go string literal action instead, e.g. {{ "\\"\\"\\"" }}.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgesmith.errors import EdgesmithError
from edgesmith.fsutil import write_text

# small models ramble at high temperature: SmolLM2's card recommends 0.2 / top_p 0.9
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9
MAX_NUM_CTX = 4096  # KV cache memory on an edge device grows with it; the model's own limit if smaller
# What `ollama run` uses for an option the Modelfile leaves unset (Ollama's api.DefaultOptions). The
# Modelfile sets temperature, top_p and stop only, so these are part of how Ollama samples an exported
# model, and `edgesmith chat` must use them too to preview it.
OLLAMA_TOP_K = 40
OLLAMA_REPEAT_PENALTY = 1.1
OLLAMA_REPEAT_LAST_N = 64  # tokens of context (prompt included) the repeat penalty looks back over

# Jinja attribute -> field of Ollama's api.Message / api.Tool / api.ToolCall
GO_FIELDS = {"role": "Role", "content": "Content", "tool_calls": "ToolCalls", "function": "Function",
             "name": "Name", "arguments": "Arguments", "description": "Description", "parameters": "Parameters",
             "type": "Type", "images": "Images", "thinking": "Thinking", "tool_name": "ToolName"}


class Untranslatable(EdgesmithError):
    """The chat template uses a construct with no Go-template equivalent here."""


# ---------------------------------------------------------------- Modelfile value quoting


def _go_trim(s: str) -> str:
    # the parser keeps only printable runes, spaces, tabs and newlines, so this is Go's TrimSpace on them
    return s.strip(" \t\r\n")


def _unquote(s: str) -> tuple[str, bool]:
    """Ollama's parser.unquote."""
    if s[:3] == '"""':
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s[:1] == '"':
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _parser_keeps(c: str) -> bool:
    # ParseFile writes runes with strconv.IsPrint, plus the spaces/newlines that end a value attempt
    return c in " \t\r\n" or c.isprintable()


def quote_value(s: str) -> str | None:
    """The shortest spelling of `s` that Ollama's Modelfile parser reads back exactly, or None."""
    if not all(_parser_keeps(c) for c in s):
        return None
    if s and "\n" not in s and "\r" not in s and s == _go_trim(s) and _unquote(s) == (s, True):
        return s
    # multi-line text reads best (and is conventional in Modelfiles) between triple quotes
    for q in (('"""', '"') if "\n" in s else ('"', '"""')):
        text = q + s + q
        # the value must not look complete at any newline before its real end
        early = any(_unquote(_go_trim(text[:i]))[1] for i, c in enumerate(text) if c in "\r\n" and i < len(text) - len(q))
        if not early and _unquote(_go_trim(text)) == (s, True):
            return text
    return None


# ---------------------------------------------------------------- Jinja -> Go template


def _go_string(s: str) -> str:
    """A Go interpreted string literal for s."""
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def _literal(text: str) -> str:
    """Literal template text as-is when the Modelfile and Go can carry it, else as a string action."""
    risky = "{{" in text or text.endswith("{") or '"""' in text or not all(c in "\t\n" or c.isprintable() for c in text)
    return "{{ " + _go_string(text) + " }}" if risky else text


def _bare(e: str) -> str:
    """`(eq a b)` -> `eq a b` when the outer parentheses enclose the whole pipeline."""
    if not (e.startswith("(") and e.endswith(")")):
        return e
    depth, in_str, esc = 0, False, False
    for i, c in enumerate(e):
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
            continue
        if c == '"':
            in_str = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0 and i != len(e) - 1:
                return e
    return e[1:-1]


class _Translator:
    def __init__(self, special: dict[str, str]):
        self.special = special  # bos_token etc. -> their strings (constants in a GGUF-backed model)
        self.loops: list[tuple[str, str, str]] = []  # (jinja target, go index var, go collection)
        self.vars: list[str] = []  # Go variables assigned by `set`, declared once at the top
        self.namespaces: set[str] = set()
        self.uses_gen = False
        self.notes: list[str] = []

    # pieces: ("lit", text) | ("act", go action body)
    def body(self, nodes) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for n in nodes:
            out += self.stmt(n)
        return out

    def stmt(self, n) -> list[tuple[str, str]]:
        from jinja2 import nodes as J

        if isinstance(n, J.Output):
            out = []
            for x in n.nodes:
                out += [("lit", x.data)] if isinstance(x, J.TemplateData) else self.out(x)
            return out
        if isinstance(n, J.If):
            out = [("act", "if " + _bare(self.expr(n.test)))] + self.body(n.body)
            for e in n.elif_:
                out += [("act", "else if " + _bare(self.expr(e.test)))] + self.body(e.body)
            if n.else_:
                out += [("act", "else")] + self.body(n.else_)
            return out + [("act", "end")]
        if isinstance(n, J.For):
            if not isinstance(n.target, J.Name) or n.test is not None or n.recursive:
                raise Untranslatable("a for loop with several targets, a filter or recursion")
            coll = self.expr(n.iter)
            idx = "$" + "ijklmn"[len(self.loops)] if len(self.loops) < 6 else f"$i{len(self.loops)}"
            self.loops.append((n.target.name, idx, coll))
            try:
                out = [("act", f"range {idx}, ${n.target.name} := {coll}")] + self.body(n.body)
                if n.else_:
                    out += [("act", "else")] + self.body(n.else_)
            finally:
                self.loops.pop()
            return out + [("act", "end")]
        if isinstance(n, J.Assign):
            if isinstance(n.node, J.Call) and isinstance(n.node.node, J.Name) and n.node.node.name == "namespace":
                if not isinstance(n.target, J.Name):
                    raise Untranslatable("namespace() assigned to a non-name")
                self.namespaces.add(n.target.name)
                return [("act", f"{self._var(n.target.name + '_' + kw.key)} = {self.expr(kw.value)}") for kw in n.node.kwargs]
            if isinstance(n.target, J.NSRef):
                return [("act", f"{self._var(n.target.name + '_' + n.target.attr)} = {self.expr(n.node)}")]
            if isinstance(n.target, J.Name):
                return [("act", f"{self._var(n.target.name)} = {self.expr(n.node)}")]
            raise Untranslatable("tuple assignment in {% set %}")
        raise Untranslatable(f"the {type(n).__name__} statement")

    def _var(self, name: str) -> str:
        if name not in self.vars:
            self.vars.append(name)
        return "$" + name

    def out(self, x) -> list[tuple[str, str]]:
        """Pieces that print expression x."""
        from jinja2 import nodes as J

        if isinstance(x, J.Const) and isinstance(x.value, str):
            return [("lit", x.value)]
        if isinstance(x, J.Name) and x.name in self.special:
            return [("lit", self.special[x.name])]
        if isinstance(x, (J.Add, J.Concat)):
            parts = [x.left, x.right] if isinstance(x, J.Add) else x.nodes
            return [p for part in parts for p in self.out(part)]
        if isinstance(x, J.CondExpr):
            out = [("act", "if " + _bare(self.expr(x.test)))] + self.out(x.expr1)
            if x.expr2 is not None:
                out += [("act", "else")] + self.out(x.expr2)
            return out + [("act", "end")]
        if isinstance(x, J.Call) and isinstance(x.node, J.Name) and x.node.name == "raise_exception":
            self.notes.append("raise_exception() dropped: Ollama renders instead of rejecting the conversation")
            return []
        return [("act", self.expr(x))]

    def expr(self, x) -> str:
        """A Go-template operand (parenthesised when it is a call)."""
        from jinja2 import nodes as J

        if isinstance(x, J.Const):
            v = x.value
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, int):
                return str(v)
            if isinstance(v, str):
                return _go_string(v)
            raise Untranslatable(f"the constant {v!r}")
        if isinstance(x, J.Name):
            for target, _, _ in self.loops:
                if x.name == target:
                    return "$" + x.name
            if x.name == "messages":
                return "$.Messages"
            if x.name == "tools":
                return "$.Tools"
            if x.name == "add_generation_prompt":
                self.uses_gen = True
                return "$add_generation_prompt"
            if x.name in self.special:
                return _go_string(self.special[x.name])
            if x.name in self.vars:
                return "$" + x.name
            raise Untranslatable(f"the variable {x.name!r}")
        if isinstance(x, (J.Getattr, J.Getitem)):
            key = x.attr if isinstance(x, J.Getattr) else (x.arg.value if isinstance(x.arg, J.Const) else None)
            if isinstance(x.node, J.Name) and x.node.name == "loop" and self.loops:
                _, idx, coll = self.loops[-1]
                if key == "first":
                    return f"(eq {idx} 0)"
                if key == "last":
                    return f"(eq (len (slice {coll} {idx})) 1)"
                if key == "index0":
                    return idx
                raise Untranslatable(f"loop.{key}")
            if isinstance(x.node, J.Name) and x.node.name in self.namespaces and isinstance(key, str):
                return "$" + x.node.name + "_" + key
            base = self.expr(x.node)
            if isinstance(key, str):
                return f"{base}.{GO_FIELDS.get(key, key[:1].upper() + key[1:])}"
            if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
                return f"(index {base} {key})"
            if isinstance(x, J.Getitem) and isinstance(x.arg, J.Slice) and x.arg.stop is None and x.arg.step is None \
                    and isinstance(x.arg.start, J.Const) and isinstance(x.arg.start.value, int) and x.arg.start.value >= 0:
                return f"(slice {base} {x.arg.start.value})"
            raise Untranslatable("negative or computed indexing")
        if isinstance(x, J.Compare) and len(x.ops) == 1:
            a, op = self.expr(x.expr), x.ops[0]
            if op.op in ("eq", "ne"):
                return f"({op.op} {a} {self.expr(op.expr)})"
            if op.op in ("in", "notin") and isinstance(op.expr, (J.List, J.Tuple)):
                any_ = "(or " + " ".join(f"(eq {a} {self.expr(e)})" for e in op.expr.items) + ")"
                return any_ if op.op == "in" else f"(not {any_})"
            raise Untranslatable(f"the comparison {op.op!r}")
        if isinstance(x, J.And):
            return f"(and {self.expr(x.left)} {self.expr(x.right)})"
        if isinstance(x, J.Or):
            return f"(or {self.expr(x.left)} {self.expr(x.right)})"
        if isinstance(x, J.Not):
            return f"(not {self.expr(x.node)})"
        if isinstance(x, J.Test) and x.name in ("defined", "none"):
            # Go has no `undefined`: a missing field is its zero value, which is falsy like None
            self.notes.append(f"'is {x.name}' tested by truthiness")
            return self.expr(x.node) if x.name == "defined" else f"(not {self.expr(x.node)})"
        if isinstance(x, J.Filter):
            arg = self.expr(x.node)
            if x.name == "tojson":
                self.notes.append("tojson -> Ollama's json (compact JSON, Ollama's field order)")
                return f"(json {arg})"
            if x.name == "length":
                return f"(len {arg})"
            if x.name == "trim":
                self.notes.append("trim filter dropped (no Go equivalent): surrounding whitespace is kept")
                return arg
            raise Untranslatable(f"the filter {x.name!r}")
        if isinstance(x, (J.Add, J.Concat)):
            parts = [x.left, x.right] if isinstance(x, J.Add) else x.nodes
            return "(print " + " ".join(self.expr(p) for p in parts) + ")"
        raise Untranslatable(f"the expression {type(x).__name__}")


def jinja_to_go(template: str, special: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """Translate a Hugging Face Jinja chat template to an Ollama Go template -> (template, notes)."""
    import jinja2
    from jinja2.ext import loopcontrols

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    try:
        ast = env.parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise Untranslatable(f"the chat template does not parse ({e})") from None
    t = _Translator(special or {})
    pieces = t.body(ast.body)
    head: list[tuple[str, str]] = [("act", f"${v} := false") for v in t.vars]
    if t.uses_gen:
        # Ollama has no add_generation_prompt: its convention is to open an assistant turn unless the
        # conversation already ends with one (which it then continues)
        head += [("act", "$add_generation_prompt := true"), ("act", "range $.Messages"),
                 ("act", '$add_generation_prompt = ne .Role "assistant"'), ("act", "end")]
    out, lit = [], []
    for kind, text in head + pieces:
        if kind == "lit":
            lit.append(text)
            continue
        if lit:
            out.append(_literal("".join(lit)))
            lit = []
        out.append("{{ " + text + " }}")
    if lit:
        out.append(_literal("".join(lit)))
    return "".join(out), sorted(set(t.notes))


# ---------------------------------------------------------------- reading the HF chat template


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
    from edgesmith.export.onnx import render_chat_template

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


# ---------------------------------------------------------------- the Modelfile


def _num_ctx(hf_dir: Path) -> int:
    try:
        cfg = json.loads((hf_dir / "config.json").read_text())
        return int(min(cfg.get("max_position_embeddings") or 2048, MAX_NUM_CTX))
    except (OSError, ValueError, TypeError):
        return 2048


# ---------------------------------------------------------------- sampling: the one source of the defaults


@dataclass(frozen=True)
class Sampling:
    """How `ollama run` samples from a model edgesmith exported: the Modelfile's PARAMETERs plus Ollama's
    defaults for the options the Modelfile leaves unset. `edgesmith chat` samples with exactly these."""

    temperature: float
    top_p: float
    top_k: int = OLLAMA_TOP_K
    repeat_penalty: float = OLLAMA_REPEAT_PENALTY
    repeat_last_n: int = OLLAMA_REPEAT_LAST_N
    stop: tuple[str, ...] = ()


def generation_config(model_dir: Path) -> dict:
    try:
        gen = json.loads((Path(model_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return gen if isinstance(gen, dict) else {}


def sampling_defaults(tpl: str | None, tok_cfg: dict, gen: dict) -> Sampling:
    """The sampling defaults of a model from its chat template, its tokenizer config (special tokens) and
    its generation config: the generation config's temperature/top_p when it samples (else the small-model
    defaults above), the stop strings that end an answer in the template, and Ollama's defaults for the rest.
    The Modelfile writer and `edgesmith chat` (HF, GGUF and ONNX alike) both take their values from here."""
    if gen.get("do_sample") and isinstance(gen.get("temperature"), (int, float)):
        temp, top_p = float(gen["temperature"]), float(gen.get("top_p") or DEFAULT_TOP_P)
    else:
        temp, top_p = DEFAULT_TEMPERATURE, DEFAULT_TOP_P
    stops = stop_strings(tpl, tok_cfg) if tpl else [s for s in [special_strings(tok_cfg).get("eos_token")] if s]
    return Sampling(temp, top_p, stop=tuple(stops))


def model_sampling(model_dir: Path) -> Sampling:
    """sampling_defaults of an HF directory (or an ONNX export directory, which carries the same files)."""
    tpl, cfg = read_chat_template(Path(model_dir))
    return sampling_defaults(tpl, cfg, generation_config(model_dir))


def _quote_or_fail(s: str, what: str) -> str:
    q = quote_value(s)
    if q is None:
        raise EdgesmithError(f"{what} {s!r} cannot be written in a Modelfile (non-printable characters)")
    return q


def modelfile_text(gguf_name: str, hf_dir: Path, quant: str) -> tuple[str, dict]:
    """The Modelfile text for `FROM ./gguf_name` and what went into it (the checks)."""
    hf_dir = Path(hf_dir)
    tpl, cfg = read_chat_template(hf_dir)
    checks: dict[str, Any] = {"from": f"./{gguf_name}", "quant": quant}
    lines = [f"# Ollama Modelfile written by edgesmith: ollama create NAME -f {'Modelfile.' + quant}",
             f"FROM {_quote_or_fail('./' + gguf_name, 'FROM path')}"]
    go = None
    if not tpl:
        # a base model: Ollama gets the prompt as is (raw completion), said in the file and in export.json
        lines += ["# the model has no chat template (a base model): the prompt is passed through unchanged, a raw",
                  "# text completion without turns, system prompt or history", "TEMPLATE {{ .Prompt }}"]
        checks["template"] = "pass-through {{ .Prompt }} (the model has no chat template)"
        reason = None
    else:
        try:
            go, notes = jinja_to_go(tpl, special_strings(cfg))
            reason = None
            checks["template_notes"] = notes
        except Untranslatable as e:
            reason = f"chat template not translatable to Go ({e})"
    if not tpl:
        pass  # the pass-through TEMPLATE is written above
    elif go is not None and quote_value(go) is not None:
        lines.append(f"TEMPLATE {quote_value(go)}")
        checks["template"] = "translated from the Jinja chat template"
    else:
        reason = reason or "the translated template cannot be quoted in a Modelfile"
        lines.append(f"# TEMPLATE left out: {reason}; Ollama uses the chat template embedded in the GGUF")
        checks["template"] = f"embedded in GGUF ({reason})"
        print(f"edgesmith export: note: Modelfile.{quant}: {reason}; relying on the GGUF's embedded template", file=sys.stderr)
    system = default_system_prompt(tpl, cfg) if tpl else None
    if system is not None:
        q = quote_value(system)
        if q is None:
            # the translated TEMPLATE still carries it (as a Go string literal), so nothing is lost
            lines.append("# SYSTEM left out: the default system prompt cannot be quoted in a Modelfile")
            checks["system"] = "not representable; kept in TEMPLATE"
        else:
            lines.append(f"SYSTEM {q}")
            checks["system"] = system
    sampling = sampling_defaults(tpl, cfg, generation_config(hf_dir))
    stops = list(sampling.stop)
    for s in stops:
        q = quote_value(s) if (" " in s or s.startswith('"')) else '"' + s + '"'
        if q is None or _unquote(q) != (s, True):
            raise EdgesmithError(f"{hf_dir}: stop string {s!r} cannot be written in a Modelfile")
        lines.append(f"PARAMETER stop {q}")
    from edgesmith.modelio import model_license

    lic = model_license(hf_dir)
    if lic:
        q = quote_value(lic)
        if q is None:
            lines.append("# LICENSE left out: the license text cannot be quoted in a Modelfile (non-printable characters)")
            checks["license"] = "not representable; left out"
        else:
            lines.append(f"LICENSE {q}")
            checks["license"] = lic
    temp, top_p = sampling.temperature, sampling.top_p
    lines += [f"PARAMETER num_ctx {_num_ctx(hf_dir)}", f"PARAMETER temperature {temp:g}", f"PARAMETER top_p {top_p:g}"]
    # the whole sampling record (Ollama's defaults included) goes into export.json: `edgesmith chat` on the
    # export directory reads it back, so it previews this Modelfile without parsing it
    checks.update(stops=stops, num_ctx=_num_ctx(hf_dir), temperature=temp, sampling=asdict(sampling))
    return "\n".join(lines) + "\n", checks


def write_modelfile(gguf_path: Path, hf_dir: Path, out_path: Path, quant: str) -> dict:
    """Write a Modelfile for `gguf_path` (need not exist yet) at `out_path`; FROM is relative to the
    Modelfile's folder, so `ollama create NAME -f DIR/Modelfile.Q4_K_M` works from anywhere."""
    gguf_path, out_path = Path(gguf_path), Path(out_path)
    if gguf_path.resolve().parent != out_path.resolve().parent:
        raise EdgesmithError(f"{out_path}: a Modelfile must sit next to its GGUF ({gguf_path})")
    text, checks = modelfile_text(gguf_path.name, hf_dir, quant)
    write_text(out_path, text)
    return {"path": str(out_path), "type": "modelfile", "size_bytes": out_path.stat().st_size, "checks": checks}
