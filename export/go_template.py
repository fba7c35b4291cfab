"""A Hugging Face Jinja chat template translated into Ollama's Go-template syntax (the `.Messages` range form).

The translator walks jinja2's own parse tree (parsed with transformers' settings: trim_blocks,
lstrip_blocks) and emits the equivalent Go-template actions for the subset chat templates use:
`for` over messages/tools, `if/elif/else`, `set` (plain and namespace), comparisons, and/or/not,
`loop.first/last/index0`, `messages[0]`, `add_generation_prompt`, string concatenation and a few
filters. Anything else raises `Untranslatable`, and the Modelfile (export/ollama.py) then leaves TEMPLATE
out so Ollama uses the template embedded in the GGUF.

Literal template text that could close a Modelfile's quotes (`\"\"\"`), open a Go action (`{{`) or be dropped
by Ollama's parser (non-printable characters) is written as a Go string literal action instead,
e.g. {{ "\\"\\"\\"" }}. Checked against Go's own text/template in tests/gotemplate.
"""
from __future__ import annotations

from edgesmith.errors import EdgesmithError

# Jinja attribute -> field of Ollama's api.Message / api.Tool / api.ToolCall
GO_FIELDS = {"role": "Role", "content": "Content", "tool_calls": "ToolCalls", "function": "Function",
             "name": "Name", "arguments": "Arguments", "description": "Description", "parameters": "Parameters",
             "type": "Type", "images": "Images", "thinking": "Thinking", "tool_name": "ToolName"}


class Untranslatable(EdgesmithError):
    """The chat template uses a construct with no Go-template equivalent here."""


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
