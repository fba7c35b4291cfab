"""WinoGrande dev (`mc/winogrande.jsonl`), partial scoring: the two options fill the blank in the
*context*, and only the shared continuation after it is scored (lm-eval's winogrande). acc_norm
equals acc here (same continuation for both options). Chance 50%."""
from pathlib import Path

from edgesmith.errors import EdgesmithError

from . import read_jsonl

KIND = "mc"
FILES = ["mc/winogrande.jsonl"]  # under --data-dir (copied by --remote)


def load(data_dir, limit=None):
    path = Path(data_dir) / "mc" / "winogrande.jsonl"
    out = []
    for i, r in enumerate(read_jsonl(path, limit), 1):
        opts, cont, gold = r.get("context_options"), r.get("continuation"), r.get("gold")
        if not (isinstance(opts, list) and len(opts) == 2 and isinstance(cont, str) and gold in (0, 1)):
            raise EdgesmithError(f"{path}: row {i}: expected context_options[2], continuation and gold 0/1")
        out.append({"pairs": [(o, " " + cont) for o in opts], "gold": gold})
    return out
