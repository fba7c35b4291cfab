"""The single `edgesmith` entry point. Each subcommand lives in its stage's module, which exposes
`register(subparsers)`; this file only lists them. Modules keep heavy imports (torch,
transformers, llama.cpp) inside functions so `edgesmith --help` stays fast and a device-only
install (no torch) can still run the commands it has the libraries for.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import EdgesmithError

TRUST_ENV = "EDGESMITH_TRUST_REMOTE_CODE"

# subcommand -> module exposing register(subparsers)
COMMANDS = {
    "info": "edgesmith.info",
    "data": "edgesmith.prepare",
    "chat": "edgesmith.chat",
    "prune": "edgesmith.compress.cli",
    "trim-vocab": "edgesmith.compress.vocab",
    "distill": "edgesmith.distill.cli",
    "finetune": "edgesmith.finetune.cli",
    "merge": "edgesmith.finetune.merge",
    "export": "edgesmith.export.cli",
    "bench": "edgesmith.bench.cli",
    "report": "edgesmith.bench.cli_report",
    "run": "edgesmith.pipeline",
    "sweep": "edgesmith.sweep",
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
    _add_trust_flag(parser)
    return parser


def _add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """--trust-remote-code on every (sub)command: Python files shipped inside a model directory
    (config.json `auto_map`) run only when the user asks for it; off by default."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                if not any("--trust-remote-code" in a.option_strings for a in p._actions):
                    p.add_argument("--trust-remote-code", action="store_true", default=argparse.SUPPRESS,
                                   help="allow Python code shipped inside a model directory to run (never by default)")
                _add_trust_flag(p)


def _one_line(text: str) -> str:
    text = str(text).strip()
    return " ".join(text.split()) if "\n" not in text else text.splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # read by modelio when loading models/tokenizers (also in spawned child processes)
    if getattr(args, "trust_remote_code", False):
        os.environ[TRUST_ENV] = "1"
        print(f"edgesmith {args.command}: warning: --trust-remote-code: Python code inside the model directory may run",
              file=sys.stderr)
    else:
        os.environ.pop(TRUST_ENV, None)
    try:
        rc = args.func(args)
    except EdgesmithError as e:
        print(f"edgesmith {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgesmith {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, a file vanishing: the environment, not a bug
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"edgesmith {args.command}: error: {where}{_one_line(e.strerror or e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback on request
        if "(os error " in str(e):  # an I/O error wrapped by a Rust library (safetensors, tokenizers): disk full, ...
            print(f"edgesmith {args.command}: error: {_one_line(e)[:300]}", file=sys.stderr)
            return 2
        if os.environ.get("EDGESMITH_DEBUG"):
            raise
        print(f"edgesmith {args.command}: internal error: {type(e).__name__}: {_one_line(e)[:300]} "
              "(rerun with EDGESMITH_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        os.environ.pop(TRUST_ENV, None)
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
