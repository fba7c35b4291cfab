"""lm-evaluation-harness task files for the same local data and prompts as bench/tasks/{arc_easy,piqa}.py: the
reference our multiple-choice scoring is checked against (tests/test_bench.py) and timed against
(studies/mc_speed.py)."""
from __future__ import annotations

import json
from pathlib import Path

LM_EVAL_TASKS = {
    "es_arc_easy": """task: es_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc/arc_easy.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "es_piqa": """task: es_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {piqa}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_choice: "{{{{[sol1, sol2]}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""",
}
# our task name -> the lm-eval task above
OURS = {"arc_easy": "es_arc_easy", "piqa": "es_piqa"}


def write_tasks(data: Path, dest: Path, n: int) -> Path:
    """The task YAMLs under dest/tasks (PIQA's labels joined into its rows, as lm-eval wants); returns that folder."""
    piqa = dest / "piqa.jsonl"
    rows = (data / "mc" / "piqa" / "valid.jsonl").read_text().splitlines()[:n]
    labels = (data / "mc" / "piqa" / "valid-labels.lst").read_text().split()[:n]
    piqa.write_text("".join(json.dumps({**json.loads(r), "label": int(y)}) + "\n" for r, y in zip(rows, labels)))
    tasks = dest / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name, text in LM_EVAL_TASKS.items():
        (tasks / f"{name}.yaml").write_text(text.format(data=data, piqa=piqa))
    return tasks
