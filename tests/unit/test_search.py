"""The ``search`` section: space parsing and validation against the job, the trial overrides
(conditional sections), and its translation to Ray Tune (param space, searcher, names)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import dump_job, load_job
from orchestrator.config.loader import validate_job
from orchestrator.config.overrides import load_yaml as _load
from orchestrator.config.search import SearchConfig, trial_overrides
from orchestrator.errors import ConfigError
from orchestrator.search import space as space_lib

pytestmark = pytest.mark.unit
JOB = "jobs/debug/search.yaml"


def _problems(*overrides: str) -> list:
    with pytest.raises(ConfigError) as e:
        load_job(JOB, list(overrides))
    return e.value.problems


def _space(text: str) -> str:
    return f"search.space={text}"


def test_debug_job_round_trips() -> None:
    spec = load_job(JOB)
    again = validate_job(_load(dump_job(spec)))
    assert again == spec
    assert spec.search.space["compress.quantize"].kind == "choice"
    # Saved as written: only the distribution's own kind.
    assert "loguniform" not in dump_job(spec)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("{train.lr: {loguniform: [1.0e-5, 1.0e-3]}}", "loguniform"),
        ("{compress.prune.sparsity: {uniform: [0.1, 0.5]}}", "uniform"),
        ("{train.max_steps: {int: [4, 8]}}", "int"),
        ("{compress.quantize.bits: {choice: [4, 8]}}", "choice"),
    ],
)
def test_each_distribution_kind(text: str, kind: str) -> None:
    spec = load_job(JOB, [_space(text)])
    (dist,) = spec.search.space.values()
    assert dist.kind == kind


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (
            (_space("{compress.prune.sparsty: {uniform: [0.2, 0.5]}}"),),
            "search.space.compress.prune.sparsty",
            "did you mean compress.prune.sparsity",
        ),
        (
            (_space("{train.lrr: {uniform: [0.1, 0.2]}}"),),
            "search.space.train.lrr",
            "did you mean train.lr",
        ),
        (
            (_space("{compress.prune.sparsity: {uniform: [0.6, 0.2]}}"),),
            "search.space.compress.prune.sparsity.uniform",
            "inverted",
        ),
        (
            (_space("{compress.prune.sparsity: {uniform: [0.2, 0.2]}}"),),
            "search.space.compress.prune.sparsity.uniform",
            "empty",
        ),
        (
            (_space("{train.lr: {loguniform: [0.0, 0.1]}}"),),
            "search.space.train.lr.loguniform",
            "lo > 0",
        ),
        (
            (_space("{compress.quantize.bits: {choice: []}}"),),
            "search.space.compress.quantize.bits.choice",
            "no values",
        ),
        (
            (_space("{compress.prune.sparsity: {uniform: [0.2, 1.5]}}"),),
            "search.space.compress.prune.sparsity",
            "less than 1",
        ),
        (
            (
                _space(
                    "{compress.quantize.method: {choice: [dynamic_int8, fake]}, "
                    "compress.quantize.bits: {choice: [4, 8]}}"
                ),
            ),
            "search.space.compress.quantize.bits",
            "is not a key of compress.quantize with method=dynamic_int8",
        ),
        (
            (_space("{compress.prune.sparsity: {uniform: [0.2, 0.5], choice: [0.1]}}"),),
            "search.space.compress.prune.sparsity.choice",
            "exactly one",
        ),
        (
            (_space("{compress.factorize: {choice: [null, {method: svd, rank: 4}]}}"),),
            "search.space.compress.factorize.choice",
            "needs a label",
        ),
        (
            (_space("{compress.prune.sparsity: {grid: [0.2, 0.5]}}"),),
            "search.space.compress.prune.sparsity.grid",
            "search.algorithm=grid",
        ),
        (
            ("search.algorithm=grid",),
            "search.space.compress.prune.sparsity",
            "cannot sample a range",
        ),
        (
            ("search.objectives=[{metric: eval/acuracy, mode: max}]",),
            "search.objectives.0.metric",
            "did you mean eval/accuracy",
        ),
        (("search.scheduler=asha",), "search.scheduler", "several objectives"),
        (
            (
                "search.objectives=[{metric: compress/size_bytes, mode: min}]",
                "search.scheduler=asha",
                "train.eval_every=2",
            ),
            "search.scheduler",
            "only known at the end",
        ),
        (
            ("search.objectives=[{metric: eval/accuracy, mode: max}]", "search.scheduler=asha"),
            "train.eval_every",
            "reported during training",
        ),
        (
            ("search.baseline.overrides={train.epohcs: 2}",),
            "search.baseline.overrides.train.epohcs",
            "did you mean train.epochs",
        ),
        (
            ("search.points=[{compress.prune.sparsity: 0.8, compress.quantize: int8}]",),
            "search.points.0.compress.prune.sparsity",
            "outside the uniform range [0.2, 0.7]",
        ),
        (
            ("search.points=[{compress.prune.sparsity: 0.3, compress.quantize: int2}]",),
            "search.points.0.compress.quantize",
            "write one of off, int8, int4",
        ),
        (
            ("search.points=[{compress.prune.sparsity: 0.3}]",),
            "search.points.0",
            "gives no value for compress.quantize",
        ),
        (
            ("search.points=[{compress.prune.sparsty: 0.3, compress.quantize: off}]",),
            "search.points.0.compress.prune.sparsty",
            "did you mean compress.prune.sparsity",
        ),
        (
            (
                "search.points=[{compress.prune.sparsity: 0.3, compress.quantize: off}, "
                "{compress.prune.sparsity: 0.5, compress.quantize: int8}, "
                "{compress.prune.sparsity: 0.7, compress.quantize: int4}]",
            ),
            "search.points",
            "more than the search's 2 trials",
        ),
        (
            (
                "search.algorithm=grid",
                _space("{compress.prune.sparsity: {grid: [0.2, 0.5]}}"),
                "search.points=[{compress.prune.sparsity: 0.2}]",
            ),
            "search.points",
            "a grid search tries every grid value itself",
        ),
        (
            (
                _space("{train.max_steps: {int: [4, 8]}}"),
                "search.points=[{train.max_steps: 5.5}]",
            ),
            "search.points.0.train.max_steps",
            "is not a whole number",
        ),
        (("search.confirm_seeds=[1, 2, 1]",), "search.confirm_seeds", "gives seed 1 more than"),
        (("search.confirm_seeds=[0, 1]",), "search.confirm_seeds", "holds 0, the recipe's own"),
        (("search.confirm_seeds=[-1]",), "search.confirm_seeds.0", "greater than or equal to 0"),
        (("search.max_failures=-2",), "search.max_failures", "greater than or equal to -1"),
        (("search.max_failures=x",), "search.max_failures", "valid integer"),
    ],
)
def test_bad_search_sections(overrides: tuple[str, ...], key: str, words: str) -> None:
    problems = _problems(*overrides)
    hit = [p for p in problems if p.key == key]
    assert hit, [str(p) for p in problems]
    assert words in str(hit[0]), str(hit[0])


def test_labelled_section_choice_makes_conditional_space_valid() -> None:
    """A rank only when factorizing: the section off drops its keys, so no combination fails."""
    spec = load_job(
        JOB,
        [
            _space(
                "{compress.factorize: {choice: {off: null, asvd: {method: asvd}}}, "
                "compress.factorize.rank_ratio: {choice: [0.25, 0.5]}}"
            )
        ],
    )
    space = spec.search.space
    assert list(space["compress.factorize"].choice) == ["off", "asvd"]  # YAML's `off` stays a label
    off = trial_overrides(
        space, {"compress.factorize": "off", "compress.factorize.rank_ratio": 0.5}
    )
    assert off == {"compress.factorize": None}
    on = trial_overrides(
        space, {"compress.factorize": "asvd", "compress.factorize.rank_ratio": 0.5}
    )
    assert list(on) == ["compress.factorize", "compress.factorize.rank_ratio"]  # section first
    assert on["compress.factorize"] == {"method": "asvd"}


def test_trial_job_is_a_valid_job_without_search() -> None:
    spec = load_job(JOB)
    base = spec.model_dump(mode="json")
    raw = space_lib.trial_job(
        base,
        spec.search,
        {"compress.prune.sparsity": 0.3, "compress.quantize": "int4"},
        "t007_x",
        "/tmp/trials",
    )
    job = validate_job(raw)
    assert job.search is None and job.name == "t007_x" and job.output.dir == "/tmp/trials"
    assert job.compress.prune.sparsity == 0.3
    assert job.compress.quantize.method == "weight_only" and job.compress.quantize.bits == 4
    off = validate_job(
        space_lib.trial_job(
            base,
            spec.search,
            {"compress.prune.sparsity": 0.3, "compress.quantize": "off"},
            "t",
            "/t",
        )
    )
    assert off.compress.quantize is None


def test_param_space_and_searchers() -> None:
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical, Float, Integer

    spec = load_job(
        JOB,
        [
            _space(
                "{compress.prune.sparsity: {uniform: [0.2, 0.7]}, "
                "train.max_steps: {int: [4, 8]}, "
                "compress.quantize: {choice: {off: null, int8: "
                "{method: dynamic_int8}}}}"
            )
        ],
    )
    ps = space_lib.param_space(spec.search)
    assert isinstance(ps["compress.prune.sparsity"], Float)
    assert isinstance(ps["train.max_steps"], Integer)
    assert ps["train.max_steps"].upper == 9  # inclusive [4, 8]
    assert isinstance(ps["compress.quantize"], Categorical)
    assert ps["compress.quantize"].categories == ["off", "int8"]  # labels, not sections
    searcher = space_lib.searcher(spec.search)
    assert isinstance(searcher, OptunaSearch)
    assert searcher.metric == ["eval/accuracy", "compress/size_bytes"]
    single = SearchConfig.model_validate(
        {
            **spec.search.model_dump(mode="json"),
            "objectives": [{"metric": "eval/accuracy", "mode": "max"}],
        }
    )
    assert space_lib.searcher(single).metric == "eval/accuracy"
    import optuna

    for name, cls in (
        ("tpe", optuna.samplers.TPESampler),
        ("gp", optuna.samplers.GPSampler),
        ("nsga2", optuna.samplers.NSGAIISampler),
    ):
        chosen = SearchConfig.model_validate({**spec.search.model_dump(), "sampler": name})
        assert isinstance(space_lib.searcher(chosen)._sampler, cls)
    grid = load_job(
        JOB,
        [
            "search.algorithm=grid",
            "search.num_samples=null",
            _space("{compress.prune.sparsity: {grid: [0.2, 0.5]}}"),
        ],
    )
    assert grid.search.samples == 1
    assert space_lib.param_space(grid.search)["compress.prune.sparsity"] == {
        "grid_search": [0.2, 0.5]
    }


def test_the_searcher_starts_from_the_jobs_points() -> None:
    """``search.points``: each searcher is handed the job's recipes whole, Optuna's first trials
    are exactly them (labels as labels), and then it samples."""
    points = (
        "search.points=[{compress.prune.sparsity: 0.7, compress.quantize: int4}, "
        "{compress.prune.sparsity: 0.25, compress.quantize: off}]"
    )
    spec = load_job(JOB, [points, "search.num_samples=3"])
    start = space_lib.starting_points(spec.search, {})
    assert start == [
        {"compress.prune.sparsity": 0.7, "compress.quantize": "int4"},
        {"compress.prune.sparsity": 0.25, "compress.quantize": "off"},
    ]
    optuna = space_lib.searcher(spec.search, 1, start)
    optuna.set_search_properties(None, None, space_lib.param_space(spec.search))
    assert [optuna.suggest(f"t{i}") for i in range(2)] == start
    third = optuna.suggest("t2")
    assert 0.2 <= third["compress.prune.sparsity"] <= 0.7 and third not in start
    random = space_lib.searcher(spec.search.model_copy(update={"algorithm": "random"}), 1, start)
    assert random._points_to_evaluate == start
    # The trial job of a point is the one a sampled recipe makes.
    job = validate_job(
        space_lib.trial_job(
            spec.model_dump(mode="json"), spec.search, start[0], "t000", "/tmp/trials"
        )
    )
    assert job.compress.prune.sparsity == 0.7 and job.compress.quantize.bits == 4


def test_a_per_layer_point_gives_every_layer_its_value() -> None:
    """A per-layer key's one value in a point becomes every layer's dimension."""
    spec = load_job(
        JOB,
        [
            _space(
                "{compress.quantize: {choice: {w: {method: weight_only, granularity: group, "
                "group_size: 32}}}, compress.quantize.bits: {choice: [4, 8], per_layer: true}}"
            ),
            "search.points=[{compress.quantize: w, compress.quantize.bits: 8}]",
        ],
    )
    layers = {"compress.quantize.bits": ["a.query", "a.key"]}
    (point,) = space_lib.starting_points(spec.search, layers)
    assert point == {
        "compress.quantize": "w",
        "compress.quantize.bits:a.query": 8,
        "compress.quantize.bits:a.key": 8,
    }


def test_a_point_that_makes_an_invalid_trial_job_is_named() -> None:
    """Values inside their domains can still combine into an invalid trial job: the load-time
    check validates each point's job (here with a validator that refuses 0.5 sparsity)."""
    from orchestrator.config.space_check import search_problems
    from orchestrator.errors import Problem

    spec = load_job(
        JOB, ["search.points=[{compress.prune.sparsity: 0.5, compress.quantize: int8}]"]
    )

    def refuse_half(raw: dict) -> list[Problem]:
        prune = (raw.get("compress") or {}).get("prune") or {}
        if prune.get("sparsity") == 0.5:
            return [Problem("compress.prune.sparsity", 0.5, "refused here", "-")]
        return []

    base = spec.model_dump(mode="json", exclude={"search"})
    (problem,) = search_problems(base, spec.search, refuse_half)
    assert problem.key == "search.points.0"
    assert "makes an invalid trial job: compress.prune.sparsity = 0.5" in problem.message


