"""A decoder recovers as a causal language model on 2 gloo workers (no Ray): SparseGPT and
GPTQ applied before training, distillation from the dense model (token by token), DDP and
DeepSpeed ZeRO-2 / ZeRO-3 with bf16; the metrics are perplexities paired with the dense
model's, and the artifact reloads with its sparsity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.testing import run_job_worker, run_workers

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    "train,compress",
    [
        (
            {"strategy": "ddp"},
            {
                "prune": {"method": "sparsegpt", "sparsity": 0.5},
                "quantize": {"method": "gptq", "bits": 4, "group_size": 32, "embeddings": False},
            },
        ),
        (
            {"strategy": "deepspeed", "zero_stage": 2, "precision": "bf16"},
            {"prune": {"method": "sparsegpt", "sparsity": 0.5}},
        ),
        (
            {"strategy": "deepspeed", "zero_stage": 3, "precision": "bf16"},
            {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "embeddings": False}},
        ),
    ],
    ids=["ddp-sparsegpt-gptq", "zero2-bf16-sparsegpt", "zero3-bf16-gptq"],
)
def test_a_decoder_recovers_with_distillation(tmp_path: Path, train: dict, compress: dict):
    from orchestrator import models
    from orchestrator.config.schema import ModelConfig

    tokenizer = models.build_tokenizer(ModelConfig(name="tiny-llama"))
    dense = models.build_model(ModelConfig(name="tiny-llama"), 0, tokenizer, seed=3)
    dense.save_pretrained(str(tmp_path / "dense"))
    tokenizer.save_pretrained(str(tmp_path / "dense"))
    job = {
        "name": "lm-recover",
        "model": {"path": str(tmp_path / "dense")},
        "data": {
            "name": "bbc_news",
            "limit": 60,
            "max_length": 32,
            "cache_dir": str(tmp_path / "c"),
        },
        "train": {
            "num_workers": 2,
            "batch_size": 4,
            "max_steps": 4,
            "lr": 1e-3,
            "log_every": 2,
            "eval_every": 2,
            "distill": {"alpha": 0.5, "temperature": 2.0},
            **train,
        },
        "compress": {"calib_batches": 2, **compress},
        "output": {"dir": str(tmp_path / "runs")},
    }
    store = tmp_path / "final"
    m0, m1 = run_workers(run_job_worker, 2, job, str(store))
    assert m0 == m1
    assert m0["train/loss"] > 0
    assert m0["eval/perplexity"] == pytest.approx(torch.tensor(m0["eval/loss"]).exp().item())
    for split in ("eval", "test"):
        lo, ratio, hi = (m0[f"{split}/perplexity_ratio{s}"] for s in ("_lo", "", "_hi"))
        assert 0 < lo <= ratio <= hi
    assert m0["perf/decode_tokens_per_s"] > 0 and m0["perf/speedup"] > 0

    from orchestrator.compress.artifact import load_artifact

    model = load_artifact(store / "model")
    assert type(model).__name__ == "LlamaForCausalLM"
    if "prune" in compress:
        layers = [m for n, m in model.named_modules() if ".layers." in n and hasattr(m, "weight")]
        weights = [
            m.weight for m in layers if isinstance(m.weight, torch.Tensor) and m.weight.dim() == 2
        ]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros == pytest.approx(0.5, abs=0.01)  # masks survived the optimizer steps
