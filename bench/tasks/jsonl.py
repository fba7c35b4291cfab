"""Bring your own task: a JSONL file, one object per line. Two shapes, told apart by their keys.

Multiple choice (scored by log-likelihood, reports acc / acc_norm):

    {"query": "Question: What do plants need to make food?\\nAnswer:", "choices": ["sunlight", "sand"], "gold": 0}

Each choice is scored as `" " + choice` after `query` (the space is lm-evaluation-harness's target
delimiter; put any "Answer:" cue in the query yourself). `gold` is the index of the right choice.

Generation (greedy, chat template of the artifact; exact match, ROUGE-L, BLEU, chrF, success rate,
mean output length and time), either Alpaca-style or chat-style -- e.g. the `test.jsonl` written by
`edgesmith data prepare`:

    {"instruction": "Name a primary color.", "input": "", "output": "Red."}
    {"messages": [{"role": "user", "content": "Name a primary color."}, {"role": "assistant", "content": "Red."}]}

(the last assistant message is the reference; the messages before it are the prompt).
Run it with `edgesmith bench MODEL --tasks path/to/mine.jsonl`; results appear under "mine".
"""
from pathlib import Path

from edgesmith.errors import EdgesmithError

from . import mc_item, read_jsonl

KIND = "mc"  # per file: load() returns generation items for generation rows (the harness checks the items)
FILES: list[str] = []  # the file is the task (copied by --remote as is)


def load(path, limit=None):
    path = Path(path)
    out = []
    for i, r in enumerate(read_jsonl(path, limit), 1):
        if not isinstance(r, dict):
            raise EdgesmithError(f"{path}: row {i}: expected a JSON object")
        if "choices" in r:
            if not isinstance(r.get("query"), str):
                raise EdgesmithError(f"{path}: row {i}: 'query' must be a string")
            out.append(mc_item(path, i, r, r["query"]))
        elif "messages" in r:
            msgs = r["messages"]
            if (not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs)
                    or msgs[-1].get("role") != "assistant" or not isinstance(msgs[-1].get("content"), str)):
                raise EdgesmithError(f"{path}: row {i}: 'messages' must end with an assistant message (the reference)")
            out.append({"messages": msgs[:-1], "reference": msgs[-1]["content"], "row": i})
        elif isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str):
            inp = r.get("input") or ""
            content = f"{r['instruction']}\n\n{inp}" if inp.strip() else r["instruction"]
            out.append({"messages": [{"role": "user", "content": content}], "reference": r["output"], "row": i})
        else:
            raise EdgesmithError(f"{path}: row {i}: expected {{query, choices, gold}}, {{messages}} or {{instruction, output}}")
    if out and len({"pairs" in it for it in out}) > 1:
        raise EdgesmithError(f"{path}: mixes multiple-choice and generation rows; use one file per task")
    return out
