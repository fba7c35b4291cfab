"""`edgesmith report` registration (the command lives in bench/cli.py next to `bench`)."""
from edgesmith.bench.cli import register_report as register  # noqa: F401
