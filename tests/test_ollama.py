"""Ollama Modelfiles, checked with the engine Ollama uses: tests/gotemplate (built by the `ollama` fixture)
parses each Modelfile with a port of Ollama's parser and renders chats with Go's own text/template, as
Ollama's /api/chat does (Modelfile SYSTEM as the first message, same-role turns collated, `.Messages`
templates given the whole chat). The prompt must equal transformers' apply_chat_template byte for byte
for every Modelfile the exporter writes; values must survive Ollama's Modelfile grammar; and the golden
Modelfiles in Modelfiles/ must be what the code generates."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgesmith.export.go_template import jinja_to_go
from edgesmith.export.ollama import quote_value, write_modelfile

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO / "Modelfiles"
# the shipped recipes' model names (pipeline `name:`); all share SmolLM2's tokenizer and chat template:
# the embedded default, recipes/smollm2-edge-cpu.yaml (pruned + distilled student), recipes/lora-alpaca.yaml
GOLDEN_NAMES = ("smollm2-135m-instruct", "smollm2-edge-cpu", "smollm2-lora-alpaca")
# `make export` writes one Modelfile per GGUF type (Makefile EXPORT_QUANTS)
EXPORT_QUANTS = ("F16", "Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0")

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
    # no system prompt: Ollama inserts the Modelfile's SYSTEM, the HF template its default
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    # multi-turn, with and without a system prompt
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\nMake it short."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?"}],
    # non-ASCII (accents, CJK, emoji outside the BMP, RTL)
    [{"role": "system", "content": "Réponds en français, s'il te plaît."},
     {"role": "user", "content": "Grüße aus Köln — 東京は晴れ 🎉 שלום"}, {"role": "assistant", "content": "Très bien ✓"},
     {"role": "user", "content": "Ελληνικά; ½ × π ≈ 1.57"}],
    # quotes and backslashes
    [{"role": "system", "content": 'Say "yes" or \'no\'; paths like C:\\temp\\new are literal'},
     {"role": "user", "content": 'He wrote """triple""" and "\\n" (a backslash, not a newline) and ends with \\'}],
    # template syntax in the content is text: Go, Jinja and Ollama's parser must all leave it alone
    [{"role": "user", "content": 'Explain {{ .Prompt }} and {{- .System -}} and {{ end }} in Go templates'},
     {"role": "assistant", "content": "{% raw %}{{ x }}{% endraw %} is Jinja; {% if true %}also{% endif %}"},
     {"role": "user", "content": 'And {% raw %} alone, {{ "}}" }}, <|im_start|> and <|im_end|>?'}],
    [{"role": "system", "content": "{{ .System }} {% raw %}"}, {"role": "user", "content": "{{ .Response }}"}],
]


def _hf(tok, conv, template=None, tools=None) -> str:
    return tok.apply_chat_template(conv, chat_template=template, tools=tools, tokenize=False, add_generation_prompt=True)


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return _tokenizer(tokenizer_dir)


def _modelfile(go_template: str) -> str:
    q = quote_value(go_template)
    assert q is not None, "the translated template cannot be written in a Modelfile"
    return f"FROM ./m.gguf\nTEMPLATE {q}\n"


def _model_dir(tmp_path, tokenizer_dir, template: str, name="tiny") -> Path:
    """A tiny model directory for write_modelfile: SmolLM2's tokenizer with `template` as its chat template,
    and a config (a Modelfile needs no weights)."""
    d = tmp_path / name
    d.mkdir()
    for f in tokenizer_dir.iterdir():
        if f.name != "chat_template.jinja":
            shutil.copy(f, d / f.name)
    (d / "chat_template.jinja").write_text(template)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
    return d


def _assert_ollama_renders_like_hf(ollama, modelfile: str, tok, convs=CONVERSATIONS):
    for conv in convs:
        assert ollama.chat_prompt(modelfile, conv) == _hf(tok, conv), conv


# ---------------------------------------------------------------- the harness is Ollama's behaviour


def test_harness_follows_ollama(ollama):
    """tests/gotemplate reproduces what Ollama does around text/template (expectations from Ollama's
    template/template_test.go and server/routes.go), so a pass below means Ollama renders the same."""
    chat = [{"role": "user", "content": "Hello friend!"}, {"role": "assistant", "content": "Hello human!"},
            {"role": "user", "content": "What is your name?"}]
    want = ("<|im_start|>system\nYou are a helpful assistant!<|im_end|>\n<|im_start|>user\nHello friend!<|im_end|>\n"
            "<|im_start|>assistant\nHello human!<|im_end|>\n<|im_start|>user\nWhat is your name?<|im_end|>\n"
            "<|im_start|>assistant\n")
    # the Modelfile's SYSTEM becomes the first message of a chat that has none
    messages = ('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                '{{ end }}<|im_start|>assistant\n"""\nSYSTEM You are a helpful assistant!\n')
    assert ollama.chat_prompt("FROM ./m.gguf\n" + messages, chat) == want
    # a legacy .System/.Prompt/.Response template runs once per turn and the last run stops at .Response
    legacy = ('TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}'
              '<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"""\n'
              'system """You are a helpful assistant!"""\n')  # commands are case-insensitive
    assert ollama.chat_prompt("from ./m.gguf\n" + legacy, chat) == want
    # a system message in the request replaces SYSTEM; consecutive same-role messages are joined by a blank line
    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert ollama.chat_prompt("FROM ./m.gguf\n" + messages, two) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na\n\nb<|im_end|>\n<|im_start|>assistant\n"
    # only Ollama's functions exist: an unknown one is refused when the template is parsed (ollama create)
    from ollama_go import ModelfileRejected

    with pytest.raises(ModelfileRejected, match="not defined"):
        ollama.chat_prompt('FROM ./m.gguf\nTEMPLATE "{{ tojson .Messages }}"\n', chat)
    assert ollama.chat_prompt('FROM ./m.gguf\nTEMPLATE "{{ range .Messages }}{{ json .Content }}{{ end }}"\n', chat) == \
        '"Hello friend!""Hello human!""What is your name?"'


