"""Strategy helpers without processes: the generated DeepSpeed config, the LR schedule and the
optimizer's weight-decay groups."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from orchestrator.config import ModelConfig, TrainConfig
from orchestrator.models import build_model, build_tokenizer
from orchestrator.strategies import build_ds_config, build_lr_schedule, build_optimizer

pytestmark = pytest.mark.unit

# Every valid (zero_stage, precision, offload) combination; offload needs stage 2 or 3.
_ZERO = [
    (stage, precision, offload)
    for stage, precision, offload in itertools.product(
        range(4), ["fp32", "bf16", "fp16"], [False, True]
    )
    if not offload or stage >= 2
]
# (world_size, batch_size, grad_accum_steps, max_grad_norm)
_SHAPES = [(1, 4, 1, 1.0), (2, 8, 3, 0.5), (4, 16, 2, 0.0)]


@pytest.mark.parametrize(("world", "batch_size", "grad_accum", "max_norm"), _SHAPES)
@pytest.mark.parametrize(("stage", "precision", "offload"), _ZERO)
def test_ds_config(stage, precision, offload, world, batch_size, grad_accum, max_norm) -> None:
    spec = TrainConfig(
        strategy="deepspeed",
        zero_stage=stage,
        precision=precision,
        offload_optimizer=offload,
        batch_size=batch_size,
        grad_accum_steps=grad_accum,
        max_grad_norm=max_norm,
    )
    ds = build_ds_config(spec, world)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")
    assert ("offload_optimizer" in zero) is offload
    if offload:
        assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) is (stage == 3)
    assert ds["train_micro_batch_size_per_gpu"] == batch_size
    assert ds["gradient_accumulation_steps"] == grad_accum
    assert ds["train_batch_size"] == batch_size * grad_accum * world
    assert ds["gradient_clipping"] == max_norm
    # A torch optimizer and LR schedule are passed in: DeepSpeed must not build its own.
    assert "optimizer" not in ds
    assert "scheduler" not in ds
    assert json.loads(json.dumps(ds)) == ds  # plain JSON, as DeepSpeed reads it


@pytest.mark.parametrize(("optimizer", "untested"), [("adamw", False), ("sgd", True)])
def test_ds_config_allows_sgd(optimizer, untested) -> None:
    spec = TrainConfig(strategy="deepspeed", zero_stage=2, optimizer=optimizer)
    ds = build_ds_config(spec, 2)
    assert ds["zero_allow_untested_optimizer"] is untested
    assert ds["zero_force_ds_cpu_optimizer"] is False


# --- LR schedule -----------------------------------------------------------------------------

PEAK = 0.1
TOTAL = 50


def _lrs(schedule: str, warmup_ratio: float, total: int = TOTAL) -> list[list[float]]:
    """The learning rate of every param group at steps 0..total (inclusive)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    spec = TrainConfig(lr=PEAK, lr_schedule=schedule, warmup_ratio=warmup_ratio)
    optimizer = build_optimizer(model, spec)
    scheduler = build_lr_schedule(optimizer, spec, total)
    out = []
    for _ in range(total + 1):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def _first_group(lrs: list[list[float]]) -> list[float]:
    assert all(len(set(step)) == 1 for step in lrs)  # every group follows the same schedule
    return [step[0] for step in lrs]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_warmup_rises_linearly_to_peak(schedule) -> None:
    lrs = _first_group(_lrs(schedule, warmup_ratio=0.2))
    warmup = int(0.2 * TOTAL)
    rising = lrs[: warmup + 1]
    steps = [b - a for a, b in itertools.pairwise(rising)]
    assert all(s > 0 for s in steps)
    assert steps == pytest.approx([steps[0]] * len(steps))  # linear
    assert rising[0] > 0
    assert lrs[warmup] == pytest.approx(PEAK)
    assert max(lrs) == pytest.approx(PEAK)


