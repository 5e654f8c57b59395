"""orchestrator: distributed training and compression search on Ray (Train + Tune)."""

import os

# This tool never downloads models or data (everything is local or packaged); offline mode makes
# Hugging Face libraries fail fast on a hub name instead of waiting on a network that may be absent.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"
