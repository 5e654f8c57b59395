"""Helpers for tests and benchmarks: run a function on N local gloo processes, and the small
models, batches and training steps the 2-process tests share."""

from orchestrator.testing.distributed import (
    deepspeed_bf16,
    free_port,
    random_token_batches,
    run_job_worker,
    run_workers,
    tiny_classifier,
    train_steps,
)

__all__ = [
    "deepspeed_bf16",
    "free_port",
    "random_token_batches",
    "run_job_worker",
    "run_workers",
    "tiny_classifier",
    "train_steps",
]