# ---------------------------------------------------------------- the translator, template by template


@pytest.mark.parametrize("name", ["default", "chatml_no_default", "llama3"])
def test_translated_template_renders_like_transformers(name, ollama, hf_tokenizer, tokenizer_dir):
    template = {"default": (tokenizer_dir / "chat_template.jinja").read_text(),
                "chatml_no_default": CHATML_NO_DEFAULT, "llama3": LLAMA3}[name]
    go, notes = jinja_to_go(template, {"bos_token": hf_tokenizer.bos_token, "eos_token": hf_tokenizer.eos_token})
    if name == "llama3":
        # the approximation is reported, not hidden (no test content has surrounding whitespace to trim)
        assert any("trim" in n for n in notes)
    for conv in CONVERSATIONS:
        assert ollama.chat_prompt(_modelfile(go), conv) == _hf(hf_tokenizer, conv, template), (name, conv)


TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOL_CHAT = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "22°C, sunny"}]


def test_qwen2_style_tools_template(ollama, hf_tokenizer):
    """Qwen2-style template with a tools branch and tool-call turns: chats render byte-identically; with
    tools or tool calls, the only difference is Ollama's `json` (compact) where transformers' tojson has spaces."""
    go, notes = jinja_to_go(QWEN2_TOOLS)
    assert any("json" in n for n in notes)
    modelfile = _modelfile(go)
    for conv in CONVERSATIONS:
        assert ollama.chat_prompt(modelfile, conv) == _hf(hf_tokenizer, conv, QWEN2_TOOLS), conv
    conv = CONVERSATIONS[1]
    want = _hf(hf_tokenizer, conv, QWEN2_TOOLS, tools=[TOOL])
    assert json.dumps(TOOL) in want
    assert ollama.chat_prompt(modelfile, conv, tools=[TOOL]) == want.replace(json.dumps(TOOL), json.dumps(TOOL, separators=(",", ":")))
    want = _hf(hf_tokenizer, TOOL_CHAT, QWEN2_TOOLS)
    assert '"arguments": {"city": "Paris"}' in want
    assert ollama.chat_prompt(modelfile, TOOL_CHAT) == want.replace('{"city": "Paris"}', '{"city":"Paris"}')


def test_template_needing_arithmetic_is_untranslatable():
    from edgesmith.export.go_template import Untranslatable

    with pytest.raises(Untranslatable, match="Sub|index"):
        jinja_to_go("{% for m in messages %}{% if messages[loop.index0 - 1].role != 'tool' %}x{% endif %}{% endfor %}")


# ---------------------------------------------------------------- the Modelfiles the exporter writes


@pytest.fixture(scope="module")
def shipped_modelfiles(default_hf, tmp_path_factory) -> dict[str, str]:
    """Every Modelfile shipped for the embedded default model: the goldens in Modelfiles/ and the one
    `make export` writes per GGUF type (write_modelfile is what the export stage calls)."""
    out = tmp_path_factory.mktemp("export")
    files = {f"Modelfiles/{p.parent.name}/{p.name}": p.read_text() for p in sorted(GOLDEN_DIR.glob("*/Modelfile.*"))}
    for q in EXPORT_QUANTS:
        write_modelfile(out / f"smollm2-135m-instruct-{q}.gguf", default_hf, out / f"Modelfile.{q}", q)
        files[f"export/Modelfile.{q}"] = (out / f"Modelfile.{q}").read_text()
    return files


def test_shipped_modelfiles_render_like_transformers(shipped_modelfiles, ollama, default_hf):
    tok = _tokenizer(default_hf)
    assert len(shipped_modelfiles) == len(GOLDEN_NAMES) + len(EXPORT_QUANTS)
    for name, text in shipped_modelfiles.items():
        names = [c for c, _ in ollama.parse(text)]
        assert names.count("template") == 1 and names.count("system") == 1, name
        for conv in CONVERSATIONS:
            assert ollama.chat_prompt(text, conv) == _hf(tok, conv), (name, conv)


