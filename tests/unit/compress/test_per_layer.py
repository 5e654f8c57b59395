"""Per-layer settings set by hand or by a search (``compress.<stage>.layers``, a search key
with ``per_layer: true``): each layer at its own bit width, sparsity or rank in the artifact and
its reload; the search's one dimension per layer, the trial job it makes, its name and its
table row; and the errors, each naming its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.compress.artifact import load_artifact
from orchestrator.compress.common import per_layer
from orchestrator.config import load_job
from orchestrator.config.search import SearchConfig, sampled_values, trial_overrides
from orchestrator.errors import ConfigError

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[3]
JOB = str(ROOT / "jobs/debug/compress.yaml")
BLOCK = "bert.encoder.layer.{}.{}"
LINEARS = [
    BLOCK.format(i, part)
    for i in range(2)
    for part in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
]


def _steps(folder: Path) -> tuple[dict, dict]:
    report = json.loads((folder / "compress_report.json").read_text())
    steps = {s["stage"]: s for s in report["steps"]}
    rows: dict[str, dict] = {}
    for r in report["modules"]:
        rows.setdefault(r["technique"], {})[r["name"]] = r
    return steps, rows


def test_the_first_matching_pattern_wins_and_holders_match() -> None:
    names = [*LINEARS, f"{LINEARS[4]}.first", f"{LINEARS[4]}.second"]
    got = per_layer(names, {"*layer.0.*query": 8, "*intermediate.dense": 3, "*": 4}, "k")
    assert got[LINEARS[0]] == 8 and got[LINEARS[6]] == 4
    # The factors of a factorized layer take the value of the layer that holds them.
    assert got[f"{LINEARS[4]}.first"] == got[f"{LINEARS[4]}.second"] == 3


@pytest.mark.parametrize(
    ("layers", "says"),
    [
        ({"*querry": 8}, "'*querry': matches no layer this technique targets"),
        ({"*": 4, "*query": 8}, "'*query': takes no layer: every layer it matches takes an"),
    ],
)
def test_a_pattern_that_sets_nothing_names_its_key(layers: dict, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        per_layer(LINEARS, layers, "compress.quantize.layers")
    assert "compress.quantize.layers = " + says in str(e.value)


def test_each_layer_at_its_own_setting_in_the_artifact_and_its_reload(
    tmp_path: Path, make_artifact
) -> None:
    """Magnitude pruning, SVD and weight-only rounding, each set layer by layer: the report
    rows, the manifest and the reloaded model hold each layer's own value."""
    make_artifact(
        tmp_path,
        "compress.prune={method: magnitude, sparsity: 0.5, layers: {'*layer.0.*': 0.25, "
        "'*layer.1.attention.self.*': 0.75}}",
        "compress.factorize={method: svd, rank_ratio: 0.5, include: ['*intermediate.dense', "
        "'*layer.?.output.dense'], layers: {'*layer.0.intermediate.dense': 0.25, "
        "'*layer.1.output*': 1}}",
        "compress.quantize={method: weight_only, bits: 4, granularity: group, group_size: 32, "
        "layers: {'*attention.self.query': 8, '*layer.1.intermediate.dense': 2}}",
    )
    folder = tmp_path / "debug-compress"
    steps, rows = _steps(folder)
    # Prune: the layers' own sparsities, the others at compress.prune.sparsity.
    assert steps["prune"]["entry"]["layers"] == {
        **{n: 0.25 for n in LINEARS[:6]},
        **{n: 0.75 for n in LINEARS[6:9]},
    }
    for name, row in rows["prune"].items():
        want = 0.25 if ".layer.0." in name else 0.75 if ".attention.self." in name else 0.5
        assert row["details"]["target_sparsity"] == want, name
        assert row["details"]["sparsity"] == pytest.approx(want, abs=2e-3), name
    # Factorize: rank 1/4 and 1/2 of min(in, out); the layer at 1 stays dense.
    ranks = steps["factorize"]["entry"]["ranks"]
    assert BLOCK.format(1, "output.dense") not in ranks
    assert rows["factorize"][BLOCK.format(1, "output.dense")]["reason"].startswith("kept dense")
    assert ranks[LINEARS[4]] * 2 == ranks[LINEARS[10]] == ranks[LINEARS[5]], ranks
    # Quantize: each Linear at its width, the factors of a factorized layer at the layer's.
    widths = steps["quantize"]["entry"]["layers"]
    assert widths[LINEARS[0]] == widths[LINEARS[6]] == 8
    assert widths[f"{LINEARS[10]}.down"] == widths[f"{LINEARS[10]}.up"] == 2
    bits = {n: r["details"]["bits"] for n, r in rows["quantize"].items() if not r["skipped"]}
    assert all(bits[n] == widths.get(n, 4) for n in bits if "embeddings" not in n), bits
    model = load_artifact(folder / "model")
    for name, b in widths.items():
        w = model.get_submodule(name).weight
        groups = w.detach().reshape(w.shape[0], -1, 32)[:4].reshape(-1, 32)
        assert max(len(torch.unique(g)) for g in groups) <= 2**b, (name, b)
    assert all(model.get_submodule(n).rank == r for n, r in ranks.items())
    zeros = float((model.get_submodule(LINEARS[0]).weight == 0).float().mean())
    assert zeros >= 0.25 - 2e-3  # rounding may zero a few more weights