def test_trial_counts_and_generator_concurrency() -> None:
    grid = load_job(
        JOB,
        [
            "search.algorithm=grid",
            "search.num_samples=2",
            _space(
                "{compress.prune.sparsity: {grid: [0.2, 0.5, 0.7]}, "
                "compress.quantize: {choice: {off: null, int8: {method: dynamic_int8}}}}"
            ),
        ],
    ).search
    assert space_lib.num_trials(grid) == 2 * 3 * 2
    assert space_lib.num_trials(load_job(JOB).search) == 2
    # Tune ignores TuneConfig.max_concurrent_trials for its own generator: it must carry it.
    assert space_lib.searcher(grid, max_concurrent=3).max_concurrent == 3


def test_concurrency_fits_whole_trials() -> None:
    search = load_job(JOB).search
    assert space_lib.concurrency(search, {"CPU": 2}, need_cpu=2, need_gpu=0) == 1
    assert space_lib.concurrency(search, {"CPU": 16}, need_cpu=2, need_gpu=0) == 8
    assert space_lib.concurrency(search, {"CPU": 16, "GPU": 2}, need_cpu=2, need_gpu=1) == 2
    capped = search.model_copy(update={"max_concurrent_trials": 3})
    assert space_lib.concurrency(capped, {"CPU": 64}, need_cpu=2, need_gpu=0) == 3


