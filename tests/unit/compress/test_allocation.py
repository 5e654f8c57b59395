"""Mixed precision under a budget (``compress.quantize.allocate``): the exact allocation
against brute force, the sensitivity profile on a real (tiny) model, the per-layer widths in the
artifact and its reload, and the budget errors."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from orchestrator.compress.artifact import load_artifact
from orchestrator.compress.sensitivity import Profile, allocate_bits, mean_bits, profile_bits
from orchestrator.config import load_job

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[3]
JOB = str(ROOT / "jobs/debug/compress.yaml")
ALLOCATE = (
    "compress.quantize={method: weight_only, granularity: group, group_size: 32, "
    "allocate: {avg_bits: 3}}"
)


def _profile(seed: int, n: int = 5) -> Profile:
    rng = random.Random(seed)
    bits = [2, 3, 4, 8]
    params = [rng.choice([64, 128, 256, 96]) * 32 for _ in range(n)]
    # Fewer bits never hurt less: decreasing KL in the width, as measured profiles are.
    kl = [sorted((rng.uniform(0, 1) for _ in bits), reverse=True) for _ in range(n)]
    return Profile([f"l{i}" for i in range(n)], params, bits, kl, batches=1, seconds=0.0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("avg_bits", [2.0, 2.7, 3.0, 4.5, 8.0])
def test_allocation_is_the_best_under_the_budget(seed: int, avg_bits: float) -> None:
    profile = _profile(seed)
    choice = allocate_bits(profile, avg_bits)
    assert mean_bits(profile, choice) <= avg_bits + 1e-9
    loss = sum(profile.kl[i][profile.bits.index(choice[n])] for i, n in enumerate(profile.layers))
    best = min(
        sum(profile.kl[i][j] for i, j in enumerate(combo))
        for combo in itertools.product(range(len(profile.bits)), repeat=len(profile.layers))
        if mean_bits(
            profile, {n: profile.bits[j] for n, j in zip(profile.layers, combo, strict=True)}
        )
        <= avg_bits + 1e-9
    )
    assert loss == pytest.approx(best)


def test_a_budget_below_the_smallest_width_is_refused() -> None:
    with pytest.raises(ValueError, match="below what the smallest width"):
        allocate_bits(_profile(0), 1.5)


def test_profile_of_a_real_model_leaves_it_unchanged(calib) -> None:
    from transformers import AutoModelForSequenceClassification, BertConfig

    # Wider than the tiny-bert fixture, whose untrained outputs barely move at any width.
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    before = {n: m.weight.detach().clone() for n, m in layers}
    profile = profile_bits(model, layers, [2, 8], lambda b: (b, "channel", 1, True), calib[:1])
    assert profile.layers == [n for n, _ in layers] and len(profile.kl[0]) == 2
    assert all(torch.equal(m.weight, before[n]) for n, m in layers)
    # 2 bits moves the outputs more than 8 bits, layer by layer.
    assert all(row[0] > row[1] >= 0 for row in profile.kl), profile.kl


def test_per_layer_widths_in_the_artifact_and_its_reload(tmp_path: Path, make_artifact) -> None:
    make_artifact(tmp_path, "compress.prune=null", "compress.factorize=null", ALLOCATE)
    report = json.loads((tmp_path / "debug-compress/compress_report.json").read_text())
    step = next(s for s in report["steps"] if s["stage"] == "quantize")
    allocation = step["entry"]["allocation"]
    chosen = allocation["layer_bits"]
    assert allocation["mean_bits"] <= 3.0 and len(set(chosen.values())) > 1, chosen
    png = (tmp_path / "debug-compress/sensitivity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"  # the heatmap of the profile
    rows = {r["name"]: r for r in report["modules"] if r["technique"] == "quantize"}
    assert all(rows[n]["details"]["bits"] == b for n, b in chosen.items())
    # Reloaded from the manifest alone (no profiling): each Linear at its own width.
    model = load_artifact(tmp_path / "debug-compress/model")
    for name, bits in chosen.items():
        w = model.get_submodule(name).weight
        groups = w.reshape(w.shape[0], -1, 32)
        levels = max(len(torch.unique(g)) for g in groups[:4].reshape(-1, 32))
        assert levels <= 2**bits, (name, bits, levels)


@pytest.mark.parametrize(
    ("override", "says"),
    [
        (
            "compress.quantize={method: weight_only, allocate: {avg_bits: 1.5}}",
            "compress.quantize.allocate.avg_bits = 1.5: no allocation",
        ),
        (
            "compress.quantize={method: weight_only, allocate: {avg_bits: 3, bits: []}}",
            "compress.quantize.allocate.bits",
        ),
        (
            "compress.quantize={method: fake, allocate: {avg_bits: 3, calib_batches: 9}}",
            "compress.quantize.allocate.calib_batches = 9: is more than the 4",
        ),
        (
            "compress.quantize={method: dynamic_int8, allocate: {avg_bits: 3}}",
            "is not a key of compress.quantize with method=dynamic_int8",
        ),
    ],
)
def test_budget_and_candidate_errors(override: str, says: str) -> None:
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_job(JOB, [override])
    assert says in str(e.value)