def test_default_system_prompt_and_stops(default_hf, ollama, tmp_path):
    entry = write_modelfile(tmp_path / "smollm2-135m-instruct-Q4_K_M.gguf", default_hf, tmp_path / "Modelfile.Q4_K_M", "Q4_K_M")
    cmds = ollama.parse(Path(entry["path"]).read_text())
    names = [c for c, _ in cmds]
    assert names == ["model", "template", "system", "stop", "license", "num_ctx", "temperature", "top_p"]
    d = dict(cmds)
    assert d["license"] == "apache-2.0" == entry["checks"]["license"]  # from the GGUF's general.license
    assert d["model"] == "./smollm2-135m-instruct-Q4_K_M.gguf"
    assert d["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert [a for c, a in cmds if c == "stop"] == ["<|im_end|>"]  # one stop, the end-of-turn token
    assert entry["type"] == "modelfile" and entry["size_bytes"] == Path(entry["path"]).stat().st_size
    assert entry["checks"]["template"].startswith("translated")


def test_tiny_model_with_a_default_system_prompt(ollama, tmp_path, tokenizer_dir):
    """A model whose template inserts a default system message when the chat has none (Qwen2's): the
    default goes to SYSTEM, which Ollama inserts as the first message, and every chat renders as in transformers."""
    hf = _model_dir(tmp_path, tokenizer_dir, QWEN2_TOOLS)
    entry = write_modelfile(tmp_path / "tiny-Q8_0.gguf", hf, tmp_path / "Modelfile.Q8_0", "Q8_0")
    text = Path(entry["path"]).read_text()
    d = dict(ollama.parse(text))
    assert d["system"] == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." == entry["checks"]["system"]
    tok = _tokenizer(hf)
    _assert_ollama_renders_like_hf(ollama, text, tok)
    # the default also holds when the Modelfile's SYSTEM is not used: a request's own system message replaces it
    assert ollama.chat_prompt(text, CONVERSATIONS[1]).startswith("<|im_start|>system\nYou answer in one word.<|im_end|>")


def _default_system_template(system: str) -> str:
    """A ChatML template whose default system prompt is `system` (any text, as a Jinja string literal)."""
    return ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\n' + " + json.dumps(system) + " + '<|im_end|>\\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("system", [
    'Say """ then stop"""\nPARAMETER temperature 9\nFROM /etc/passwd',
    "two\nlines {{ .Prompt }} and }} {{",
    '"quoted"\n"',
    'ends with """',
    "tab\there \u200b zero-width",
    "Tu es « SmolLM » — réponds {% raw %} \\ brièvement",
])
def test_hostile_system_prompt_cannot_break_the_file(system, ollama, tmp_path, tokenizer_dir):
    hf = _model_dir(tmp_path, tokenizer_dir, _default_system_template(system), "hostile")
    entry = write_modelfile(tmp_path / "m-Q8_0.gguf", hf, tmp_path / "Modelfile.Q8_0", "Q8_0")
    text = (tmp_path / "Modelfile.Q8_0").read_text()
    cmds = ollama.parse(text)
    names = [c for c, _ in cmds]
    assert names[:2] == ["model", "template"] and names.count("model") == 1 and names.count("temperature") == 1
    d = dict(cmds)
    assert d["model"] == "./m-Q8_0.gguf" and d["temperature"] == "0.2"
    if "system" in d:
        assert d["system"] == system
    else:  # Ollama has no escapes; the default still reaches the model through TEMPLATE
        assert quote_value(system) is None and entry["checks"]["system"].startswith("not representable")
    _assert_ollama_renders_like_hf(ollama, text, _tokenizer(hf))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('"ab {}\n\t\r#\\') + ["\u00e9", "\u200b"]), max_size=24))
def test_quote_value_round_trips_through_ollamas_parser(ollama, s):
    q = quote_value(s)
    if q is None:
        # only line breaks (a value can end at one) or characters the parser drops make a value unwritable
        assert any(not (c in " \t\r\n" or c.isprintable()) for c in s) or "\n" in s or "\r" in s
        return
    cmds = ollama.parse(f"FROM ./x.gguf\nSYSTEM {q}\nPARAMETER stop \"<|im_end|>\"\n")
    assert cmds == [("model", "./x.gguf"), ("system", s), ("stop", "<|im_end|>")]


def test_untranslatable_template_falls_back_to_gguf_template(ollama, tmp_path, tokenizer_dir, capsys):
    hf = _model_dir(tmp_path, tokenizer_dir, "{% macro turn(m) %}{{ m.content }}{% endmacro %}"
                                             "{% for m in messages %}{{ turn(m) }}{% endfor %}")
    entry = write_modelfile(tmp_path / "m-Q4_0.gguf", hf, tmp_path / "Modelfile.Q4_0", "Q4_0")
    text = (tmp_path / "Modelfile.Q4_0").read_text()
    names = [c for c, _ in ollama.parse(text)]
    assert names[0] == "model" and "template" not in names and "stop" in names
    assert ollama.chat_prompt(text, CONVERSATIONS[0]) is None  # Ollama uses the GGUF's template
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
