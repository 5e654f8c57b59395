"""Unstructured pruning: achieved sparsity, scopes, Wanda, schedule, masks through training."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error
from torch import nn

from orchestrator.compress.techniques.prune import cubic_sparsity, prune_
from orchestrator.config.compress import technique_config
from orchestrator.errors import ConfigError

pytestmark = pytest.mark.unit


def PruneConfig(**keys):  # noqa: N802 - reads like the config class it builds
    """A ``compress.prune`` section as a job would give it (method magnitude by default)."""
    return technique_config("prune", keys)


def _linear_weights(model: nn.Module, exclude: str = "classifier") -> list[torch.Tensor]:
    return [
        m.weight
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and exclude not in n and "pooler" not in n
    ]


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.9])
def test_achieved_sparsity_within_half_a_point(minilm2, calib, method, scope, target) -> None:
    pruner, rows = prune_(
        minilm2, PruneConfig(method=method, scope=scope, sparsity=target), calib=calib
    )
    weights = _linear_weights(minilm2)
    zeros = sum(int((w == 0).sum()) for w in weights)
    achieved = zeros / sum(w.numel() for w in weights)
    assert abs(achieved - target) <= 0.005
    assert pruner.measured_sparsity() == pytest.approx(achieved)
    assert len(rows) == 12  # 2 blocks x (q, k, v, attention out, FFN in, FFN out)
    if scope == "layer":
        for r in rows:
            assert abs(r.details["sparsity"] - target) <= 0.005


def test_excluded_and_unselected_modules_untouched(tiny_bert) -> None:
    before = {n: p.clone() for n, p in tiny_bert.named_parameters()}
    prune_(tiny_bert, PruneConfig(sparsity=0.5, include=["*layer.0.*"]))
    for n, p in tiny_bert.named_parameters():
        if "layer.0." in n and n.endswith("weight") and "LayerNorm" not in n:
            assert (p == 0).float().mean() == pytest.approx(0.5, abs=0.01), n
        else:
            assert torch.equal(p, before[n]), n  # classifier, embeddings, block 1, norms


def test_pattern_matching_nothing_is_an_error(tiny_bert) -> None:
    with pytest.raises(ConfigError) as err:
        prune_(tiny_bert, PruneConfig(sparsity=0.5, include=["*encoder.lyer*"]))
    assert err.value.problems[0].key == "compress.prune.include"
    with pytest.raises(ConfigError) as err:
        prune_(tiny_bert, PruneConfig(sparsity=0.5, exclude=["*nothing_here*"]))
    assert err.value.problems[0].key == "compress.prune.exclude"


def test_wanda_keeps_the_output_closer_than_magnitude(tokenizer, calib) -> None:
    """The point of activation awareness (Sun et al. 2023): at equal sparsity, less damage."""

    def error(method: str) -> float:
        return relative_error(
            tokenizer,
            calib,
            lambda m: prune_(m, PruneConfig(method=method, sparsity=0.6), calib=calib),
        )

    assert error("wanda") < error("magnitude")


def test_idempotent_and_never_unprunes(tiny_bert) -> None:
    pruner, _ = prune_(tiny_bert, PruneConfig(sparsity=0.5))
    snapshot = {n: p.clone() for n, p in tiny_bert.named_parameters()}
    prune_(tiny_bert, PruneConfig(sparsity=0.5))  # same target again: nothing changes
    for n, p in tiny_bert.named_parameters():
        assert torch.equal(p, snapshot[n]), n
    assert not pruner.update(0.3)  # a lower target never brings weights back


def test_cubic_schedule() -> None:
    cfg = PruneConfig(
        sparsity=0.8, schedule="gradual", initial_sparsity=0.1, start_step=10, end_step=110
    )
    values = [cubic_sparsity(s, cfg, 200) for s in range(0, 200, 5)]
    assert cubic_sparsity(0, cfg, 200) == pytest.approx(0.1)
    assert cubic_sparsity(10, cfg, 200) == pytest.approx(0.1)
    assert cubic_sparsity(110, cfg, 200) == pytest.approx(0.8)
    assert cubic_sparsity(199, cfg, 200) == pytest.approx(0.8)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    # Cubic: most of the pruning happens early (half-way it is past 85 % of the way).
    mid = cubic_sparsity(60, cfg, 200)
    assert (mid - 0.1) / 0.7 == pytest.approx(1 - 0.5**3)


def test_masks_survive_adamw_steps_and_gradual_schedule(tiny_bert, calib) -> None:
    """The training loop's contract: Pruner.after_step after each optimizer step keeps pruned
    weights at zero (Adam moments would otherwise move them) and follows the schedule."""
    cfg = PruneConfig(
        sparsity=0.6,
        schedule="gradual",
        initial_sparsity=0.2,
        start_step=0,
        end_step=20,
        update_every=5,
    )
    pruner, _ = prune_(tiny_bert, cfg, total_steps=30)
    opt = torch.optim.AdamW(tiny_bert.parameters(), lr=1e-2)

    def apply(masks: dict[str, torch.Tensor]) -> None:
        params = dict(tiny_bert.named_parameters())
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask)

    tiny_bert.train()
    assert pruner.measured_sparsity() == pytest.approx(0.2, abs=0.01)
    for step in range(1, 31):
        batch = calib[step % len(calib)]
        loss = tiny_bert(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        pruner.after_step(step, 30, apply)
        if step == 10:
            assert 0.2 < pruner.measured_sparsity() < 0.6
    assert pruner.measured_sparsity() == pytest.approx(0.6, abs=0.005)
