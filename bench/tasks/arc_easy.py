"""ARC-Easy test (`mc/arc_easy.jsonl`): "Question: ...\\nAnswer:" + " choice" (lm-eval's arc_easy prompt). Chance 25%."""
from pathlib import Path

from . import mc_item, read_jsonl

KIND = "mc"
FILES = ["mc/arc_easy.jsonl"]  # under --data-dir (copied by --remote)


def load(data_dir, limit=None):
    path = Path(data_dir) / "mc" / "arc_easy.jsonl"
    return [mc_item(path, i, r, r["query"] + "\nAnswer:") for i, r in enumerate(read_jsonl(path, limit), 1)]
