"""PIQA dev, the authors' files (`mc/piqa/valid.jsonl` + `valid-labels.lst`):
"Question: {goal}\\nAnswer:" + " {sol1|sol2}" (lm-eval's piqa prompt). Chance 50%."""
from pathlib import Path

from edgesmith.errors import EdgesmithError

from . import mc_item, read_jsonl

KIND = "mc"
FILES = ["mc/piqa/valid.jsonl", "mc/piqa/valid-labels.lst"]  # under --data-dir (copied by --remote)


def load(data_dir, limit=None):
    d = Path(data_dir) / "mc" / "piqa"
    rows = read_jsonl(d / "valid.jsonl", limit)
    labels_file = d / "valid-labels.lst"
    if not labels_file.is_file():
        raise EdgesmithError(f"{labels_file}: PIQA labels not found")
    labels = [int(x) for x in labels_file.read_text().split()]
    out = []
    for i, (r, y) in enumerate(zip(rows, labels), 1):
        item = {"choices": [r["sol1"], r["sol2"]], "gold": y}
        out.append(mc_item(d / "valid.jsonl", i, item, f"Question: {r['goal']}\nAnswer:"))
    return out
