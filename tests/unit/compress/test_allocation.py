"""Per-layer allocation under a budget: mixed precision (``compress.quantize.allocate``),
sparsity (``compress.prune.allocate``) and rank (``compress.factorize.allocate``). The exact
allocation against brute force, the sensitivity profile on a real (tiny) model, the per-layer
settings in the artifact and its reload, and the budget errors."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from orchestrator.compress.artifact import load_artifact
from orchestrator.compress.qtensor import fake_quantize
from orchestrator.compress.sensitivity import (
    Profile,
    allocate_bits,
    allocate_sparsity,
    profile,
    weighted_mean,
)
from orchestrator.config import load_job

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[3]
JOB = str(ROOT / "jobs/debug/compress.yaml")
ALLOCATE = (
    "compress.quantize={method: weight_only, granularity: group, group_size: 32, "
    "allocate: {avg_bits: 2.5}}"
)


def _profile(seed: int, n: int = 5) -> Profile:
    rng = random.Random(seed)
    bits = [2, 3, 4, 8]
    params = [rng.choice([64, 128, 256, 96]) * 32 for _ in range(n)]
    # Fewer bits never hurt less: decreasing KL in the width, as measured profiles are.
    kl = [sorted((rng.uniform(0, 1) for _ in bits), reverse=True) for _ in range(n)]
    return Profile([f"l{i}" for i in range(n)], params, "bits", bits, kl, batches=1, seconds=0.0)


def _small_bert(hidden: int = 64, blocks: int = 2) -> tuple[torch.nn.Module, list]:
    """A random BERT classifier wider than the tiny-bert fixture (whose untrained outputs
    barely move at any width) and its Linears."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=blocks,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    return model, [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _rounded(_name: str, layer: torch.nn.Linear):
    """Profile variants: the layer's weight rounded per channel, symmetric."""
    return lambda b: fake_quantize(layer.weight.data, int(b), "channel", 1, True)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("avg_bits", [2.0, 2.7, 3.0, 4.5, 8.0])
def test_allocation_is_the_best_under_the_budget(seed: int, avg_bits: float) -> None:
    prof = _profile(seed)
    choice = allocate_bits(prof, avg_bits)
    assert weighted_mean(prof, choice) <= avg_bits + 1e-9
    loss = sum(prof.kl[i][prof.values.index(choice[n])] for i, n in enumerate(prof.layers))
    best = min(
        sum(prof.kl[i][j] for i, j in enumerate(combo))
        for combo in itertools.product(range(len(prof.values)), repeat=len(prof.layers))
        if weighted_mean(prof, {n: prof.values[j] for n, j in zip(prof.layers, combo, strict=True)})
        <= avg_bits + 1e-9
    )
    assert loss == pytest.approx(best)


def test_a_budget_below_the_smallest_width_is_refused() -> None:
    with pytest.raises(ValueError, match="below what the smallest width"):
        allocate_bits(_profile(0), 1.5)


def test_profile_of_a_real_model_leaves_it_unchanged(calib) -> None:
    model, layers = _small_bert()
    before = {n: m.weight.detach().clone() for n, m in layers}
    prof = profile(model, layers, "bits", [2, 8], _rounded, calib[:1])
    assert prof.layers == [n for n, _ in layers] and len(prof.kl[0]) == 2
    assert all(torch.equal(m.weight, before[n]) for n, m in layers)
    # 2 bits moves the outputs more than 8 bits, layer by layer.
    assert all(row[0] > row[1] >= 0 for row in prof.kl), prof.kl


