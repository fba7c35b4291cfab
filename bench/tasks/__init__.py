"""Task plug-ins: one small module per task, listed in TASKS (name -> module path).

A multiple-choice module exposes `KIND = "mc"`, `FILES` (the data files it reads, relative to
--data-dir; `--remote` copies exactly these) and `load(data_dir, limit) -> list[dict]`, each item
`{"pairs": [(context, continuation), ...], "gold": int}`: every choice is scored as the summed
log-likelihood of its continuation after its context (lm-evaluation-harness style). A generation
module exposes `KIND = "generate"` and `load(...)` items `{"messages": [...], "reference": str}`.

Adding a task = one file here + one line in TASKS. A user's own multiple-choice file needs no code:
pass `--tasks path/to/mine.jsonl` (format in `bench/tasks/jsonl.py`).
"""
from __future__ import annotations

import importlib
from pathlib import Path

from edgesmith.errors import EdgesmithError

TASKS = {
    "arc_easy": "edgesmith.bench.tasks.arc_easy",
    "piqa": "edgesmith.bench.tasks.piqa",
    "winogrande": "edgesmith.bench.tasks.winogrande",
    "boolq": "edgesmith.bench.tasks.boolq",
    "copa": "edgesmith.bench.tasks.copa",
    "alpaca": "edgesmith.bench.tasks.alpaca",
}
JSONL_TASK = "edgesmith.bench.tasks.jsonl"  # any `--tasks FILE.jsonl`


def parse_tasks(spec: str | list[str] | None) -> list[str]:
    """'arc_easy,piqa,my.jsonl' -> validated list; `.jsonl` paths use the generic plug-in."""
    if not spec:
        return []
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    for n in names:
        if n.endswith(".jsonl"):
            if not Path(n).is_file():
                raise EdgesmithError(f"--tasks: {n}: no such file")
        elif n not in TASKS:
            raise EdgesmithError(f"--tasks: unknown task {n!r}; known: {', '.join(TASKS)} or a FILE.jsonl")
    return names


def get(name: str):
    """The plug-in module for a task name (a .jsonl path -> the generic jsonl module)."""
    return importlib.import_module(JSONL_TASK if name.endswith(".jsonl") else TASKS[name])


def task_key(name: str) -> str:
    """Name used in the results JSON ('mine' for 'path/to/mine.jsonl')."""
    return Path(name).stem if name.endswith(".jsonl") else name


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    import json

    if not path.is_file():
        raise EdgesmithError(f"{path}: task data not found (set --data-dir to the folder holding mc/ and instruct/)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EdgesmithError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            if limit and len(rows) >= limit:
                break
    return rows


def mc_item(path: Path, i: int, row: dict, context: str, choices_key: str = "choices", gold_key: str = "gold",
            delimiter: str = " ") -> dict:
    """Validate a {query, choices, gold} row and build its scoring pairs."""
    choices = row.get(choices_key)
    gold = row.get(gold_key)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise EdgesmithError(f"{path}: row {i}: '{choices_key}' must be a list of at least 2 strings")
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise EdgesmithError(f"{path}: row {i}: '{gold_key}' must be an index into {choices_key} (0..{len(choices) - 1})")
    return {"pairs": [(context, delimiter + c) for c in choices], "gold": gold}
