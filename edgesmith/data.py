"""Data I/O: read instruction, chat, QA and plain-text data in any common layout, normalise it to
one record shape, render it with the model's chat template, (`edgesmith data prepare` in edgesmith/prepare.py
splits and checks a dataset with them).

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

Records -> training examples (distill and finetune): `encode_split` renders each record, tokenises it with loss
only on the assistant's tokens (`assistant_spans`), and optionally packs the examples into fixed-length blocks.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgesmithError

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "qa", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}
ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


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


# ---------------------------------------------------------------- records -> training examples (distill and finetune)


def assistant_spans(record: dict, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (content + end-of-turn).

    Each assistant turn i spans from the end of render(messages[:i], add_generation_prompt=True) to the
    end of render(messages[:i+1]) (trailing whitespace excluded): the chat template decides where the
    answer starts, so the prompt and the role header carry no loss.
    """
    text = render(record, tokenizer)
    msgs = record["messages"]
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = render({**record, "messages": msgs[:i]}, tokenizer, add_generation_prompt=True) if i else None
        upto = render({**record, "messages": msgs[:i + 1]}, tokenizer).rstrip()
        if head is None or not text.startswith(upto) or not upto.startswith(head):
            # template is not prefix-stable (e.g. it rewrites earlier turns): fall back to the content itself
            start = text.rfind(m["content"])
            if start < 0:
                raise EdgesmithError("cannot locate an assistant turn in the rendered chat template")
            spans.append((start, start + len(m["content"])))
            continue
        spans.append((len(head), len(upto)))
    return text, spans


def encode_record(record: dict, tokenizer, max_length: int, assistant_only: bool = True) -> tuple[dict, bool]:
    """One record -> ({"input_ids", "labels"}, truncated?).

    Conversations: rendered with the chat template; with assistant_only the labels are IGNORE except on
    tokens whose first character lies inside an assistant span. Plain text: every token is a label.
    """
    if "text" in record and "messages" not in record:
        text, spans = record["text"], None
    elif assistant_only:
        text, spans = assistant_spans(record, tokenizer)
    else:
            text, spans = render(record, tokenizer), None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=spans is not None)
    ids = list(enc["input_ids"])
    if spans is None:
        labels = list(ids)
    else:
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _e) in zip(ids, enc["offset_mapping"])]
    from .modelio import bos_prefix

    bos = bos_prefix(tokenizer)
    if bos and ids[:1] != bos:  # Gemma: every text starts with BOS (no template adds it)
        ids, labels = bos + ids, [IGNORE] + labels
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}, truncated


def encode_records(records: list[dict], tokenizer, max_length: int, assistant_only: bool = True) -> tuple[list[dict], dict]:
    """Encode many records; drops those left with no label at all. Returns (examples, counts)."""
    out, counts = [], {"records": len(records), "truncated": 0, "no_labels": 0, "tokens": 0, "label_tokens": 0}
    for r in records:
        ex, trunc = encode_record(r, tokenizer, max_length, assistant_only)
        counts["truncated"] += int(trunc)
        n_lab = sum(1 for x in ex["labels"][1:] if x != IGNORE)
        if n_lab == 0:
            counts["no_labels"] += 1
            continue
        counts["tokens"] += len(ex["input_ids"])
        counts["label_tokens"] += n_lab
        ex["index"] = len(out)
        out.append(ex)
    return out, counts


def encode_split(train_recs: list[dict], val_recs: list[dict], tokenizer, max_length: int, packing: bool,
                 assistant_only: bool) -> tuple[list[dict], dict, list[dict], dict]:
    """Chat records -> (train examples, their counts, validation examples, their counts). With packing the examples
    are concatenated into max_length blocks, so nothing is truncated per example."""
    enc_len = 1 << 30 if packing else max_length
    train_ex, tr_counts = encode_records(train_recs, tokenizer, enc_len, assistant_only)
    val_ex, va_counts = encode_records(val_recs, tokenizer, enc_len, assistant_only) if val_recs else ([], {})
    if packing:
        train_ex = pack(train_ex, max_length)
        val_ex = pack(val_ex, max_length) if val_ex else []
    return train_ex, tr_counts, val_ex, va_counts


def load_split_records(spec: str | Path, val_fraction: float = 0.05, seed: int = 0, fmt: str = "auto",
                       columns: str | None = None, skip_bad: bool = False) -> tuple[list[dict], list[dict]]:
    """(train_records, validation_records) from a prepared split directory (train.jsonl, validation.jsonl
    from `edgesmith data prepare`) or any single file `edgesmith data` reads (a seeded val_fraction is held out)."""
    p = Path(spec)
    if p.is_dir() and (p / "train.jsonl").is_file():
        train_recs, _ = read_records(p / "train.jsonl", fmt, columns, skip_bad)
        val_recs: list[dict] = []
        if (p / "validation.jsonl").is_file() and (p / "validation.jsonl").stat().st_size > 0:
            val_recs, _ = read_records(p / "validation.jsonl", fmt, columns, skip_bad)
        return [_strip(r) for r in train_recs], [_strip(r) for r in val_recs]
    recs, _ = read_records(p, fmt, columns, skip_bad)
    recs = [_strip(r) for r in recs]
    order = list(range(len(recs)))
    random.Random(seed).shuffle(order)
    n_val = int(round(val_fraction * len(recs))) if len(recs) >= 20 else 0
    return [recs[i] for i in order[n_val:]], [recs[i] for i in order[:n_val]]


def _strip(rec: dict) -> dict:
    """Keep only the record keys (prepared rows also carry text/n_tokens/source)."""
    if "messages" in rec:
        return {k: rec[k] for k in ("messages", "tools") if k in rec}
    return {"text": rec["text"]}


def pack(examples: list[dict], seq_len: int, eos_id: int | None = None) -> list[dict]:
    """Concatenate examples (input_ids + labels) into blocks of exactly seq_len tokens.

    Documents attend across their boundaries inside a block (plain packing, as in most recipes);
    the first label of each document is masked so no token is predicted across a boundary.
    """
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        lab = list(e["labels"])
        if ids and lab:
            lab[0] = IGNORE
        ids += list(e["input_ids"])
        labels += lab
    blocks = []
    for s in range(0, len(ids) - seq_len + 1, seq_len):
        blocks.append({"input_ids": ids[s:s + seq_len], "labels": labels[s:s + seq_len]})
    rest = len(ids) % seq_len
    if rest > 1:
        blocks.append({"input_ids": ids[-rest:], "labels": labels[-rest:]})
    for i, b in enumerate(blocks):
        b["index"] = i
    return blocks
