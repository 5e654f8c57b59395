"""The MLP image classifier under DeepSpeed bf16 on 2 gloo processes: DeepSpeed casts the model
to bf16 but the MNIST pixels arrive as fp32, so the model itself must cast its input. A few
AdamW steps on real digits, ZeRO-0 and ZeRO-3, give finite training and evaluation losses."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.testing import deepspeed_bf16, run_workers, train_steps

pytestmark = pytest.mark.distributed

STAGES = (0, 3)
BATCH = 8
STEPS = 3


def mlp_worker(rank: int, world: int, shards: list[list[dict[str, np.ndarray]]]) -> dict:
    from orchestrator import models, strategies
    from orchestrator.config.schema import ModelConfig

    batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in shards[rank]]
    out = {}
    for stage in STAGES:
        st = strategies.build(deepspeed_bf16(stage, world, batch_size=BATCH), torch.device("cpu"))
        st.prepare(models.build_model(ModelConfig(name="mlp"), 10, None, seed=0), STEPS)
        losses = train_steps(st, batches)
        st.eval_model.eval()
        with torch.no_grad():
            logits = st.eval_model(pixel_values=batches[0]["pixel_values"]).logits
        out[stage] = {
            "losses": losses,
            "input_dtype": str(batches[0]["pixel_values"].dtype),
            "weight_dtype": str(next(st.module.parameters()).dtype),
            "logits_finite": bool(torch.isfinite(logits.float()).all()),
        }
    return out


def test_mlp_trains_under_deepspeed_bf16(tmp_path: Path) -> None:
    from orchestrator import data
    from orchestrator.config.schema import DataConfig

    bundle = data.build(DataConfig(name="mnist", limit=120, cache_dir=str(tmp_path)), None)
    # Each rank's real digits, built once here (the workers would race on the cache) and sent
    # as numpy arrays.
    shards = [
        [
            {k: v.numpy() for k, v in b.items()}
            for b in itertools.islice(bundle.train_batches(BATCH, r, 2, seed=0, epoch=0), STEPS)
        ]
        for r in range(2)
    ]
    assert all(len(s) == STEPS for s in shards)
    by_rank = run_workers(mlp_worker, 2, shards, timeout=300)
    for stage in STAGES:
        for rank, res in enumerate(r[stage] for r in by_rank):
            where = f"ZeRO-{stage} rank {rank}"
            # The case under test: fp32 pixels into a bf16 model.
            assert res["input_dtype"] == "torch.float32", where
            assert res["weight_dtype"] == "torch.bfloat16", where
            assert all(np.isfinite(res["losses"])), (where, res["losses"])
            assert res["logits_finite"], where
