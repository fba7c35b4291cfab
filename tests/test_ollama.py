"""Ollama Modelfiles: the Jinja -> Go template translation renders byte-identically to
transformers' apply_chat_template (checked with a small renderer of the Go-template subset the
translator emits), values survive Ollama's Modelfile grammar (a port of its parser below), and the
golden Modelfile in Modelfiles/ is what the code generates."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgesmith.export.ollama import jinja_to_go, quote_value, write_modelfile

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO / "Modelfiles"
# the shipped recipes' model names (pipeline `name:`); all share SmolLM2's tokenizer and chat template:
# the embedded default, recipes/smollm2-edge-cpu.yaml (pruned + distilled student), recipes/lora-alpaca.yaml
GOLDEN_NAMES = ("smollm2-135m-instruct", "smollm2-edge-cpu", "smollm2-lora-alpaca")

# ---------------------------------------------------------------- Ollama's Modelfile parser (parser/parser.go)

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message", "requires"}


def _unquote(s):
    if s[:3] == '"""':
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s[:1] == '"':
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Rune-by-rune port of Ollama's ParseFile state machine -> [(command, args)]."""
    NIL, NAME, VALUE, PARAM, COMMENT = range(5)
    cmds, name, buf, curr = [], "", "", NIL
    space, newline = " \t", "\r\n"
    for r in text:
        # parseRuneForState
        if curr == NIL:
            nxt, keep = (COMMENT, None) if r == "#" else (NIL, None) if r in space + newline else (NAME, r)
        elif curr == NAME:
            if r.isascii() and r.isalpha():
                nxt, keep = NAME, r
            elif r in space:
                nxt, keep = VALUE, None
            else:
                raise ValueError(f"invalid command near {buf + r!r}")
        elif curr == VALUE:
            nxt, keep = (NIL, r) if r in newline + space else (VALUE, r)
        elif curr == PARAM:
            if (r.isascii() and r.isalnum()) or r == "_":
                nxt, keep = PARAM, r
            elif r in space:
                nxt, keep = VALUE, None
            else:
                raise ValueError("unexpected EOF in parameter name")
        else:  # COMMENT
            nxt, keep = (NIL, None) if r in newline else (COMMENT, None)
        if nxt != curr:
            if curr == NAME:
                if buf.lower() not in COMMANDS:
                    raise ValueError(f"invalid command {buf!r}")
                if buf.lower() == "parameter":
                    nxt = PARAM
                else:
                    name = "model" if buf.lower() == "from" else buf.lower()
            elif curr == PARAM:
                name = buf
            elif curr == VALUE:
                s, ok = _unquote(buf.strip(" \t\r\n"))
                if not ok or r in space:
                    buf += r
                    continue
                cmds.append((name, s))
            buf, curr = "", nxt
        if keep is not None and keep.isprintable():
            buf += keep
    if curr == VALUE:
        s, ok = _unquote(buf.strip(" \t\r\n"))
        if not ok:
            raise ValueError("unexpected EOF in a quoted value")
        cmds.append((name, s))
    elif curr not in (NIL, COMMENT):
        raise ValueError("unexpected EOF")
    if not any(c == "model" for c, _ in cmds):
        raise ValueError("no FROM line")
    return cmds


# ---------------------------------------------------------------- a renderer for the Go-template subset we emit

_TOK = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(:=|=|,|\(|\))|(\$[\w]*(?:\.\w+)*|\.\w+(?:\.\w+)*|\.)|(\.\w+(?:\.\w+)*)|(-?\d+)|(\w+))')


def _go_unquote(lit: str) -> str:
    esc = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
    return re.sub(r'\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)',
                  lambda m: chr(int(m.group(1)[1:], 16)) if m.group(1)[0] in "uU" and len(m.group(1)) > 1 else esc[m.group(1)],
                  lit[1:-1])


def _tokens(src: str) -> list[str]:
    out, i = [], 0
    src = src.strip()
    while i < len(src):
        m = _TOK.match(src, i)
        if not m or m.end() == i:
            raise ValueError(f"cannot tokenize action {src!r} at {i}")
        out.append(m.group().strip())
        i = m.end()
    return out


def _split_actions(src: str) -> list[str]:
    """Text and `{{ ... }}` actions; a `}}` inside a Go string literal does not close the action."""
    parts, i = [], 0
    while True:
        j = src.find("{{", i)
        if j < 0:
            parts.append(src[i:])
            return [p for p in parts if p]
        parts.append(src[i:j])
        k, in_str = j + 2, False
        while not (not in_str and src.startswith("}}", k)):
            if k >= len(src):
                raise ValueError("unclosed action")
            if in_str and src[k] == "\\":
                k += 2
                continue
            in_str ^= src[k] == '"'
            k += 1
        parts.append(src[j:k + 2])
        i = k + 2