@pytest.mark.parametrize(
    ("override", "says"),
    [
        (
            "compress.quantize={method: weight_only, allocate: {avg_bits: 3}, layers: {'*': 4}}",
            "compress.quantize.layers = {'*': 4}: sets each layer's value by hand",
        ),
        (
            "compress.prune={method: magnitude, schedule: gradual, layers: {'*': 0.5}}",
            "compress.prune.schedule = 'gradual': cannot be combined with compress.prune.layers",
        ),
        (
            "compress.factorize={rank_ratio: 0.5, layers: {'*': 0}}",
            "compress.factorize.layers.*",
        ),
        (
            "compress.quantize={method: dynamic_int8, layers: {'*': 4}}",
            "is not a key of compress.quantize with method=dynamic_int8",
        ),
    ],
)
def test_per_layer_config_errors(override: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_job(JOB, [override])
    assert says in str(e.value)


def test_a_pattern_matching_no_layer_fails_before_anything_is_written(tmp_path: Path) -> None:
    from orchestrator.cli import main

    args = ["compress", JOB, f"output.dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}"]
    code = main([*args, "compress.quantize={method: weight_only, layers: {'*quey': 8}}"])
    assert code == 2
    assert not (tmp_path / "debug-compress").exists()


# ----------------------------------------------------------------------------- the search

SPACE = {
    "compress.quantize": {
        "choice": {"off": None, "w": {"method": "weight_only", "granularity": "group"}}
    },
    "compress.quantize.bits": {"choice": [2, 4, 8], "per_layer": True},
}


def _search(**extra) -> SearchConfig:
    return SearchConfig.model_validate({"space": SPACE, **extra})


def test_a_per_layer_key_is_one_dimension_per_layer() -> None:
    from ray import tune

    from orchestrator.search.space import param_space, trial_job, trial_name

    search = _search()
    ps = param_space(search, {"compress.quantize.bits": LINEARS[:3]})
    assert set(ps) == {"compress.quantize"} | {f"compress.quantize.bits:{n}" for n in LINEARS[:3]}
    assert isinstance(ps[f"compress.quantize.bits:{LINEARS[0]}"], tune.search.sample.Categorical)
    config = {"compress.quantize": "w", **{f"compress.quantize.bits:{n}": 2 for n in LINEARS[:2]}}
    config[f"compress.quantize.bits:{LINEARS[2]}"] = 8
    sampled = sampled_values(search.space, config)
    assert sampled["compress.quantize.bits"] == {LINEARS[0]: 2, LINEARS[1]: 2, LINEARS[2]: 8}
    raw = trial_job({"name": "j"}, search, sampled, "t", "trials")
    assert raw["compress"]["quantize"]["layers"] == sampled["compress.quantize.bits"]
    assert "bits" not in raw["compress"]["quantize"]
    assert trial_name(3, sampled) == "t003_quantize-w_bits-mean4"
    # Switched off: the layers go with the section.
    off = trial_overrides(search.space, {**sampled, "compress.quantize": "off"})
    assert off == {"compress.quantize": None}
    with pytest.raises(ValueError, match="no layers were given"):
        param_space(search)


def test_the_layers_come_from_the_model(tiny_bert) -> None:
    from orchestrator.search.space import per_layer_targets

    space = {
        "compress.quantize.exclude": {"choice": {"l0": ["*classifier*", "*pooler*", "*layer.1.*"]}},
        "compress.quantize.bits": SPACE["compress.quantize.bits"],
    }
    job = {"compress": {"quantize": {"method": "weight_only"}}}
    got = per_layer_targets(job, SearchConfig.model_validate({"space": space}), tiny_bert)
    assert got == {"compress.quantize.bits": LINEARS[:6]}


def test_the_table_shows_a_per_layer_key_by_its_mean() -> None:
    from orchestrator.results.table import build_table, recipe

    search = _search()
    trials = [
        {
            "trial": "t000",
            "status": "done",
            "config": {"compress.quantize": "w", "compress.quantize.bits": {"a": 2, "b": 8}},
            "metrics": {"eval/accuracy": 0.8, "compress/size_bytes": 10.0},
            "error": None,
            "wall_s": 1.0,
        }
    ]
    table = build_table(trials, search, None)
    assert table.column("config/compress.quantize.bits").to_pylist() == [5.0]
    assert recipe({"compress.quantize.bits": {"a": 2, "b": 8}}) == "bits=mean5/layer"


@pytest.mark.parametrize(
    ("space", "extra", "says"),
    [
        (
            {"compress.prune.initial_sparsity": {"uniform": [0.1, 0.5], "per_layer": True}},
            {},
            "search.space.compress.prune.initial_sparsity.per_layer = True: only a bit width",
        ),
        (
            {"compress.quantize.bits": {"choice": {"low": 2, "high": 8}, "per_layer": True}},
            {},
            "search.space.compress.quantize.bits.per_layer = True: each layer's value is a number",
        ),
        (
            {"compress.quantize.bits": {"uniform": [2, 8], "per_layer": True}},
            {},
            "search.space.compress.quantize.bits = 4.22: makes an invalid trial job: "
            "compress.quantize.layers.* = 4.22: Input should be a valid integer, got a number "
            "with a fractional part. Fix: draw whole numbers: {int: [lo, hi]}",
        ),
        (
            {"compress.quantize.bits": {"grid": [2, 4], "per_layer": True}},
            {"algorithm": "grid"},
            "search.space.compress.quantize.bits.per_layer = True: a grid over every layer",
        ),
    ],
)
def test_per_layer_search_errors(space: dict, extra: dict, says: str) -> None:
    from orchestrator.config.loader import validate_job

    raw = load_job(JOB).model_dump(mode="json")
    raw["compress"]["quantize"] = {"method": "weight_only"}
    raw["search"] = {"space": space, **extra}
    with pytest.raises(ConfigError) as e:
        validate_job(raw)
    assert says in str(e.value)


def test_a_method_without_per_layer_values_in_the_space_is_named() -> None:
    from orchestrator.config.loader import validate_job

    raw = load_job(JOB).model_dump(mode="json")
    raw["compress"]["quantize"] = {"method": "weight_only"}
    raw["search"] = {
        "space": {
            "compress.quantize": {
                "choice": {"w": {"method": "weight_only"}, "i8": {"method": "dynamic_int8"}}
            },
            "compress.quantize.bits": {"choice": [2, 4], "per_layer": True},
        }
    }
    with pytest.raises(ConfigError) as e:
        validate_job(raw)
    says = (
        "search.space.compress.quantize = 'i8': makes an invalid trial job: "
        "compress.quantize.layers = {'*': 2}: is not a key of compress.quantize with "
        "method=dynamic_int8"
    )
    assert says in str(e.value)


def test_the_driver_reads_each_per_layer_keys_layers(tmp_path: Path) -> None:
    """The search job's way in: the space of ``jobs/debug/search.yaml`` with the sparsity and a
    bit width per layer; the driver's dimensions are the Linears each technique targets."""
    from types import SimpleNamespace

    from orchestrator import models
    from orchestrator.search.driver import _per_layer_targets
    from orchestrator.search.space import param_space

    space = (
        "search.space={compress.prune.sparsity: {uniform: [0.2, 0.7], per_layer: true}, "
        "compress.quantize: {choice: {w4: {method: weight_only, bits: 4, granularity: group, "
        "group_size: 32, exclude: ['*classifier*', '*pooler*', '*attention*']}}}, "
        "compress.quantize.bits: {choice: [4, 8], per_layer: true}}"
    )
    spec = load_job(ROOT / "jobs/debug/search.yaml", [space, f"output.dir={tmp_path}"])
    layers = _per_layer_targets(
        spec, models.build_tokenizer(spec.model), SimpleNamespace(num_labels=2)
    )
    assert layers == {
        "compress.prune.sparsity": LINEARS,
        "compress.quantize.bits": [n for n in LINEARS if "attention" not in n],
    }
    assert len(param_space(spec.search, layers)) == 1 + len(LINEARS) + 4


# ----------------------------------------------------------------------------- starting points


@pytest.mark.parametrize(
    ("dist", "says"),
    [
        (
            {"uniform": [0.2, 0.7], "allocations": [0.5]},
            "space.compress.prune.sparsity.allocations = [0.5]: allocations are starting points",
        ),
        (
            {"uniform": [0.2, 0.7], "per_layer": True, "allocations": [0.5]},
            "allocations = [0.5]: an allocation picks each layer's value among candidates",
        ),
        (
            {"choice": [0.25, 0.5], "per_layer": True, "allocations": [0.75]},
            "allocations = 0.75: is out of reach: the budget is the mean over the layers' "
            "weights, between 0.25 and 0.5 here",
        ),
        (
            {"choice": [0.25, 0.5, 0.75], "per_layer": True, "allocations": [0.3, 0.4, 0.5]},
            "lists more starting points than the search's 2 trials",
        ),
    ],
)
def test_allocation_starting_point_errors(dist: dict, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_job(
            ROOT / "jobs/debug/search.yaml",
            [f"search.space={{compress.prune.sparsity: {json.dumps(dist)}}}"],
        )
    assert says in str(e.value)


def test_a_rank_allocation_needs_the_dense_choice() -> None:
    dist = {"choice": [0.25, 0.5], "per_layer": True, "allocations": [0.5]}
    with pytest.raises(ConfigError) as e:
        load_job(
            ROOT / "jobs/debug/search.yaml",
            [f"search.space={{compress.factorize.rank_ratio: {json.dumps(dist)}}}"],
        )
    assert "which the choice lacks. Fix: add 1 to compress.factorize.rank_ratio's choice" in str(
        e.value
    )


def test_a_rank_allocation_needs_a_ratio_below_one() -> None:
    dist = {"choice": [1], "per_layer": True, "allocations": [1]}
    with pytest.raises(ConfigError) as e:
        load_job(
            ROOT / "jobs/debug/search.yaml",
            [
                "search.space={compress.factorize: {choice: {svd: {method: svd, rank_ratio: 0.5}}}"
                f", compress.factorize.rank_ratio: {json.dumps(dist)}}}"
            ],
        )
    assert "ratios below 1; it has none. Fix: add a rank ratio below 1" in str(e.value)


def test_the_allocations_measure_on_the_jobs_calibration_batches() -> None:
    """With fewer calibration batches than ``allocate`` profiles on by default, the allocation
    jobs take all the job has; and every allocation job is checked when the job loads."""
    from orchestrator.config.loader import validate_job
    from orchestrator.config.space_check import allocation_job, stage_configs

    space = (
        "search.space={compress.quantize: {choice: {w: {method: weight_only, granularity: group, "
        "group_size: 32}}}, compress.quantize.bits: {choice: [4, 8], per_layer: true, "
        "allocations: [4, 6]}}"
    )
    spec = load_job(ROOT / "jobs/debug/search.yaml", [space, "compress.calib_batches=1"])
    job = spec.model_dump(mode="json")
    cfg, sampled = stage_configs(job, spec.search)["compress.quantize.bits"]
    raw = allocation_job(job, "compress.quantize.bits", [4, 8], cfg, 6)
    assert sampled == {"compress.quantize": "w", "compress.quantize.bits": 4}
    assert raw["compress"] == {
        "quantize": {
            **cfg.model_dump(mode="json", exclude={"layers"}),
            "allocate": {"bits": [4, 8], "avg_bits": 6, "calib_batches": 1},
        },
        "calib_batches": 1,
    }
    assert "search" not in raw
    validate_job(raw)


def test_the_searcher_starts_from_the_allocations(tmp_path: Path) -> None:
    """Bit widths per layer, starting from the allocations at a mean of 4 bits (every layer at
    4: the smallest width) and at 6: the points hold a width from the choice for every layer,
    and both searchers are handed them first."""
    from orchestrator import data, models
    from orchestrator.search.space import allocation_points, per_layer_targets, searcher

    space = (
        "search.space={compress.quantize: {choice: {w: {method: weight_only, granularity: group, "
        "group_size: 32}}}, compress.quantize.bits: {choice: [4, 8], per_layer: true, "
        "allocations: [4, 6]}}"
    )
    spec = load_job(
        ROOT / "jobs/debug/search.yaml",
        [space, f"output.dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}"],
    )
    tokenizer = models.build_tokenizer(spec.model)
    bundle = data.build(spec.data, tokenizer)
    job = spec.model_dump(mode="json")
    model = models.build_model(spec.model, bundle.num_labels, tokenizer)
    layers = per_layer_targets(job, spec.search, model)
    points = allocation_points(job, spec.search, layers, bundle, tokenizer)
    # Whole points (Tune's Optuna searcher takes no partial ones): every layer, and the section.
    keys = {f"compress.quantize.bits:{n}" for n in layers["compress.quantize.bits"]}
    assert len(points) == 2 and all(set(p) == keys | {"compress.quantize"} for p in points)
    assert {v for k, v in points[0].items() if k in keys} == {4}
    assert all(points[1][k] in (4, 8) for k in keys) and points[1]["compress.quantize"] == "w"
    optuna = searcher(spec.search, 1, points)
    assert optuna._points_to_evaluate == points
    random = searcher(spec.search.model_copy(update={"algorithm": "random"}), 1, points)
    assert random._points_to_evaluate == points
