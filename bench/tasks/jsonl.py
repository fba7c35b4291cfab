"""Bring your own multiple-choice task: a JSONL file, one object per line,

    {"query": "Question: What do plants need to make food?\\nAnswer:", "choices": ["sunlight", "sand"], "gold": 0}

Each choice is scored as `" " + choice` after `query` (the space is lm-evaluation-harness's target
delimiter; put any "Answer:" cue in the query yourself). `gold` is the index of the right choice.
Run it with `edgesmith bench MODEL --tasks path/to/mine.jsonl`; results appear under "mine".
"""
from pathlib import Path

from . import mc_item, read_jsonl

KIND = "mc"


def load(path, limit=None):
    path = Path(path)
    out = []
    for i, r in enumerate(read_jsonl(path, limit), 1):
        if not isinstance(r.get("query"), str):
            from edgesmith.errors import EdgesmithError

            raise EdgesmithError(f"{path}: row {i}: 'query' must be a string")
        out.append(mc_item(path, i, r, r["query"]))
    return out
