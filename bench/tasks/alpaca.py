"""Generation on Alpaca-format instruction data (`instruct/alpaca_en_demo.json`, {instruction, input,
output}): the test split as `edgesmith data prepare` draws it (seed 0, ratios 0.9/0.05/0.05 -> the
last 5 % of the shuffled rows; identical when prepare drops no row -- pass its test.jsonl with
`--tasks path/test.jsonl` to use a prepared split as is), prompted with the artifact's chat template, greedy decoding.
Scored with exact match, ROUGE-L (rouge-score), BLEU and chrF (sacrebleu)."""
import json
import random
from pathlib import Path

from edgesmith.errors import EdgesmithError

KIND = "generate"
FILES = ["instruct/alpaca_en_demo.json"]  # under --data-dir (copied by --remote)
TEST_FRACTION = 0.05
SEED = 0


def load(data_dir, limit=None):
    path = Path(data_dir) / "instruct" / "alpaca_en_demo.json"
    if not path.is_file():
        raise EdgesmithError(f"{path}: Alpaca data not found (set --data-dir)")
    rows = json.loads(path.read_text(encoding="utf-8"))
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    test = order[len(rows) - int(round(TEST_FRACTION * len(rows))):]
    out = []
    for i in test[:limit] if limit else test:
        r = rows[i]
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise EdgesmithError(f"{path}: row {i + 1}: expected instruction/output strings")
        inp = r.get("input") or ""
        content = f"{r['instruction']}\n\n{inp}" if inp.strip() else r["instruction"]
        out.append({"messages": [{"role": "user", "content": content}], "reference": r["output"], "row": i})
    return out