def _truthy(v) -> bool:
    return bool(v) if v is not None else False


def _field(v, name):
    if isinstance(v, dict):
        return v.get(name, "")
    return getattr(v, name, "")


class GoTemplate:
    """text/template subset: text, {{ pipeline }}, if/else if/else/end, range (with $i, $x :=), :=/=,
    $ / $var / .Field chains, (pipeline).Field, funcs and/or/not/eq/ne/len/index/slice/print/json."""

    def __init__(self, src: str):
        self.parts = _split_actions(src)
        self.pos = 0
        self.tree = self._block(("<eof>",))

    def _block(self, stops):
        nodes = []
        while self.pos < len(self.parts):
            p = self.parts[self.pos]
            self.pos += 1
            if not (p.startswith("{{") and p.endswith("}}")):
                nodes.append(("text", p))
                continue
            body = p[2:-2]
            if body.startswith("-") or body.endswith("-"):
                raise ValueError("trim markers are not emitted by the translator")
            body = body.strip()
            head = body.split(" ", 1)[0]
            if head in ("end", "else") and head in stops or (head == "else" and "else" in stops):
                return nodes, body
            if head == "if":
                branches, rest = [], body[3:]
                while True:
                    blk, term = self._block(("end", "else"))
                    branches.append((_tokens(rest), blk))
                    if term == "end":
                        nodes.append(("if", branches, []))
                        break
                    if term.startswith("else if "):
                        rest = term[len("else if "):]
                        continue
                    els, _ = self._block(("end",))
                    nodes.append(("if", branches, els))
                    break
            elif head == "range":
                spec = _tokens(body[6:])
                decl = []
                if ":=" in spec:
                    k = spec.index(":=")
                    decl = [t for t in spec[:k] if t != ","]
                    spec = spec[k + 1:]
                blk, term = self._block(("end", "else"))
                els = self._block(("end",))[0] if term == "else" else []
                nodes.append(("range", decl, spec, blk, els))
            else:
                toks = _tokens(body)
                if len(toks) > 2 and toks[0].startswith("$") and toks[1] in (":=", "="):
                    nodes.append(("set", toks[0], toks[1], toks[2:]))
                else:
                    nodes.append(("print", toks))
        if "<eof>" not in stops:
            raise ValueError(f"unterminated block, expected {stops}")
        return nodes, None

    def render(self, data: dict) -> str:
        out: list[str] = []
        self._exec(self.tree[0], data, [{"$": data}], out)
        return "".join(out)

    def _lookup(self, scopes, name):
        for s in reversed(scopes):
            if name in s:
                return s
        raise KeyError(f"undefined variable {name}")

    def _exec(self, nodes, dot, scopes, out):
        for n in nodes:
            kind = n[0]
            if kind == "text":
                out.append(n[1])
            elif kind == "print":
                v = self._pipe(n[1], dot, scopes)
                out.append("true" if v is True else "false" if v is False else "" if v is None else str(v))
            elif kind == "set":
                v = self._pipe(n[3], dot, scopes)
                if n[2] == ":=":
                    scopes[-1][n[1]] = v
                else:
                    self._lookup(scopes, n[1])[n[1]] = v
            elif kind == "if":
                for cond, blk in n[1]:
                    if _truthy(self._pipe(cond, dot, scopes)):
                        self._exec(blk, dot, scopes + [{}], out)
                        break
                else:
                    self._exec(n[2], dot, scopes + [{}], out)
            elif kind == "range":
                seq = self._pipe(n[2], dot, scopes) or []
                if not seq:
                    self._exec(n[4], dot, scopes + [{}], out)
                for i, item in enumerate(seq):
                    s = {}
                    if len(n[1]) == 2:
                        s[n[1][0]], s[n[1][1]] = i, item
                    elif len(n[1]) == 1:
                        s[n[1][0]] = item
                    self._exec(n[3], item, scopes + [s], out)

    def _pipe(self, toks, dot, scopes):
        vals, i = [], 0
        while i < len(toks):
            v, i = self._operand(toks, i, dot, scopes)
            vals.append(v)
        if callable(vals[0]):
            return vals[0](*vals[1:])
        assert len(vals) == 1, toks
        return vals[0]

    def _operand(self, toks, i, dot, scopes):
        t = toks[i]
        if t == "(":
            depth, j = 0, i
            while True:
                depth += toks[j] == "("
                depth -= toks[j] == ")"
                if depth == 0:
                    break
                j += 1
            v = self._pipe(toks[i + 1:j], dot, scopes)
            j += 1
            while j < len(toks) and toks[j].startswith(".") and toks[j] != ".":
                for f in toks[j][1:].split("."):
                    v = _field(v, f)
                j += 1
            return v, j
        if t.startswith('"'):
            return _go_unquote(t), i + 1
        if t in ("true", "false"):
            return t == "true", i + 1
        if re.fullmatch(r"-?\d+", t):
            return int(t), i + 1
        if t.startswith("$"):
            head, *fields = t.split(".")
            v = self._lookup(scopes, head)[head]
            for f in fields:
                v = _field(v, f)
            return v, i + 1
        if t.startswith("."):
            v = dot
            for f in t[1:].split(".") if t != "." else []:
                v = _field(v, f)
            return v, i + 1
        funcs = {
            "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
            "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
            "not": lambda a: not _truthy(a), "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b,
            "len": len, "index": lambda a, *k: _index(a, k), "slice": lambda a, s=0: a[s:],
            "print": lambda *a: "".join(str(x) for x in a),
            "json": lambda a: __import__("json").dumps(a, separators=(",", ":")),
        }
        if t in funcs:
            return funcs[t], i + 1
        raise ValueError(f"unknown token {t!r}")


