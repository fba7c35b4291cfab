"""BoolQ dev (`mc/boolq.jsonl`): "Passage: ...\\nQuestion: ...?\\nAnswer:" + " no" / " yes". Chance 50%."""
from pathlib import Path

from . import mc_item, read_jsonl

KIND = "mc"
FILES = ["mc/boolq.jsonl"]  # under --data-dir (copied by --remote)


def load(data_dir, limit=None):
    path = Path(data_dir) / "mc" / "boolq.jsonl"
    return [mc_item(path, i, r, r["query"] + "\nAnswer:") for i, r in enumerate(read_jsonl(path, limit), 1)]
