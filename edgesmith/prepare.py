"""`edgesmith data prepare FILE... --out DIR`: read any supported layout (edgesmith/data.py), normalise, drop rows
that are empty or too long for the model, shuffle with a seed, split into train/validation/test JSONL, and write
a report of what was kept and why the rest was not.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .data import FORMATS, read_records, render
from .errors import EdgesmithError
from .fsutil import atomic_open, ensure_writable_dir, write_json


@dataclass
class PrepareConfig:
    """Settings of `edgesmith data prepare`."""

    inputs: list[str] = field(default_factory=list)
    """Data files or datasets directories to read."""
    out: str = "out/data"
    """Output directory for train/validation/test JSONL and summary.json."""
    model: str = "default"
    """Model whose tokenizer and chat template render the rows (HF dir, .gguf or 'default')."""
    format: str = "auto"
    """Input layout: auto, alpaca, sharegpt, messages, qa or text."""
    columns: str = ""
    """Column renames OURS=THEIRS, comma-separated (e.g. output=response)."""
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])
    """Train/validation/test ratios."""
    seed: int = 0
    """Shuffle seed: the same seed gives the same splits."""
    max_length: int = 2048
    """Rows longer than this many tokens are dropped (reported as too_long)."""
    skip_bad: bool = False
    """Skip and report malformed rows instead of stopping at the first one."""

    def __post_init__(self):
        from .errors import ConfigError

        if len(self.split) != 3 or any(r < 0 for r in self.split) or not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            raise ConfigError("split", f"expected three non-negative ratios summing to 1, got {self.split}")
        if self.format not in FORMATS:
            raise ConfigError("format", f"expected one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.max_length < 1:
            raise ConfigError("max_length", "expected a positive integer")


def _assistant_empty(rec: dict) -> bool:
    if "text" in rec:
        return not rec["text"].strip()
    last = [m for m in rec["messages"] if m["role"] == "assistant"]
    return not last or not last[-1]["content"].strip()


def percentiles(values: Iterable[int], qs=(50, 90, 95, 99)) -> dict:
    v = sorted(values)
    if not v:
        return {}
    out = {f"p{q}": v[min(len(v) - 1, int(math.ceil(q / 100 * len(v))) - 1)] for q in qs}
    out.update(min=v[0], max=v[-1], mean=round(sum(v) / len(v), 1))
    return out


def prepare(cfg: PrepareConfig) -> Path:
    from .modelio import load_tokenizer

    if not cfg.inputs:
        raise EdgesmithError("data prepare: no input files given")
    out = ensure_writable_dir(cfg.out)
    kept, dropped = [], {"malformed": 0, "empty_output": 0, "too_long": 0}
    bad_rows = []
    lengths = []
    # every input is read and checked before the (slow) tokenizer load: bad data fails in milliseconds
    per_file = []
    for path in cfg.inputs:
        recs, bad = read_records(path, cfg.format, cfg.columns, cfg.skip_bad)
        dropped["malformed"] += len(bad)
        bad_rows += bad
        per_file.append((path, recs))
    tok = load_tokenizer(cfg.model)
    for path, recs in per_file:
        for r in recs:
            if _assistant_empty(r):
                dropped["empty_output"] += 1
                continue
            text = render(r, tok)
            n = len(tok(text, add_special_tokens=False).input_ids)
            if n > cfg.max_length:
                dropped["too_long"] += 1
                continue
            kept.append({**r, "text": text, "n_tokens": n, "source": str(path)})
            lengths.append(n)
    if not kept:
        raise EdgesmithError(f"data prepare: every row was dropped ({dropped})")
    rng = random.Random(cfg.seed)
    order = list(range(len(kept)))
    rng.shuffle(order)
    n_val = int(round(cfg.split[1] * len(kept)))
    n_test = int(round(cfg.split[2] * len(kept)))
    n_train = len(kept) - n_val - n_test
    splits = {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    for name, idx in splits.items():
        with atomic_open(out / f"{name}.jsonl") as f:
            for i in idx:
                f.write(json.dumps(kept[i], ensure_ascii=False) + "\n")
    summary = {
        "inputs": cfg.inputs, "model": cfg.model, "seed": cfg.seed, "split": cfg.split,
        "counts": {k: len(v) for k, v in splits.items()}, "kept": len(kept),
        "dropped": dropped, "bad_rows": bad_rows[:100], "tokens": percentiles(lengths),
    }
    write_json(out / "summary.json", summary)
    return out


def cmd_prepare(args) -> int:
    from .config import ConfigError

    try:
        split = [float(x) for x in args.split.split(",")]
    except ValueError:
        raise ConfigError("--split", f"expected three comma-separated numbers, got {args.split!r}") from None
    cfg = PrepareConfig(inputs=args.inputs, out=args.out, model=args.model, format=args.format, columns=args.columns or "",
                        split=split, seed=args.seed, max_length=args.max_length, skip_bad=args.skip_bad)
    out = prepare(cfg)
    s = json.loads((out / "summary.json").read_text())
    c, d, t = s["counts"], s["dropped"], s["tokens"]
    print(f"kept {s['kept']} rows -> train {c['train']}, validation {c['validation']}, test {c['test']}  ({out})")
    print(f"dropped: malformed {d['malformed']}, empty output {d['empty_output']}, too long {d['too_long']}")
    print("tokens: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    for b in s["bad_rows"][:5]:
        print(f"  skipped {b['file']}: row {b['row']}: field '{b['field']}': {b['reason']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="read, normalise and split datasets", description=__doc__,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    q = dsub.add_parser("prepare", help="normalise, render with the chat template and split into train/validation/test JSONL")
    q.add_argument("inputs", nargs="+", help="data files (.json .jsonl .csv .tsv .parquet .txt) or datasets directories")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--model", default="default", help="model whose tokenizer/chat template is used (default: default)")
    q.add_argument("--format", default="auto", choices=FORMATS, help="input layout (default: auto-detect per row)")
    q.add_argument("--columns", default="", help="column renames OURS=THEIRS, e.g. output=response,instruction=prompt")
    q.add_argument("--split", default="0.9,0.05,0.05", help="train,validation,test ratios (default 0.9,0.05,0.05)")
    q.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    q.add_argument("--max-length", type=int, default=2048, help="drop rows longer than this many tokens (default 2048)")
    q.add_argument("--skip-bad", action="store_true", help="skip and report malformed rows instead of failing")
    q.set_defaults(func=cmd_prepare)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
