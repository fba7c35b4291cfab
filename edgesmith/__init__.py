"""edgesmith: compress, distill, fine-tune, export and benchmark language models for edge devices."""
import os as _os

__version__ = "0.1.0"

# Nothing is ever fetched from a hub: every model and dataset is local. Set before any
# Hugging Face library is imported (they read these at import time).
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    _os.environ.setdefault(_k, "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