def _index(a, keys):
    for k in keys:
        a = a[k]
    return a


def ollama_messages(conv):
    """What Ollama passes as .Messages: api.Message structs (Role, Content, ToolCalls, ...)."""
    return [{"Role": m["role"], "Content": m.get("content", "")} for m in conv]


def render_go(go_template: str, conv, tools=None) -> str:
    return GoTemplate(go_template).render({"Messages": ollama_messages(conv), "Tools": tools or []})


# ---------------------------------------------------------------- templates and conversations

CHATML_NO_DEFAULT = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TOOLS = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\nMake it short."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": 'Quotes """ and {{ braces }} and <|im_start|> stay literal'}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _hf(tok, template, conv):
    return tok.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", ["default", "chatml_no_default", "llama3"])
def test_translated_template_renders_like_transformers(name, hf_tokenizer, tokenizer_dir):
    template = {"default": (tokenizer_dir / "chat_template.jinja").read_text(),
                "chatml_no_default": CHATML_NO_DEFAULT, "llama3": LLAMA3}[name]
    go, notes = jinja_to_go(template, {"bos_token": hf_tokenizer.bos_token, "eos_token": hf_tokenizer.eos_token})
    if name == "llama3":
        assert any("trim" in n for n in notes)  # the approximation is reported, not hidden
    for conv in CONVERSATIONS:
        assert render_go(go, conv) == _hf(hf_tokenizer, template, conv), (name, conv)


def test_qwen2_style_tools_template(hf_tokenizer):
    """Qwen2-style template with a tools branch and tool-call turns: conversations render
    byte-identically; with tools, the only difference is Ollama's compact `json` for each tool."""
    import json

    go, notes = jinja_to_go(QWEN2_TOOLS)
    assert any("json" in n for n in notes)
    for conv in CONVERSATIONS:
        assert render_go(go, conv) == _hf(hf_tokenizer, QWEN2_TOOLS, conv)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    conv = CONVERSATIONS[1]
    want = hf_tokenizer.apply_chat_template(conv, tools=[tool], chat_template=QWEN2_TOOLS, tokenize=False, add_generation_prompt=True)
    assert json.dumps(tool) in want
    assert render_go(go, conv, tools=[tool]) == want.replace(json.dumps(tool), json.dumps(tool, separators=(",", ":")))


def test_template_needing_arithmetic_is_untranslatable():
    from edgesmith.export.ollama import Untranslatable

    with pytest.raises(Untranslatable, match="Sub|index"):
        jinja_to_go("{% for m in messages %}{% if messages[loop.index0 - 1].role != 'tool' %}x{% endif %}{% endfor %}")


