"""Labelled data: packaged corpora (``corpora``) and local files, split, tokenized, cached and
sharded per worker (``bundle``)."""

from orchestrator.data.bundle import (
    SPLITS,
    DataBundle,
    build,
    cache_root,
    default_cache_dir,
    load_frames,
)

__all__ = ["SPLITS", "DataBundle", "build", "cache_root", "default_cache_dir", "load_frames"]