def test_linear_decays_to_zero() -> None:
    lrs = _first_group(_lrs("linear", warmup_ratio=0.2))
    decay = lrs[int(0.2 * TOTAL) :]
    steps = [b - a for a, b in itertools.pairwise(decay)]
    assert all(s < 0 for s in steps)
    assert steps == pytest.approx([steps[0]] * len(steps))
    assert lrs[TOTAL] == pytest.approx(0.0, abs=1e-12)
    assert lrs[TOTAL - 1] > 0


def test_cosine_ends_near_zero() -> None:
    lrs = _first_group(_lrs("cosine", warmup_ratio=0.2))
    warmup = int(0.2 * TOTAL)
    decay = lrs[warmup:]
    assert all(b <= a for a, b in itertools.pairwise(decay))
    assert lrs[TOTAL] == pytest.approx(0.0, abs=1e-12)
    assert lrs[TOTAL - 1] < 0.01 * PEAK
    middle = warmup + (TOTAL - warmup) // 2
    assert lrs[middle] == pytest.approx(PEAK / 2)
    # Cosine stays above linear in the first half of the decay.
    assert lrs[warmup + 5] > PEAK * (1 - 5 / (TOTAL - warmup))


def test_constant_stays_at_peak() -> None:
    lrs = _first_group(_lrs("constant", warmup_ratio=0.2))
    assert lrs[int(0.2 * TOTAL) :] == pytest.approx([PEAK] * (TOTAL + 1 - int(0.2 * TOTAL)))


def test_no_warmup_starts_at_peak() -> None:
    lrs = _first_group(_lrs("linear", warmup_ratio=0.0))
    assert lrs[0] == pytest.approx(PEAK)
    assert lrs[TOTAL] == pytest.approx(0.0, abs=1e-12)
    assert not math.isnan(sum(lrs))


def test_schedule_stays_at_zero_past_the_end() -> None:
    model = nn.Linear(2, 2)
    spec = TrainConfig(lr=PEAK, lr_schedule="linear", warmup_ratio=0.1)
    optimizer = build_optimizer(model, spec)
    scheduler = build_lr_schedule(optimizer, spec, 10)
    for _ in range(15):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0


# --- optimizer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert() -> nn.Module:
    tokenizer = build_tokenizer(ModelConfig(name="tiny-bert"))
    return build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=0)


def _groups(optimizer, model) -> list[tuple[float, set[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        (g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups
    ]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_no_decay_for_biases_and_layer_norms(tiny_bert, kind) -> None:
    spec = TrainConfig(optimizer=kind, weight_decay=0.05, lr=0.01, momentum=0.8)
    optimizer = build_optimizer(tiny_bert, spec)
    assert isinstance(optimizer, torch.optim.AdamW if kind == "adamw" else torch.optim.SGD)
    if kind == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.8
    (decay_wd, decay), (no_decay_wd, no_decay) = _groups(optimizer, tiny_bert)
    assert decay_wd == 0.05 and no_decay_wd == 0.0
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)
    every = {n for n, _ in tiny_bert.named_parameters()}
    assert decay | no_decay == every and not decay & no_decay
    for name in every:
        if name.endswith(".bias") or "LayerNorm" in name:
            assert name in no_decay, name
    assert "bert.encoder.layer.0.attention.self.query.weight" in decay
    assert "bert.encoder.layer.1.output.LayerNorm.weight" in no_decay
    assert "classifier.weight" in decay
    assert "classifier.bias" in no_decay


def test_frozen_parameters_are_left_out() -> None:
    tokenizer = build_tokenizer(ModelConfig(name="tiny-bert"))
    model = build_model(ModelConfig(name="tiny-bert"), 2, tokenizer)
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig())
    names = set().union(*(names for _, names in _groups(optimizer, model)))
    assert names and not any(n.startswith("bert.embeddings.") for n in names)


def test_only_no_decay_params_gives_one_group() -> None:
    model = nn.LayerNorm(8)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