def test_default_system_prompt_and_stops(default_hf, tmp_path):
    entry = write_modelfile(tmp_path / "smollm2-135m-instruct-Q4_K_M.gguf", default_hf, tmp_path / "Modelfile.Q4_K_M", "Q4_K_M")
    cmds = parse_modelfile(Path(entry["path"]).read_text())
    names = [c for c, _ in cmds]
    assert names == ["model", "template", "system", "stop", "license", "num_ctx", "temperature", "top_p"]
    d = dict(cmds)
    assert d["license"] == "apache-2.0" == entry["checks"]["license"]  # from the GGUF's general.license
    assert d["model"] == "./smollm2-135m-instruct-Q4_K_M.gguf"
    assert d["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert [a for c, a in cmds if c == "stop"] == ["<|im_end|>"]  # one stop, the end-of-turn token
    assert entry["type"] == "modelfile" and entry["size_bytes"] == Path(entry["path"]).stat().st_size
    assert entry["checks"]["template"].startswith("translated")


def _hostile_hf(tmp_path, tokenizer_dir, system: str) -> Path:
    """An HF dir (tokenizer files only: the Modelfile needs no weights) whose template's default system
    prompt is `system`."""
    import json
    import shutil

    d = tmp_path / "hostile"
    d.mkdir()
    for f in tokenizer_dir.iterdir():
        if f.name != "chat_template.jinja":
            shutil.copy(f, d / f.name)
    tpl = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\\n' + " + json.dumps(system) + " + '<|im_end|>\\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (d / "chat_template.jinja").write_text(tpl)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
    return d


@pytest.mark.parametrize("system", [
    'Say """ then stop"""\nPARAMETER temperature 9\nFROM /etc/passwd',
    "two\nlines {{ .Prompt }} and }} {{",
    '"quoted"\n"',
    'ends with """',
    "tab\there \u200b zero-width",
])
def test_hostile_system_prompt_cannot_break_the_file(system, tmp_path, tokenizer_dir, hf_tokenizer):
    hf = _hostile_hf(tmp_path, tokenizer_dir, system)
    entry = write_modelfile(tmp_path / "m-Q8_0.gguf", hf, tmp_path / "Modelfile.Q8_0", "Q8_0")
    cmds = parse_modelfile((tmp_path / "Modelfile.Q8_0").read_text())
    names = [c for c, _ in cmds]
    assert names[:2] == ["model", "template"] and names.count("model") == 1 and names.count("temperature") == 1
    d = dict(cmds)
    assert d["model"] == "./m-Q8_0.gguf" and d["temperature"] == "0.2"
    if "system" in d:
        assert d["system"] == system
    else:  # Ollama has no escapes; the default still reaches the model through TEMPLATE
        assert quote_value(system) is None and entry["checks"]["system"].startswith("not representable")
    template = (hf / "chat_template.jinja").read_text()
    for conv in CONVERSATIONS:
        assert render_go(d["template"], conv) == _hf(hf_tokenizer, template, conv)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('"ab {}\n\t\r#\\') + ["\u00e9", "\u200b"]), max_size=24))
def test_quote_value_round_trips_through_ollamas_parser(s):
    q = quote_value(s)
    if q is None:
        # only line breaks (a value can end at one) or characters the parser drops make a value unwritable
        assert any(not (c in " \t\r\n" or c.isprintable()) for c in s) or "\n" in s or "\r" in s
        return
    cmds = parse_modelfile(f"FROM ./x.gguf\nSYSTEM {q}\nPARAMETER stop \"<|im_end|>\"\n")
    assert cmds == [("model", "./x.gguf"), ("system", s), ("stop", "<|im_end|>")]


def test_untranslatable_template_falls_back_to_gguf_template(tmp_path, tokenizer_dir, capsys):
    hf = _hostile_hf(tmp_path, tokenizer_dir, "x")
    (hf / "chat_template.jinja").write_text("{% macro turn(m) %}{{ m.content }}{% endmacro %}"
                                            "{% for m in messages %}{{ turn(m) }}{% endfor %}")
    entry = write_modelfile(tmp_path / "m-Q4_0.gguf", hf, tmp_path / "Modelfile.Q4_0", "Q4_0")
    text = (tmp_path / "Modelfile.Q4_0").read_text()
    names = [c for c, _ in parse_modelfile(text)]
    assert names[0] == "model" and "template" not in names and "stop" in names
    assert "TEMPLATE left out" in text and "Macro" in entry["checks"]["template"]
    assert "relying on the GGUF's embedded template" in capsys.readouterr().err


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_modelfile_is_regenerated_byte_for_byte(name, default_hf, tmp_path):
    """Modelfiles/ keeps the reviewed Modelfile of each shipped recipe's model; the code must still write it."""
    golden = GOLDEN_DIR / name / "Modelfile.Q4_K_M"
    out = tmp_path / "Modelfile.Q4_K_M"
    write_modelfile(tmp_path / f"{name}-Q4_K_M.gguf", default_hf, out, "Q4_K_M")
    assert out.read_bytes() == golden.read_bytes(), f"translator output changed for {name}: review, then regenerate (Modelfiles/README.md)"
    assert f"FROM ./{name}-Q4_K_M.gguf\n" in golden.read_text()


def test_every_golden_modelfile_is_tested():
    assert sorted(p.parent.name for p in GOLDEN_DIR.glob("*/Modelfile.*")) == sorted(GOLDEN_NAMES)
