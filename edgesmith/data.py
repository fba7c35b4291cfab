"""Data I/O: read instruction, chat, QA and plain-text data in any common layout, normalise it to
one record shape, render it with the model's chat template, and split it (`edgesmith data prepare`).

Record shapes (what every stage consumes):
    {"messages": [{"role": "system|user|assistant|tool", "content": str}, ...], "tools": [...]?}
    {"text": str}

Input layouts (auto-detected per file, or --format):
    alpaca    {instruction, input?, output, system?, history?}
    sharegpt  {conversations: [{from, value}], tools?, system?}   (roles human/gpt/system/function_call/observation)
    messages  {messages: [{role, content}], tools?}
    qa        {question, answer}
    text      {text} rows, or a .txt file (one record per blank-line-separated paragraph)
Files: .json (a list or {"data": [...]}), .jsonl, .csv, .tsv, .parquet, .txt, or a directory saved with
`datasets.Dataset.save_to_disk`. `--columns output=response,instruction=prompt` maps your column names.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import EdgesmithError
from .fsutil import atomic_open, ensure_writable_dir, write_json

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "qa", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}
ROLES = ("system", "user", "assistant", "tool")


class RowError(EdgesmithError):
    """A malformed row: names the file, the 1-based row number and the field."""

    def __init__(self, path: str, row: int, field_: str, message: str):
        self.path, self.row, self.field, self.detail = str(path), row, field_, message
        super().__init__(f"{path}: row {row}: field '{field_}': {message}")


# ---------------------------------------------------------------- reading raw rows


@dataclass
class _BadLine:
    """A JSONL line that did not parse."""

    reason: str


def _read_json_rows(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise EdgesmithError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8 first") from None
    if not text.strip():
        raise EdgesmithError(f"{path}: file is empty")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:  # reported in row order (or skipped with --skip-bad)
                rows.append((i, _BadLine(f"invalid JSON ({e.msg} at column {e.colno})")))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise EdgesmithError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if "data" in data and isinstance(data["data"], list):
            data = data["data"]
        elif len(lists) == 1:
            data = lists[0]
        else:
            data = [data]
    if not isinstance(data, list):
        raise EdgesmithError(f"{path}: expected a JSON list of rows")
    return list(enumerate(data, 1))


def _read_table_rows(path: Path) -> list[Any]:
    """CSV/TSV/Parquet/datasets directories through the `datasets` library."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        elif path.suffix in (".csv", ".tsv"):
            ds = datasets.load_dataset("csv", data_files=str(path), split="train",
                                       delimiter="\t" if path.suffix == ".tsv" else ",")
        elif path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            raise EdgesmithError(f"{path}: unsupported file type (expected .json, .jsonl, .csv, .tsv, .parquet, .txt or a datasets directory)")
    except EdgesmithError:
        raise
    except Exception as e:  # noqa: BLE001 - parser errors of every kind
        raise EdgesmithError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if len(ds) == 0:
        raise EdgesmithError(f"{path}: no rows")
    # CSV row numbers count the header line: data row k is file line k+1
    offset = 2 if path.suffix in (".csv", ".tsv") else 1
    return [(i + offset, row) for i, row in enumerate(ds)]


