"""`edgesmith prune MODEL --out DIR [--recipe FILE] [flags]`: structured pruning to a plain HF model.

Precedence: recipe file < flags < --set key=value. Every PruneConfig field is a flag
(`--intermediate-size 1024`, `--mlp-ratio 0.33`, `--target-params 90M`, ...).
"""
from __future__ import annotations

import argparse

from edgesmith.config import add_config_args, config_from_args

from .importance import IMPORTANCE, LAYER_IMPORTANCE
from .prune import PruneConfig

# flags added by hand: positional/--out, registries (argparse choices), and --sparsity, whose
# "2:4" YAML would read as the base-60 integer 124
CUSTOM = ("model", "out", "importance", "layer_importance", "sparsity")


def cmd_prune(args) -> int:
    from .prune import run

    run(config_from_args(PruneConfig, args, given={k: getattr(args, k) for k in CUSTOM}))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "prune", help="structured pruning (MLP channels, heads, hidden, layers) to a smaller HF model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None, help="HF model directory, .gguf file, or 'default' (default: from the recipe, else 'default')")
    p.add_argument("--out", default=None, help="output directory (default: from the recipe, else out/prune)")
    p.add_argument("--importance", choices=list(IMPORTANCE), default=None,
                   help="how MLP channels, heads and hidden channels are ranked (default: activation, 3.5x lower WikiText "
                        "perplexity than magnitude after MLP 1536->1024: studies/results/prune-quality.md)")
    p.add_argument("--layer-importance", dest="layer_importance", choices=list(LAYER_IMPORTANCE), default=None,
                   help="how layers are ranked for dropping (default: block-influence, 85 vs 3,366 for magnitude after "
                        "dropping 6 layers: studies/results/prune-quality.md)")
    p.add_argument("--sparsity", default=None, metavar="P|N:M",
                   help="then zero weights by magnitude: a fraction like 0.5, or 2:4 (files and CPU speed do not change)")
    add_config_args(p, PruneConfig, skip=CUSTOM)  # --recipe, --set and every other field
    p.set_defaults(func=cmd_prune)
