"""Compression: ``compress_(model, spec)`` applies the job's techniques in stage order (prune ->
factorize -> quantize), each through the handler registered for its config type, and returns a
``CompressionReport``; ``artifact`` writes, measures and reloads the result. Plain torch and
transformers: this package never imports Ray or DeepSpeed.

- ``technique``: the handler interface and registry; ``techniques/``: one module per family;
- ``pipeline``: ``compress_``, the report, the measured summary figures;
- ``artifact``: the shipped folder (safetensors + manifest), its size, ``load_artifact``;
- ``qtensor`` / ``qmodules``: quantized tensors and modules; ``common``: shared helpers;
- ``measure``: latency, timed side by side.
"""

from orchestrator.compress.artifact import load_artifact, save_artifact, skeleton
from orchestrator.compress.pipeline import (
    CompressionReport,
    check_patterns,
    compress_,
    effective_bits,
    summary_metrics,
)
from orchestrator.compress.technique import Step, Technique, register, technique_for

__all__ = [
    "CompressionReport",
    "Step",
    "Technique",
    "check_patterns",
    "compress_",
    "effective_bits",
    "load_artifact",
    "register",
    "save_artifact",
    "skeleton",
    "summary_metrics",
    "technique_for",
]
