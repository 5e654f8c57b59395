"""DeepSpeed's exported weights are the fp32 master copy, not the bf16 weights the forward uses:
on 2 gloo processes, after a few AdamW steps in bf16, ``full_state_dict`` equals the optimizer's
fp32 masters exactly, and those are not all representable in bf16 (so a bf16 copy widened to
fp32 would be caught). ZeRO-0 keeps whole fp32 masters in the optimizer wrapper's parallel
lists; ZeRO-2 keeps a fragment of each on every rank; ZeRO-3 a partition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.testing import (
    deepspeed_bf16,
    random_token_batches,
    run_workers,
    tiny_classifier,
    train_steps,
)

pytestmark = pytest.mark.distributed

STAGES = (0, 2, 3)


def _masters_zero0(strategy) -> dict[str, torch.Tensor]:
    """The fp32 masters of ZeRO-0 with bf16, as DeepSpeed's optimizer wrapper holds them."""
    opt = strategy.engine.optimizer
    by_id = {
        id(lp): hp
        for lps, hps in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
        for lp, hp in zip(lps, hps, strict=True)
    }
    return {n: by_id[id(p)].detach().numpy().copy() for n, p in strategy.module.named_parameters()}


def _fragments_zero2(strategy) -> dict[str, tuple[int, torch.Tensor]]:
    """This rank's fp32 master fragment of each parameter it owns a piece of (ZeRO-1/2)."""
    out = {}
    for n, p in strategy.module.named_parameters():
        mapping = p._hp_mapping
        if mapping is not None and mapping.lp_fragment_address.numel > 0:
            start = mapping.lp_fragment_address.start
            out[n] = (start, mapping.hp_fragment.detach().numpy().copy())
    return out


def export_worker(rank: int, world: int) -> dict[int, dict]:
    from orchestrator import strategies

    batches = random_token_batches(7 + rank)
    out: dict[int, dict] = {}
    for stage in STAGES:
        st = strategies.build(deepspeed_bf16(stage, world), torch.device("cpu"))
        st.prepare(tiny_classifier(200), total_steps=10)
        train_steps(st, batches)
        exported = st.full_state_dict()
        params = [n for n, _ in st.module.named_parameters()]
        # numpy, not tensors: tensors would go back through shared memory that a finished
        # worker no longer holds.
        res: dict = {
            "exported": {n: exported[n].numpy() for n in params},
            "dtypes": {str(exported[n].dtype) for n in params},
        }
        if stage == 0:
            res["masters"] = _masters_zero0(st)
        elif stage in (1, 2):
            res["fragments"] = _fragments_zero2(st)
        out[stage] = res
    return out


def _bf16_exact(a: np.ndarray) -> bool:
    t = torch.from_numpy(a)
    return bool(torch.equal(t, t.to(torch.bfloat16).float()))


def test_export_is_the_fp32_master_copy() -> None:
    by_rank = run_workers(export_worker, 2, timeout=300)
    for stage in STAGES:
        for rank, res in enumerate(r[stage] for r in by_rank):
            where = f"ZeRO-{stage} rank {rank}"
            exported = {n: torch.from_numpy(a) for n, a in res["exported"].items()}
            assert res["dtypes"] == {"torch.float32"}, where
            # Every rank exports the same full weights.
            for name, a in by_rank[0][stage]["exported"].items():
                assert np.array_equal(res["exported"][name], a), (where, name)
            # Not a bf16 copy widened to fp32: after a few steps the masters carry bits bf16
            # cannot hold.
            assert not all(_bf16_exact(a) for a in res["exported"].values()), (
                f"{where}: every exported weight is representable in bf16, so the bf16 "
                "weights were exported instead of the fp32 masters"
            )
            if "masters" in res:
                for name, master in res["masters"].items():
                    assert torch.equal(exported[name], torch.from_numpy(master)), (where, name)
            if "fragments" in res:
                assert res["fragments"], where  # this rank owns a piece of some parameter
                for name, (start, frag) in res["fragments"].items():
                    got = exported[name].flatten().narrow(0, start, frag.size)
                    assert torch.equal(got, torch.from_numpy(frag)), (where, name)
