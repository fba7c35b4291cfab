"""The single `edgesmith` entry point. Each subcommand lives in its stage's module, which exposes
`register(subparsers)`; this file only lists them. Modules keep heavy imports (torch,
transformers, llama.cpp) inside functions so `edgesmith --help` stays fast and a device-only
install (no torch) can still run the commands it has the libraries for.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import EdgesmithError

# subcommand -> module exposing register(subparsers)
COMMANDS = {
    "info": "edgesmith.info",
    "data": "edgesmith.data",
    "chat": "edgesmith.chat",
    "prune": "edgesmith.compress.cli",
    "distill": "edgesmith.distill.cli",
    "finetune": "edgesmith.finetune.cli",
    "merge": "edgesmith.finetune.merge",
    "export": "edgesmith.export.cli",
    "bench": "edgesmith.bench.cli",
    "report": "edgesmith.bench.cli_report",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesmith",
        description="Compress, distill, fine-tune, export and benchmark language models for edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"edgesmith {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except EdgesmithError as e:
        msg = " ".join(str(e).split()) if "\n" not in str(e).strip() else str(e).strip().splitlines()[0]
        print(f"edgesmith {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgesmith {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
