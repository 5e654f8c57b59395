"""Gradient accumulation on 2 gloo processes: N micro-batches give the gradient of one batch N
times larger, for DDP and for DeepSpeed ZeRO stages 1-3."""

from __future__ import annotations

import pytest
import torch

from orchestrator.testing import run_workers, tiny_classifier

pytestmark = pytest.mark.distributed

PER_RANK = 16  # examples per rank in one optimizer step
CASES = [("ddp", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]


def _full_grads(strategy, stage: int) -> dict[str, torch.Tensor]:
    if strategy.name == "ddp":
        return {n: p.grad.detach().clone() for n, p in strategy.module.named_parameters()}
    from deepspeed.utils import safe_get_full_grad

    # A collective on ZeRO-3 (gathers the partitions): every rank walks the same parameters.
    return {
        n: safe_get_full_grad(p).detach().float().clone()
        for n, p in strategy.module.named_parameters()
    }


def grad_worker(rank: int, world: int) -> dict[str, float]:
    from orchestrator import strategies
    from orchestrator.config.schema import TrainConfig

    g = torch.Generator().manual_seed(123)
    ids = torch.randint(1, 500, (world * PER_RANK, 12), generator=g)
    labels = torch.randint(0, 3, (world * PER_RANK,), generator=g)
    ids, labels = (
        ids[rank * PER_RANK : (rank + 1) * PER_RANK],
        labels[rank * PER_RANK : (rank + 1) * PER_RANK],
    )
    out = {}
    for name, stage in CASES:
        grads = {}
        for gas in (4, 1):
            bs = PER_RANK // gas
            spec = TrainConfig(
                strategy=name,
                zero_stage=stage,
                batch_size=bs,
                grad_accum_steps=gas,
                optimizer="sgd",
                momentum=0.0,
                weight_decay=0.0,
                lr=0.1,
                max_grad_norm=0.0,
                warmup_ratio=0.0,
                num_workers=world,
            )
            st = strategies.build(spec, torch.device("cpu"))
            st.prepare(tiny_classifier(), total_steps=10)
            for i in range(gas):
                sl = slice(i * bs, (i + 1) * bs)
                with st.accumulate(boundary=(i == gas - 1)), st.autocast():
                    loss = st.model(input_ids=ids[sl], labels=labels[sl]).loss
                st.backward(loss)
            grads[gas] = _full_grads(st, stage)
        diff = max((grads[4][k] - grads[1][k]).abs().max().item() for k in grads[1])
        scale = max(grads[1][k].abs().max().item() for k in grads[1])
        out[f"{name}-{stage}"] = (diff, scale)
    return out


def test_accumulation_equals_one_big_batch() -> None:
    results = run_workers(grad_worker, 2)
    for case in (f"{n}-{s}" for n, s in CASES):
        for rank, res in enumerate(results):
            diff, scale = res[case]
            assert scale > 1e-4, f"{case}: gradients vanished"
            assert diff < 1e-5, f"{case} rank {rank}: max |grad diff| {diff:.2e} >= 1e-5"
