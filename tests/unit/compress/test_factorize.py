"""Low-rank factorization: ranks as asked, error falls with rank, skips, ASVD beats SVD."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error
from torch import nn

from orchestrator.compress.techniques.factorize import LowRankLinear, factorize_
from orchestrator.config.compress import technique_config


def FactorizeConfig(**keys):  # noqa: N802 - reads like the config class it builds
    """A ``compress.factorize`` section as a job would give it (method svd by default)."""
    return technique_config("factorize", keys)


pytestmark = pytest.mark.unit


def _low_rank(model: nn.Module) -> dict[str, LowRankLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def test_fixed_rank_and_ratio(minilm2) -> None:
    rows = factorize_(minilm2, FactorizeConfig(rank=32))
    lr = _low_rank(minilm2)
    assert len(lr) == 12 and all(m.rank == 32 for m in lr.values())
    assert all(r.details["rank"] == 32 and r.params_after < r.params_before for r in rows)
    ffn_in = lr["bert.encoder.layer.0.intermediate.dense"]
    assert ffn_in.down.weight.shape == (32, 384) and ffn_in.up.weight.shape == (1536, 32)


def test_rank_ratio(tiny_bert) -> None:
    factorize_(tiny_bert, FactorizeConfig(rank_ratio=0.25))
    for m in _low_rank(tiny_bert).values():
        assert m.rank == round(0.25 * min(m.in_features, m.out_features))


def test_reconstruction_error_decreases_with_rank(minilm2) -> None:
    w = minilm2.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    errors = []
    for rank in (16, 64, 128, 256):
        linear = nn.Linear(384, 1536)
        linear.weight.data.copy_(w)
        model = nn.Sequential(linear)
        factorize_(model, FactorizeConfig(rank=rank, exclude=[]))
        m = model[0]
        approx = m.up.weight @ m.down.weight
        errors.append(((approx - w).norm() / w.norm()).item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] * 0.8


def test_energy_rule_picks_larger_rank_for_more_energy(tokenizer) -> None:
    from orchestrator import models
    from orchestrator.config.schema import ModelConfig

    ranks = []
    for energy in (0.5, 0.8):
        m = models.build_model(ModelConfig(name="minilm-l6", num_layers=1), 2, tokenizer)
        factorize_(m, FactorizeConfig(energy=energy, include=["*intermediate.dense"]))
        ranks.append(_low_rank(m)["bert.encoder.layer.0.intermediate.dense"].rank)
    assert ranks[0] < ranks[1]


def test_skips_layers_that_would_not_shrink(tiny_bert) -> None:
    rows = factorize_(tiny_bert, FactorizeConfig(rank_ratio=0.9))
    assert rows and all(r.skipped and "would not save parameters" in r.reason for r in rows)
    assert not _low_rank(tiny_bert)


def test_idempotent(tiny_bert) -> None:
    factorize_(tiny_bert, FactorizeConfig(rank=8))
    names = set(_low_rank(tiny_bert))
    rows = factorize_(tiny_bert, FactorizeConfig(rank=8))
    assert set(_low_rank(tiny_bert)) == names and not rows  # factors are not re-factorized


def test_classifier_untouched(tiny_bert) -> None:
    factorize_(tiny_bert, FactorizeConfig(rank=8))
    assert isinstance(tiny_bert.classifier, nn.Linear)


def test_asvd_keeps_the_output_closer_than_svd(tokenizer, calib) -> None:
    def error(method: str) -> float:
        return relative_error(
            tokenizer,
            calib,
            lambda m: factorize_(m, FactorizeConfig(method=method, rank_ratio=0.25), calib=calib),
        )

    assert error("asvd") < error("svd")


def test_factorized_model_trains(minilm2, calib) -> None:
    factorize_(minilm2, FactorizeConfig(rank=16))
    minilm2.train()
    loss = minilm2(**calib[0]).loss
    loss.backward()
    missing = [n for n, p in minilm2.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert torch.isfinite(loss)


def test_pruning_superseded_where_factorized(tiny_bert, calib) -> None:
    """Factorizing a pruned layer makes it dense again: the pruner lets go of it (so training
    does not try to mask weights that no longer exist) and the report says so."""
    from orchestrator.compress import compress_
    from orchestrator.config.compress import CompressConfig

    spec = CompressConfig.model_validate(
        {
            "prune": {"sparsity": 0.5},
            "factorize": {"rank": 8, "include": ["*intermediate.dense"]},
        }
    )
    report = compress_(tiny_bert, spec, calib=calib)
    (pruner,) = report.hooks
    assert pruner.modules and not any("intermediate" in n for n in pruner.modules)
    superseded = [r for r in report.rows if r.details.get("superseded_by") == "factorize"]
    assert {r.name for r in superseded} == {
        f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)
    }
    pruner.after_step(1, 10, lambda masks: None)  # no KeyError on replaced layers