def test_trial_names_come_from_the_config() -> None:
    name = space_lib.trial_name(
        3, {"compress.prune.sparsity": 0.41182, "compress.quantize": "int8"}
    )
    assert name == "t003_sparsity0.412_quantize-int8"
    long = space_lib.trial_name(12, {f"a.key{i}": "value" * 5 for i in range(10)})
    assert len(long) <= 100
    validate_job({**load_job(JOB).model_dump(mode="json"), "search": None, "name": long})


def test_asha_uses_our_step_counter() -> None:
    """After a restore Tune's own iteration counter starts again at 1: ASHA reads train/step."""
    from ray.tune.schedulers import ASHAScheduler

    search = load_job(
        JOB,
        [
            "search.objectives=[{metric: eval/accuracy, mode: max}]",
            "search.scheduler=asha",
            "train.eval_every=2",
        ],
    ).search
    sched = space_lib.scheduler(search, total_steps=12, eval_every=2)
    assert isinstance(sched, ASHAScheduler)
    assert sched._time_attr == "train/step" and sched._max_t == 12
    assert space_lib.required_metrics(search) == ["eval/accuracy", "train/step"]


@pytest.mark.parametrize("command", ["report", "export"])
def test_run_dir_commands_refuse_a_missing_folder(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from orchestrator.cli import main

    missing = tmp_path / "no-such-run"
    argv = [command, str(missing)] + (
        ["--best", "--out", str(tmp_path / "out")] * (command == "export")
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "RUN_DIR" in err and str(missing) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_search_without_a_search_section_is_refused(capsys: pytest.CaptureFixture) -> None:
    from orchestrator.cli import main

    assert main(["search", "jobs/debug/ddp.yaml"]) == 2
    assert "search" in capsys.readouterr().err


class _Trial:
    """What the trial namer reads of a Tune trial."""

    def __init__(self, trial_id: str, config: dict) -> None:
        self.trial_id, self.config = trial_id, config


def test_trial_ordinals_go_past_999(tmp_path: Path) -> None:
    import json

    from orchestrator.search.names import TrialNamer
    from orchestrator.search.records import NAMES
    from orchestrator.storage import RunFolder

    search = load_job(JOB).search
    folder = RunFolder(str(tmp_path))
    (tmp_path / "trials").mkdir()
    taken = {f"id{i}": f"t{i:03d}_sparsity0.3" for i in range(998, 1001)}
    (tmp_path / NAMES).write_text(json.dumps(taken))
    namer = TrialNamer(folder, search)
    config = {"compress.prune.sparsity": 0.25, "compress.quantize": "int8"}
    first, second = namer(_Trial("new1", config)), namer(_Trial("new2", config))
    assert first.startswith("t1001_") and second.startswith("t1002_")
    assert namer(_Trial("id999", config)) == "t999_sparsity0.3"  # a known trial keeps its name


def test_resume_refuses_records_this_tool_did_not_write(tmp_path: Path) -> None:
    import json

    from orchestrator.search.records import check_records
    from orchestrator.storage import RunFolder

    folder = RunFolder(str(tmp_path))
    trial = tmp_path / "trials" / "t001_x"
    trial.mkdir(parents=True)
    good = {"trial": "t001_x", "status": "done", "artifact": "model"}
    (trial / "trial.json").write_text(json.dumps(good))
    (tmp_path / "trials" / "names.json").write_text(json.dumps({"abc": "t001_x"}))
    check_records(folder)  # as written by the tool

    for bad in ({**good, "artifact": "../../x"}, {**good, "trial": "t002_y"}, [1, 2]):
        (trial / "trial.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError) as e:
            check_records(folder)
        assert str(trial / "trial.json") in str(e.value)
    (trial / "trial.json").write_text(json.dumps(good))
    (tmp_path / "trials" / "names.json").write_text(json.dumps({"abc": "../evil"}))
    with pytest.raises(ConfigError, match="not a mapping of trial ids to trial names"):
        check_records(folder)