def _sharp_tiny_bert(folder: Path) -> Path:
    """The debug job's tiny BERT with every Linear weight 8 times its initial value, saved
    with its tokenizer. At the initial scale its untrained outputs move by about 1e-4 whatever
    the widths, and which of two allocations moves them less is decided by rounding; at 8
    times it is decided by the weights (at a mean of 2.5 bits the allocation's joint KL is
    about an eighth of 2 bits everywhere)."""
    from orchestrator.config import ModelConfig
    from orchestrator.models import build_model, build_tokenizer

    tokenizer = build_tokenizer(ModelConfig(name="tiny-bert"))
    model = build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(8.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_per_layer_widths_in_the_artifact_and_its_reload(tmp_path: Path, make_artifact) -> None:
    sharp = _sharp_tiny_bert(tmp_path / "sharp")
    model_path = ["model.name=null", f"model.path={sharp}"]
    make_artifact(tmp_path, *model_path, "compress.prune=null", "compress.factorize=null", ALLOCATE)
    report = json.loads((tmp_path / "debug-compress/compress_report.json").read_text())
    step = next(s for s in report["steps"] if s["stage"] == "quantize")
    allocation = step["entry"]["allocation"]
    chosen = allocation["choice"]
    assert allocation["check"]["kept"] == "allocation", allocation["check"]
    assert allocation["mean"] <= 2.5 and len(set(chosen.values())) > 1, chosen
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
        (
            "compress.prune={method: magnitude, sparsity: 0.9, allocate: {}}",
            "compress.prune.sparsity = 0.9: no allocation",
        ),
        (
            "compress.prune={method: wanda, sparsity: 0.5, schedule: gradual, allocate: {}}",
            "compress.prune.schedule = 'gradual': cannot be combined with",
        ),
        (
            "compress.prune={method: magnitude, allocate: {sparsities: [0.5, 0.5]}}",
            "compress.prune.allocate.sparsities",
        ),
        (
            "compress.prune={method: sparsegpt, allocate: {}}",
            "is not a key of compress.prune with method=sparsegpt",
        ),
        (
            "compress.factorize={rank: 4, allocate: {param_ratio: 0.5}}",
            "exactly one of compress.factorize.rank, rank_ratio, energy, allocate",
        ),
        (
            "compress.factorize={allocate: {param_ratio: 0.5, calib_batches: 9}}",
            "compress.factorize.allocate.calib_batches = 9",
        ),
    ],
)
def test_budget_and_candidate_errors(override: str, says: str) -> None:
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_job(JOB, [override])
    assert says in str(e.value)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_sparsity_allocation_is_the_best_with_the_mean(seed: int, sparsity: float) -> None:
    """At least the mean sparsity asked for, with the least summed KL of all such choices; a
    budget the candidates hit exactly (0.5 everywhere) is never worse than that uniform
    choice."""
    rng = random.Random(seed)
    values = [0.0, 0.25, 0.5, 0.75]
    params = [rng.choice([64, 128, 256, 96]) * 32 for _ in range(5)]
    kl = [sorted(rng.uniform(0, 1) for _ in values) for _ in params]
    prof = Profile([f"l{i}" for i in range(5)], params, "sparsity", values, kl, 1, 0.0)
    choice = allocate_sparsity(prof, sparsity)
    assert weighted_mean(prof, choice) >= sparsity - 1e-9
    loss = sum(kl[i][values.index(choice[n])] for i, n in enumerate(prof.layers))
    best = min(
        sum(kl[i][j] for i, j in enumerate(combo))
        for combo in itertools.product(range(len(values)), repeat=len(params))
        if weighted_mean(prof, {n: values[j] for n, j in zip(prof.layers, combo, strict=True)})
        >= sparsity - 1e-9
    )
    assert loss == pytest.approx(best)
    if sparsity == 0.5:
        assert loss <= sum(row[2] for row in kl) + 1e-12


def _layers(report: dict, technique: str) -> dict[str, dict]:
    return {r["name"]: r for r in report["modules"] if r["technique"] == technique}


