"""COPA validation (`mc/copa.jsonl`): "premise, therefore|because" + " choice". 100 items: noisy. Chance 50%."""
from pathlib import Path

from . import mc_item, read_jsonl

KIND = "mc"
FILES = ["mc/copa.jsonl"]  # under --data-dir (copied by --remote)


def load(data_dir, limit=None):
    path = Path(data_dir) / "mc" / "copa.jsonl"
    return [mc_item(path, i, r, r["query"]) for i, r in enumerate(read_jsonl(path, limit), 1)]
