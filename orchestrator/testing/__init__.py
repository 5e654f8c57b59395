"""Helpers for tests and benchmarks: run a function on N local gloo processes."""

from orchestrator.testing.distributed import free_port, run_workers, tiny_classifier

__all__ = ["free_port", "run_workers", "tiny_classifier"]
