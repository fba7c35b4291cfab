"""`edgesmith bench ARTIFACT...` and `edgesmith report RESULTS...` (see bench/harness.py, bench/report.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from edgesmith.errors import EdgesmithError


def cmd_bench(args) -> int:
    from edgesmith.bench.harness import BenchSettings, run
    from edgesmith.bench.report import terminal_table
    from edgesmith.fsutil import write_json

    from edgesmith.config import config_from_args

    def csv(v):
        return [x.strip() for x in v.split(",") if x.strip()] if v else None

    s = config_from_args(BenchSettings, args, given={"artifacts": args.artifacts, "tasks": csv(args.tasks),
                                                     "task_kinds": csv(args.task_kinds)})
    bad = sorted(set(s.task_kinds or []) - {"hf", "gguf", "onnx"})
    if bad:
        raise EdgesmithError(f"--task-kinds: unknown kind {bad[0]!r} (expected hf, gguf or onnx)")
    if not args.remote:
        for flag, given in (("--remote-wheels", args.remote_wheels), ("--ssh-config", args.ssh_config),
                            ("--remote-keep", args.remote_keep)):
            if given:
                raise EdgesmithError(f"{flag} needs --remote [USER@]HOST")
    if args.remote:
        from edgesmith.bench.remote import run_remote

        doc = run_remote(s, args.remote, ssh_config=args.ssh_config, remote_dir=args.remote_dir,
                         python=args.remote_python, wheels=args.remote_wheels, keep=args.remote_keep,
                         log=lambda m: print(m, file=sys.stderr))
    else:
        doc = run(s, progress=_progress())
    doc["command"] = " ".join(["edgesmith", *map(str, sys.argv[1:])])  # reproducible: the exact invocation
    if args.json:
        write_json(args.json, doc)
    if args.remote:  # locally the progress bar has already shown each artifact's line as it finished
        for r in doc["results"]:
            if "error" not in r:
                print(r.get("summary", r["artifact"]))
    print(terminal_table(doc))
    for r in doc["results"]:  # each failure once, in full (the table only marks the row)
        if "error" in r:
            print(r.get("summary") or f"{Path(r['artifact']).name}: FAILED: {r['error']}")
    if args.json:
        print(f"results: {args.json}")
    return 1 if any("error" in r for r in doc["results"]) else 0


def _progress():
    """A tqdm bar over artifacts on stderr (the table goes to stdout)."""
    from tqdm import tqdm

    state = {}

    def cb(i, n, artifact, result=None):
        if "bar" not in state:
            state["bar"] = tqdm(total=n, desc="bench", unit="artifact", file=sys.stderr, leave=False)
        bar = state["bar"]
        if result is None:
            bar.set_postfix_str(Path(artifact).name)
        else:
            bar.update(1)
            if "error" not in result:  # failures are printed once, in full, after the table
                bar.write(result.get("summary", ""), file=sys.stderr)
            if i == n:
                bar.close()
    return cb


def cmd_report(args) -> int:
    from edgesmith.bench.report import report

    md = report(args.results, args.out)
    print(md.read_text())
    print(f"report: {md}")
    return 0


def register(sub) -> None:
    from edgesmith.bench.tasks import TASKS

    p = sub.add_parser("bench", help="accuracy and latency of HF / GGUF / ONNX artifacts (one child process each)",
                       description="Perplexity (llama-perplexity's method), multiple-choice and generation tasks, agreement "
                       "with a reference, and latency of each ARTIFACT: an HF dir, a .gguf, an ONNX dir, or an "
                       "`edgesmith export` output dir (all its artifacts). 'default' = the embedded GGUF.")
    from edgesmith.bench.harness import BenchSettings
    from edgesmith.config import add_config_args

    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT")
    p.add_argument("--tasks", metavar="LIST", help=f"comma-separated: {', '.join(TASKS)}, or FILE.jsonl ({{query, choices, gold}})")
    p.add_argument("--task-kinds", default=None, metavar="KINDS",
                   help="run --tasks only on these artifact kinds, e.g. hf or hf,gguf (default: every artifact)")
    # every other setting is a BenchSettings field: --ctx, --max-chunks, --limit, --latency, --no-ppl, ... and
    # --recipe (a settings file, or a pipeline recipe's stages.bench measurement settings) / --set KEY=VALUE
    add_config_args(p, BenchSettings, skip=("artifacts", "tasks", "task_kinds", "extra_texts"))
    p.add_argument("--json", metavar="FILE", help="write the results JSON (schema 1) here")
    g = p.add_argument_group("remote device (SSH: your ~/.ssh config and keys, BatchMode, never a password)")
    g.add_argument("--remote", metavar="[USER@]HOST[:PORT]", help="copy the artifacts and task files there, run the "
                   "same harness in a venv with this edgesmith (its wheel is built here and copied; never taken from "
                   "an index) and its [device] dependencies (installed if missing), bring the JSON back")
    g.add_argument("--ssh-config", metavar="FILE", help="ssh/scp -F FILE instead of ~/.ssh/config")
    g.add_argument("--remote-dir", default="~/.cache/edgesmith-remote", help="remote folder for the venv and runs "
                   "(default ~/.cache/edgesmith-remote)")
    g.add_argument("--remote-python", default="python3", help="remote interpreter that creates the venv (default python3)")
    g.add_argument("--remote-wheels", metavar="DIR", help="install edgesmith[device]'s dependencies from these wheels "
                   "(pip --no-index --find-links) instead of the device's package index, for a device without internet")
    g.add_argument("--remote-keep", action="store_true", help="keep the copied artifacts on the remote")
    p.set_defaults(func=cmd_bench)


def register_report(sub) -> None:
    r = sub.add_parser("report", help="merge bench results JSON into a markdown table and PNG plots")
    r.add_argument("results", nargs="+", metavar="RESULTS", help="results JSON files or directories of them")
    r.add_argument("--out", default="bench/report", help="output directory (report.md + PNGs; default bench/report)")
    r.set_defaults(func=cmd_report)