def test_per_layer_sparsity_in_the_artifact_and_its_reload(tmp_path: Path, make_artifact) -> None:
    """Magnitude pruning at a mean of 50 %, allocated and refined by 3 joint measurements: the
    layers differ, each holds the sparsity it was given, the mean holds, and the reload has
    the same zeros."""
    make_artifact(
        tmp_path,
        "compress.factorize=null",
        "compress.quantize=null",
        "compress.prune={method: magnitude, sparsity: 0.5, allocate: {refine: 3}}",
    )
    folder = tmp_path / "debug-compress"
    report = json.loads((folder / "compress_report.json").read_text())
    allocation = next(s for s in report["steps"] if s["stage"] == "prune")["entry"]["allocation"]
    chosen = allocation["choice"]
    assert allocation["setting"] == "sparsity" and allocation["mean"] >= 0.5 - 1e-9
    # The untrained tiny model barely reacts: the joint check may keep 50 % everywhere.
    assert len(set(chosen.values())) > 1 or allocation["check"]["kept"] == "uniform", chosen
    refine = allocation["check"]["refine"]
    assert refine["evaluations"] <= 3 and refine["kl_after"] <= refine["kl_before"]
    rows = _layers(report, "prune")
    for name, s in chosen.items():
        assert rows[name]["details"]["target_sparsity"] == s
        assert rows[name]["details"]["sparsity"] == pytest.approx(s, abs=1e-3)
    assert (folder / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    model = load_artifact(folder / "model")
    for name, s in chosen.items():
        w = model.get_submodule(name).weight
        assert float((w == 0).float().mean()) == pytest.approx(s, abs=1e-3), name


def test_per_layer_rank_in_the_artifact_and_its_reload(tmp_path: Path, make_artifact) -> None:
    """SVD under half the dense weights, allocated: some layers factorized at their own rank,
    the factorized weights within the budget, the reload holds the same thin layers."""
    make_artifact(
        tmp_path,
        "compress.prune=null",
        "compress.quantize=null",
        "compress.factorize.allocate={param_ratio: 0.5}",
    )
    folder = tmp_path / "debug-compress"
    report = json.loads((folder / "compress_report.json").read_text())
    step = next(s for s in report["steps"] if s["stage"] == "factorize")
    allocation, ranks = step["entry"]["allocation"], step["entry"]["ranks"]
    assert allocation["setting"] == "rank_ratio" and allocation["param_ratio"] <= 0.5 + 1e-9
    rows = _layers(report, "factorize")
    dense = sum(r["shape_before"][0] * r["shape_before"][1] for r in rows.values())
    kept = sum(
        ranks[n] * (r["shape_before"][0] + r["shape_before"][1])
        if n in ranks
        else r["shape_before"][0] * r["shape_before"][1]
        for n, r in rows.items()
    )
    assert kept / dense == pytest.approx(allocation["param_ratio"]) and ranks
    for name, ratio in allocation["choice"].items():
        assert (name in ranks) == (ratio < 1), (name, ratio)
    model = load_artifact(folder / "model")
    assert all(model.get_submodule(n).rank == r for n, r in ranks.items())


def test_a_rank_budget_no_allocation_meets_names_its_key(tmp_path: Path) -> None:
    from orchestrator.cli import main

    args = [
        "compress",
        JOB,
        f"output.dir={tmp_path}",
        f"data.cache_dir={tmp_path / 'c'}",
        "compress.prune=null",
        "compress.quantize=null",
        "compress.factorize.allocate={param_ratio: 0.01, rank_ratios: [0.5]}",
    ]
    assert main(args) == 2
    assert not (tmp_path / "debug-compress").exists()


def test_a_profile_is_measured_once_per_model_and_batches(tmp_path: Path, calib) -> None:
    """Read back from the cache for the same model, batches and settings; measured again
    when a weight or a batch differs."""
    model, layers = _small_bert(hidden=32, blocks=1)
    layers = layers[:3]

    def measure(batches):
        return profile(
            model,
            layers,
            "bits",
            [2, 8],
            lambda _n, layer: (
                lambda b: fake_quantize(layer.weight.data, int(b), "channel", 1, True)
            ),
            batches,
            cache_dir=tmp_path,
            recipe="rtn",
        )

    first = measure(calib[:1])
    again = measure(calib[:1])
    assert not first.cached and again.cached and again.kl == first.kl
    assert not measure(calib[1:2]).cached
    with torch.no_grad():
        layers[0][1].weight[0, 0] += 1.0
    assert not measure(calib[:1]).cached


def test_the_joint_check_keeps_whichever_moves_the_outputs_less(calib) -> None:
    """The knapsack's choice against the best uniform setting within the budget, both measured
    with every layer changed at once: the one kept is the one with the smaller joint KL, and
    the record says so; a choice that is already uniform is not measured again."""
    from orchestrator.compress.sensitivity import bit_costs, checked, joint_kl

    model, layers = _small_bert()
    layers = layers[:-1]  # not the classifier
    variants = _rounded
    prof = profile(model, layers, "bits", [2, 3, 8], variants, calib[:1])
    batches = calib[:1]
    # Most layers at 2 bits, one at 8, against 8 bits everywhere (the uniform setting that
    # loses least when every width fits): the uniform one moves the outputs less.
    mostly_2 = {n: 8.0 if i == 0 else 2.0 for i, n in enumerate(prof.layers)}
    roomy = bit_costs(prof, 8.0)
    kept, record = checked(model, layers, prof, mostly_2, *roomy, variants, batches)
    assert record["uniform"] == 8.0 and record["kept"] == "uniform"
    assert kept == {n: 8.0 for n in prof.layers}
    assert record["allocation_kl"] == pytest.approx(
        joint_kl(model, layers, mostly_2, variants, batches)
    )
    assert record["allocation_kl"] > record["uniform_kl"]
    # Most layers at 8 bits against 2 bits everywhere (the only uniform width a mean of 2 bits
    # allows): the allocation is kept.
    mostly_8 = {n: 2.0 if i == 0 else 8.0 for i, n in enumerate(prof.layers)}
    kept, record = checked(model, layers, prof, mostly_8, *bit_costs(prof, 2.0), variants, batches)
    assert record["uniform"] == 2.0 and record["kept"] == "allocation" and kept == mostly_8
    # A choice that is already uniform is not measured again.
    flat = {n: 3.0 for n in prof.layers}
    assert checked(model, layers, prof, flat, *bit_costs(prof, 3.0), variants, batches) == (
        flat,
        {"kept": "allocation", "uniform": None},
    )


@pytest.mark.parametrize("seed", range(4))
def test_the_refinement_only_takes_what_lowers_the_joint_loss_within_the_budget(seed: int) -> None:
    """``refined`` on a loss that is not the profile's sum (pairs of layers interact): every
    choice it measures keeps the budget, it stops at its measurement limit, it ends no worse
    than it started, and what it returns is the best it measured."""
    from orchestrator.compress.sensitivity import bit_costs, refined

    prof = _profile(seed, n=6)
    costs, budget = bit_costs(prof, 3.0)
    rng = random.Random(seed)
    inter = [[rng.uniform(-0.3, 0.3) for _ in prof.layers] for _ in prof.layers]
    seen: list[tuple[dict, float]] = []

    def measure(choice: dict[str, float]) -> float:
        at = [prof.values.index(choice[n]) for n in prof.layers]
        assert sum(costs[i][j] for i, j in enumerate(at)) <= budget
        loss = sum(prof.kl[i][j] for i, j in enumerate(at))
        loss += sum(inter[i][k] * (j - at[k]) ** 2 for i, j in enumerate(at) for k in range(i))
        seen.append((choice, loss))
        return loss

    start = allocate_bits(prof, 3.0)
    first = measure(start)
    seen.clear()
    kept, record = refined(prof, start, first, costs, budget, measure, evaluations=25)
    assert record["evaluations"] == len(seen) <= 25
    assert record["kl_before"] == first and record["kl_after"] <= first
    best = min([first] + [loss for _, loss in seen])
    assert record["kl_after"] == best
    assert kept == (start if best == first else next(c for c, loss in seen if loss == best))
    assert record["moves"] == 0 or record["kl_after"] < first
