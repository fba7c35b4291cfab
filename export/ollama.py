"""Ollama Modelfiles: `FROM ./NAME-QUANT.gguf` plus the model's chat template in Ollama's Go-template syntax
(export/go_template.py), its stop strings, sampling defaults and default system prompt
(edgesmith/chat_template.py). When the template cannot be translated, TEMPLATE is left out so Ollama uses
the template embedded in the GGUF (with a comment and a message saying why).

Ollama's Modelfile parser has no escape characters: a value ends at the first newline where the text
so far is a complete quoted string. So quoting is chosen per value (plain, "...", or \"\"\"...\"\"\") by
checking that the parser would read back exactly the value.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgesmith.chat_template import default_system_prompt, read_chat_template, special_strings, stop_strings
from edgesmith.errors import EdgesmithError
from edgesmith.export.go_template import Untranslatable, jinja_to_go
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