def _read_text_rows(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise EdgesmithError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8 first") from None
    paras, start, buf = [], 1, []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            if not buf:
                start = i
            buf.append(line)
        elif buf:
            paras.append((start, {"text": "\n".join(buf)}))
            buf = []
    if buf:
        paras.append((start, {"text": "\n".join(buf)}))
    if not paras:
        raise EdgesmithError(f"{path}: file is empty")
    return paras


def read_rows(path: str | Path) -> list[tuple[int, Any]]:
    """(row_number, raw_row) pairs from any supported file or datasets directory."""
    p = Path(path)
    if not p.exists():
        raise EdgesmithError(f"{p}: no such data file")
    if p.is_file() and p.stat().st_size == 0:
        raise EdgesmithError(f"{p}: file is empty")
    if p.suffix in (".json", ".jsonl"):
        return _read_json_rows(p)
    if p.suffix in (".txt", ".raw", ".md"):
        return _read_text_rows(p)
    return _read_table_rows(p)


# ---------------------------------------------------------------- normalising rows


def detect_format(row: Any) -> str:
    if isinstance(row, dict):
        if "conversations" in row:
            return "sharegpt"
        if "messages" in row:
            return "messages"
        if "instruction" in row and "output" in row:
            return "alpaca"
        if "question" in row and "answer" in row:
            return "qa"
        if "text" in row:
            return "text"
    return "unknown"


def _str_field(row: dict, key: str, path, n, required=True) -> str:
    v = row.get(key)
    if v is None:
        if required:
            raise RowError(path, n, key, "missing")
        return ""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise RowError(path, n, key, f"expected a string, got {type(v).__name__}")
    return v


def _tools(row: dict, path, n):
    t = row.get("tools")
    if t in (None, "", []):
        return None
    if isinstance(t, str):
        try:
            t = json.loads(t)
        except json.JSONDecodeError as e:
            raise RowError(path, n, "tools", f"not valid JSON ({e.msg})") from None
    if isinstance(t, dict):
        t = [t]
    if not isinstance(t, list):
        raise RowError(path, n, "tools", "expected a list of tool definitions")
    return t


def normalise(row: Any, fmt: str, path: str, n: int) -> dict:
    """One raw row -> a record (see module docstring); RowError on malformed rows."""
    if isinstance(row, _BadLine):
        raise RowError(path, n, "-", row.reason)
    if not isinstance(row, dict):
        raise RowError(path, n, "-", f"expected an object, got {type(row).__name__}")
    if fmt == "auto":
        fmt = detect_format(row)
        if fmt == "unknown":
            raise RowError(path, n, "-", f"cannot tell the format from keys {sorted(row)[:8]} "
                           "(expected instruction/output, conversations, messages, question/answer or text)")
    if fmt == "text":
        return {"text": _str_field(row, "text", path, n)}
    msgs: list[dict] = []
    if fmt == "alpaca":
        system = _str_field(row, "system", path, n, required=False)
        if system:
            msgs.append({"role": "system", "content": system})
        hist = row.get("history") or []
        if not isinstance(hist, list):
            raise RowError(path, n, "history", "expected a list of [prompt, response] pairs")
        for j, pair in enumerate(hist):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RowError(path, n, f"history[{j}]", "expected [prompt, response]")
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        instr = _str_field(row, "instruction", path, n)
        inp = _str_field(row, "input", path, n, required=False)
        msgs.append({"role": "user", "content": f"{instr}\n\n{inp}" if inp.strip() else instr})
        msgs.append({"role": "assistant", "content": _str_field(row, "output", path, n)})
    elif fmt == "qa":
        msgs = [{"role": "user", "content": _str_field(row, "question", path, n)},
                {"role": "assistant", "content": _str_field(row, "answer", path, n)}]
    elif fmt in ("sharegpt", "messages"):
        key, rk, ck = ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
        conv = row.get(key)
        if not isinstance(conv, list) or not conv:
            raise RowError(path, n, key, "expected a non-empty list of turns")
        system = row.get("system")
        if isinstance(system, str) and system.strip():
            msgs.append({"role": "system", "content": system})
        for j, turn in enumerate(conv):
            if not isinstance(turn, dict):
                raise RowError(path, n, f"{key}[{j}]", "expected an object")
            role = turn.get(rk)
            role = SHAREGPT_ROLES.get(role, role) if fmt == "sharegpt" else role
            if role not in ROLES:
                raise RowError(path, n, f"{key}[{j}].{rk}", f"unknown role {turn.get(rk)!r}")
            content = turn.get(ck)
            if not isinstance(content, str):
                raise RowError(path, n, f"{key}[{j}].{ck}", "expected a string")
            msgs.append({"role": role, "content": content})
    else:
        raise EdgesmithError(f"unknown data format {fmt!r} (expected one of {', '.join(FORMATS)})")
    rec: dict = {"messages": msgs}
    tools = _tools(row, path, n)
    if tools:
        rec["tools"] = tools
    return rec


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """'output=response,instruction=prompt' -> {'response': 'output', 'prompt': 'instruction'} (theirs -> ours)."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return {v: k for k, v in spec.items()}
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise EdgesmithError(f"--columns: expected OURS=THEIRS pairs like output=response, got {part!r}")
        ours, theirs = (s.strip() for s in part.split("=", 1))
        out[theirs] = ours
    return out


def read_records(path: str | Path, fmt: str = "auto", columns: str | dict | None = None,
                 skip_bad: bool = False) -> tuple[list[dict], list[dict]]:
    """Read and normalise one file; returns (records, bad_rows). Without skip_bad the first malformed
    row raises a RowError naming file, row and field."""
    if fmt not in FORMATS:
        raise EdgesmithError(f"--format: unknown data format {fmt!r} (expected one of {', '.join(FORMATS)})")
    rename = parse_columns(columns)
    records, bad = [], []
    for n, row in read_rows(path):
        if rename and isinstance(row, dict):
            row = {rename.get(k, k): v for k, v in row.items()}
        try:
            records.append(normalise(row, fmt, str(path), n))
        except RowError as e:
            if not skip_bad:
                raise
            bad.append({"file": e.path, "row": e.row, "field": e.field, "reason": e.detail})
    if not records:
        raise EdgesmithError(f"{path}: no usable rows" + (f" ({len(bad)} malformed)" if bad else ""))
    return records, bad


def render(record: dict, tokenizer, add_generation_prompt: bool = False) -> str:
    """The record as the model sees it: plain text as-is, conversations through the chat template."""
    if "text" in record:
        return record["text"]
    msgs = record["messages"]
    if add_generation_prompt and msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if getattr(tokenizer, "chat_template", None):
        kw = {"tools": record["tools"]} if record.get("tools") else {}
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)
    # no template: a plain, documented fallback
    text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs)
    return text + ("assistant: " if add_generation_prompt else "")


# ---------------------------------------------------------------- prepare


@dataclass
class PrepareConfig:
    """Settings of `edgesmith data prepare`."""

    inputs: list[str] = field(default_factory=list)
    """Data files or datasets directories to read."""
    out: str = "out/data"
    """Output directory for train/validation/test JSONL and summary.json."""
    model: str = "default"
    """Model whose tokenizer and chat template render the rows (HF dir, .gguf or 'default')."""
    format: str = "auto"
    """Input layout: auto, alpaca, sharegpt, messages, qa or text."""
    columns: str = ""
    """Column renames OURS=THEIRS, comma-separated (e.g. output=response)."""
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])
    """Train/validation/test ratios."""
    seed: int = 0
    """Shuffle seed: the same seed gives the same splits."""
    max_length: int = 2048
    """Rows longer than this many tokens are dropped (reported as too_long)."""
    skip_bad: bool = False
    """Skip and report malformed rows instead of stopping at the first one."""

    def __post_init__(self):
        from .errors import ConfigError

        if len(self.split) != 3 or any(r < 0 for r in self.split) or not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            raise ConfigError("split", f"expected three non-negative ratios summing to 1, got {self.split}")
        if self.format not in FORMATS:
            raise ConfigError("format", f"expected one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.max_length < 1:
            raise ConfigError("max_length", "expected a positive integer")


def _assistant_empty(rec: dict) -> bool:
    if "text" in rec:
        return not rec["text"].strip()
    last = [m for m in rec["messages"] if m["role"] == "assistant"]
    return not last or not last[-1]["content"].strip()


def percentiles(values: Iterable[int], qs=(50, 90, 95, 99)) -> dict:
    v = sorted(values)
    if not v:
        return {}
    out = {f"p{q}": v[min(len(v) - 1, int(math.ceil(q / 100 * len(v))) - 1)] for q in qs}
    out.update(min=v[0], max=v[-1], mean=round(sum(v) / len(v), 1))
    return out


def prepare(cfg: PrepareConfig) -> Path:
    from .modelio import load_tokenizer

    if not cfg.inputs:
        raise EdgesmithError("data prepare: no input files given")
    out = ensure_writable_dir(cfg.out)
    kept, dropped = [], {"malformed": 0, "empty_output": 0, "too_long": 0}
    bad_rows = []
    lengths = []
    # every input is read and checked before the (slow) tokenizer load: bad data fails in milliseconds
    per_file = []
    for path in cfg.inputs:
        recs, bad = read_records(path, cfg.format, cfg.columns, cfg.skip_bad)
        dropped["malformed"] += len(bad)
        bad_rows += bad
        per_file.append((path, recs))
    tok = load_tokenizer(cfg.model)
    for path, recs in per_file:
        for r in recs:
            if _assistant_empty(r):
                dropped["empty_output"] += 1
                continue
            text = render(r, tok)
            n = len(tok(text, add_special_tokens=False).input_ids)
            if n > cfg.max_length:
                dropped["too_long"] += 1
                continue
            kept.append({**r, "text": text, "n_tokens": n, "source": str(path)})
            lengths.append(n)
    if not kept:
        raise EdgesmithError(f"data prepare: every row was dropped ({dropped})")
    rng = random.Random(cfg.seed)
    order = list(range(len(kept)))
    rng.shuffle(order)
    n_val = int(round(cfg.split[1] * len(kept)))
    n_test = int(round(cfg.split[2] * len(kept)))
    n_train = len(kept) - n_val - n_test
    splits = {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    for name, idx in splits.items():
        with atomic_open(out / f"{name}.jsonl") as f:
            for i in idx:
                f.write(json.dumps(kept[i], ensure_ascii=False) + "\n")
    summary = {
        "inputs": cfg.inputs, "model": cfg.model, "seed": cfg.seed, "split": cfg.split,
        "counts": {k: len(v) for k, v in splits.items()}, "kept": len(kept),
        "dropped": dropped, "bad_rows": bad_rows[:100], "tokens": percentiles(lengths),
    }
    write_json(out / "summary.json", summary)
    return out


def cmd_prepare(args) -> int:
    from .config import ConfigError

    try:
        split = [float(x) for x in args.split.split(",")]
    except ValueError:
        raise ConfigError("--split", f"expected three comma-separated numbers, got {args.split!r}") from None
    cfg = PrepareConfig(inputs=args.inputs, out=args.out, model=args.model, format=args.format, columns=args.columns or "",
                        split=split, seed=args.seed, max_length=args.max_length, skip_bad=args.skip_bad)
    out = prepare(cfg)
    s = json.loads((out / "summary.json").read_text())
    c, d, t = s["counts"], s["dropped"], s["tokens"]
    print(f"kept {s['kept']} rows -> train {c['train']}, validation {c['validation']}, test {c['test']}  ({out})")
    print(f"dropped: malformed {d['malformed']}, empty output {d['empty_output']}, too long {d['too_long']}")
    print("tokens: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    for b in s["bad_rows"][:5]:
        print(f"  skipped {b['file']}: row {b['row']}: field '{b['field']}': {b['reason']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="read, normalise and split datasets", description=__doc__,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    q = dsub.add_parser("prepare", help="normalise, render with the chat template and split into train/validation/test JSONL")
    q.add_argument("inputs", nargs="+", help="data files (.json .jsonl .csv .tsv .parquet .txt) or datasets directories")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--model", default="default", help="model whose tokenizer/chat template is used (default: default)")
    q.add_argument("--format", default="auto", choices=FORMATS, help="input layout (default: auto-detect per row)")
    q.add_argument("--columns", default="", help="column renames OURS=THEIRS, e.g. output=response,instruction=prompt")
    q.add_argument("--split", default="0.9,0.05,0.05", help="train,validation,test ratios (default 0.9,0.05,0.05)")
    q.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    q.add_argument("--max-length", type=int, default=2048, help="drop rows longer than this many tokens (default 2048)")
    q.add_argument("--skip-bad", action="store_true", help="skip and report malformed rows instead of failing")
    q.set_defaults(func=cmd_prepare)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
