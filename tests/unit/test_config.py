"""The job spec: every bad job fails with its dotted key, value and fix (all problems at once),
overrides, the resolved-YAML round trip, and ``orchestrator validate``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from orchestrator.cli import main
from orchestrator.config import (
    JobSpec,
    apply_overrides,
    dump_job,
    load_job,
    parse_override,
    read_yaml,
    validate_job,
)
from orchestrator.errors import MISSING, ConfigError

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {
    "name": "unit-job",
    "model": {"name": "tiny-bert"},
    "data": {"name": "mr", "limit": 100, "max_length": 32},
    "train": {"strategy": "ddp", "batch_size": 8, "lr": 1.0e-3, "max_steps": 4},
    "resources": {"cpus_per_worker": 1},
    "output": {"dir": "runs/unit"},
}

_DELETE = object()


def _job(changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``BASE`` with dotted keys set (or deleted with ``_DELETE``). Written here,
    independently of ``apply_overrides``, so the table does not lean on the code it tests."""
    out = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        if value is _DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return out


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _keys(err: ConfigError) -> list[str]:
    return [p.key for p in err.problems]


# (id, changes to BASE, dotted key expected among the problems, bad value shown or None,
#  extra text expected in the message or None)
BAD_JOBS = [
    ("unknown-top-level-key", {"bogus": 1}, "bogus", 1, "keys allowed under the job"),
    ("unknown-train-key", {"train.lrr": 0.1}, "train.lrr", 0.1, "did you mean train.lr"),
    (
        "unknown-data-key",
        {"data.max_lenght": 32},
        "data.max_lenght",
        32,
        "did you mean data.max_length",
    ),
    ("unknown-output-key", {"output.dirr": "x"}, "output.dirr", "x", "did you mean output.dir"),
    ("output-uri-scheme", {"output.dir": "ftp://h/r"}, "output.dir", "ftp://h/r", "s3://bucket"),
    ("output-uri-relative", {"output.dir": "file://r"}, "output.dir", "file://r", "three slashes"),
    (
        "model-path-uri-scheme",
        {"model.name": _DELETE, "model.path": "ftp://h/m"},
        "model.path",
        "ftp://h/m",
        "not a usable storage URI",
    ),
    ("lr-not-a-number", {"train.lr": "abc"}, "train.lr", "abc", "valid number"),
    ("lr-zero", {"train.lr": 0}, "train.lr", 0, "greater than 0"),
    ("lr-too-big", {"train.lr": 100}, "train.lr", 100, "less than or equal to 10"),
    (
        "zero-stage-out-of-range",
        {"train.strategy": "deepspeed", "train.zero_stage": 5},
        "train.zero_stage",
        5,
        "less than or equal to 3",
    ),
    (
        "zero-stage-with-ddp",
        {"train.zero_stage": 2},
        "train.zero_stage",
        2,
        "train.strategy=deepspeed",
    ),
    (
        "offload-without-stage-2",
        {"train.strategy": "deepspeed", "train.zero_stage": 1, "train.offload_optimizer": True},
        "train.offload_optimizer",
        True,
        "zero_stage 2 or 3",
    ),
    (
        "offload-with-ddp",
        {"train.offload_optimizer": True},
        "train.offload_optimizer",
        True,
        "train.strategy=deepspeed",
    ),
    ("fp16-without-gpu", {"train.precision": "fp16"}, "train.precision", "fp16", "needs a GPU"),
    ("unknown-precision", {"train.precision": "fp8"}, "train.precision", "fp8", "fp32"),
    ("unknown-strategy", {"train.strategy": "fsdp"}, "train.strategy", "fsdp", "ddp"),
    ("batch-size-zero", {"train.batch_size": 0}, "train.batch_size", 0, None),
    ("batch-size-fraction", {"train.batch_size": 2.5}, "train.batch_size", 2.5, "integer"),
    ("epochs-zero", {"train.epochs": 0}, "train.epochs", 0, None),
    ("max-failures-below-minus-one", {"train.max_failures": -2}, "train.max_failures", -2, None),
    ("max-failures-fraction", {"train.max_failures": 1.5}, "train.max_failures", 1.5, "integer"),
    (
        "max-start-failures-below-minus-one",
        {"train.max_start_failures": -2},
        "train.max_start_failures",
        -2,
        None,
    ),
    ("start-timeout-zero", {"train.start_timeout_s": 0}, "train.start_timeout_s", 0, None),
    ("train-section-is-a-value", {"train": "abc"}, "train", "abc", "dictionary"),
    ("max-length-too-small", {"data.max_length": 4}, "data.max_length", 4, None),
    ("test-fraction-half", {"data.test_fraction": 0.5}, "data.test_fraction", 0.5, None),
    ("test-fraction-zero", {"data.test_fraction": 0.0}, "data.test_fraction", 0.0, None),
    ("val-fraction-negative", {"data.val_fraction": -0.1}, "data.val_fraction", -0.1, None),
    ("limit-too-small", {"data.limit": 5}, "data.limit", 5, None),
    ("unknown-corpus", {"data.name": "imdb"}, "data.name", "imdb", "not a packaged corpus"),
    (
        "unknown-data-format",
        {"data.name": _DELETE, "data.path": "x.xlsx", "data.format": "xlsx"},
        "data.format",
        "xlsx",
        None,
    ),
    ("data-name-and-path", {"data.path": "train.csv"}, "data.name", "mr", "exactly one"),
    ("data-neither-name-nor-path", {"data.name": _DELETE}, "data.name", None, "exactly one"),
    (
        "unknown-model-short-name",
        {"model.name": "resnet"},
        "model.name",
        "resnet",
        "not a known short name",
    ),
    (
        "model-hub-id",
        {"model.name": "bert-base-uncased/x"},
        "model.name",
        "bert-base-uncased/x",
        "never downloads",
    ),
    (
        "model-name-and-path",
        {"model.path": "/models/bert"},
        "model.name",
        "tiny-bert",
        "exactly one",
    ),
    ("model-neither-name-nor-path", {"model.name": _DELETE}, "model.name", None, "exactly one"),
    ("model-num-layers-zero", {"model.num_layers": 0}, "model.num_layers", 0, None),
    ("missing-model", {"model": _DELETE}, "model", None, "is required"),
    ("missing-data", {"data": _DELETE}, "data", None, "is required"),
    ("missing-name", {"name": _DELETE}, "name", None, "is required"),
    ("name-with-slash", {"name": "runs/evil"}, "name", "runs/evil", "names a folder"),
    ("name-leading-dot", {"name": "..x"}, "name", "..x", "names a folder"),
    ("name-empty", {"name": ""}, "name", None, "names a folder"),
    (
        "cpus-per-worker-zero",
        {"resources.cpus_per_worker": 0},
        "resources.cpus_per_worker",
        0,
        "greater than 0",
    ),
    (
        "gpus-per-worker-negative",
        {"resources.gpus_per_worker": -1},
        "resources.gpus_per_worker",
        -1,
        None,
    ),
    ("num-cpus-zero", {"resources.num_cpus": 0}, "resources.num_cpus", 0, None),
    # The compress sub-sections: one config class per method (a discriminated union).
    (
        "unknown-prune-method",
        {"compress.prune": {"method": "lottery"}},
        "compress.prune.method",
        "lottery",
        "use one of magnitude, wanda, sparsegpt, structured",
    ),
    (
        "key-of-another-method",
        {"compress.prune": {"method": "structured", "scope": "global"}},
        "compress.prune.scope",
        "global",
        "is not a key of compress.prune with method=structured",
    ),
    (
        "bits-with-int8-kernels",
        {"compress.quantize": {"method": "dynamic_int8", "bits": 4}},
        "compress.quantize.bits",
        4,
        "use a method that takes it (fake, weight_only, gptq)",
    ),
    (
        "typo-in-a-method-section",
        {"compress.factorize": {"method": "asvd", "rank_ratio": 0.5, "rnak": 4}},
        "compress.factorize.rnak",
        4,
        "did you mean compress.factorize.rank",
    ),
    (
        "out-of-range-in-a-method-section",
        {"compress.prune": {"method": "structured", "sparsity": 1.5}},
        "compress.prune.sparsity",
        1.5,
        "less than 1",
    ),
    (
        "cross-field-in-a-method-section",
        {"compress.factorize": {"method": "svd", "rank": 4, "energy": 0.9}},
        "compress.factorize.energy",
        0.9,
        "exactly one of",
    ),
]


def test_base_job_is_valid() -> None:
    spec = validate_job(copy.deepcopy(BASE))
    assert spec.name == "unit-job"
    assert spec.train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("changes", "key", "value", "text"),
    [case[1:] for case in BAD_JOBS],
    ids=[case[0] for case in BAD_JOBS],
)
def test_bad_job_names_key_and_value(changes, key, value, text) -> None:
    with pytest.raises(ConfigError) as info:
        validate_job(_job(changes))
    err = info.value
    assert key in _keys(err), str(err)
    message = str(err)
    problem = next(p for p in err.problems if p.key == key)
    if value is not None:
        assert str(value) in message
        assert problem.value == value
    if text is not None:
        assert text in message
    assert key in message


def test_hub_id_points_at_model_path() -> None:
    with pytest.raises(ConfigError) as info:
        validate_job(_job({"model.name": "bert-base-uncased/x"}))
    (problem,) = info.value.problems
    assert "never downloads" in problem.message
    assert "model.path" in problem.fix


def test_missing_section_is_shown_as_missing() -> None:
    with pytest.raises(ConfigError) as info:
        validate_job(_job({"model": _DELETE}))
    (problem,) = info.value.problems
    assert problem.value is MISSING
    assert "model = <missing>" in str(info.value)


# Failures before validation: job files and override strings. Each entry builds the call in a
# tmp folder and returns (path, overrides).
def _good_file(tmp: Path) -> Path:
    return _write(tmp / "job.yaml", BASE)


def _text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


_BROKEN_YAML = "name: x\nmodel: {name: tiny-bert\ndata:\n  - [\n"


BAD_SOURCES = [
    (
        "override-value-as-section",
        lambda t: (_good_file(t), ["train.lr.x=1"]),
        "train.lr",
        0.001,
        "is a value, not a section",
    ),
    (
        "override-without-equals",
        lambda t: (_good_file(t), ["train.lr"]),
        "train.lr",
        None,
        "dotted.key=value",
    ),
    (
        "override-empty-key-part",
        lambda t: (_good_file(t), ["train..lr=1"]),
        "train..lr=1",
        None,
        "dotted.key=value",
    ),
    (
        "override-out-of-range",
        lambda t: (_good_file(t), ["train.zero_stage=5"]),
        "train.zero_stage",
        5,
        None,
    ),
    (
        "override-unknown-key",
        lambda t: (_good_file(t), ["train.lrr=1e-4"]),
        "train.lrr",
        None,
        "did you mean train.lr",
    ),
    (
        "yaml-syntax-error",
        lambda t: (_text(t / "bad.yaml", _BROKEN_YAML), None),
        "<job file>",
        "bad.yaml",
        "not valid YAML at line",
    ),
    (
        "yaml-top-level-list",
        lambda t: (_write(t / "list.yaml", [BASE]), None),
        "<job file>",
        None,
        "mapping",
    ),
    (
        "missing-job-file",
        lambda t: (t / "nope.yaml", None),
        "<job file>",
        "nope.yaml",
        "no such file",
    ),
]


@pytest.mark.parametrize(
    ("make", "key", "value", "text"),
    [case[1:] for case in BAD_SOURCES],
    ids=[case[0] for case in BAD_SOURCES],
)
def test_bad_file_or_override_names_key(tmp_path, make, key, value, text) -> None:
    path, overrides = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_job(path, overrides)
    err = info.value
    assert key in _keys(err), str(err)
    if value is not None:
        assert str(value) in str(err)
    if text is not None:
        assert text in str(err)


def test_parse_override_without_equals_raises() -> None:
    with pytest.raises(ConfigError) as info:
        parse_override("train.lr")
    assert _keys(info.value) == ["train.lr"]
    assert info.value.source == "overrides"


def test_apply_overrides_value_as_section_raises() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(copy.deepcopy(BASE), {"train.lr.x": 1})
    assert _keys(info.value) == ["train.lr"]
    assert info.value.source == "overrides"
    assert "train.lr.x" in str(info.value)


def test_empty_job_file_reports_every_required_section(tmp_path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert read_yaml(path) == {}
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert set(_keys(info.value)) == {"name", "model", "data"}


def test_all_problems_reported_at_once() -> None:
    raw = _job(
        {
            "name": "a/b",
            "model.name": "nope",
            "data.max_length": 4,
            "train.lr": "abc",
            "train.bogus": 1,
            "resources.cpus_per_worker": 0,
        }
    )
    with pytest.raises(ConfigError) as info:
        validate_job(raw)
    keys = _keys(info.value)
    expected = {
        "name",
        "model.name",
        "data.max_length",
        "train.lr",
        "train.bogus",
        "resources.cpus_per_worker",
    }
    assert expected <= set(keys), keys
    assert f"{len(keys)} problems" in str(info.value)


def test_field_and_cross_field_problems_reported_together() -> None:
    # A cross-field check (zero_stage with ddp) and a plain range check in another section.
    with pytest.raises(ConfigError) as info:
        validate_job(_job({"train.zero_stage": 2, "data.limit": 5, "resources.num_cpus": 0}))
    assert {"train.zero_stage", "data.limit", "resources.num_cpus"} <= set(_keys(info.value))


# --- overrides -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.num_workers=4", ("train.num_workers", 4)),
        ("train.lr=1.0e-4", ("train.lr", 1e-4)),
        ("train.lr=0.5", ("train.lr", 0.5)),
        ("train.lr=1e-4", ("train.lr", 1e-4)),
        ("train.offload_optimizer=true", ("train.offload_optimizer", True)),
        ("train.offload_optimizer=false", ("train.offload_optimizer", False)),
        ("model.name=tiny-gpt2", ("model.name", "tiny-gpt2")),
        ("search.values=[1, 2, 3]", ("search.values", [1, 2, 3])),
        ("data.path=", ("data.path", "")),
        ("data.path=a=b", ("data.path", "a=b")),
        (" train.lr = 0.25", ("train.lr", 0.25)),
    ],
)
def test_parse_override_types(text, expected) -> None:
    key, value = parse_override(text)
    assert (key, value) == expected
    assert type(value) is type(expected[1])


def test_override_creates_nested_keys_and_copies() -> None:
    raw = {"train": {"lr": 1}}
    out = apply_overrides(raw, {"a.b.c": 1, "train.epochs": 2})
    assert out == {"train": {"lr": 1, "epochs": 2}, "a": {"b": {"c": 1}}}
    assert raw == {"train": {"lr": 1}}  # the input is not modified


def test_override_creates_missing_section(tmp_path) -> None:
    raw = _job({"resources": _DELETE})
    path = _write(tmp_path / "job.yaml", raw)
    spec = load_job(path, ["resources.cpus_per_worker=2"])
    assert spec.resources.cpus_per_worker == 2


def test_override_beats_yaml(tmp_path) -> None:
    path = _write(tmp_path / "job.yaml", BASE)
    assert load_job(path).train.lr == pytest.approx(1e-3)
    spec = load_job(path, ["train.lr=1e-4", "train.batch_size=4"])
    assert spec.train.lr == pytest.approx(1e-4)
    assert isinstance(spec.train.lr, float)
    assert spec.train.batch_size == 4
    # The dict form is the same override syntax, already parsed.
    assert load_job(path, {"train.lr": 2e-4}).train.lr == pytest.approx(2e-4)
    # Later overrides of the same key win.
    assert load_job(path, ["train.lr=0.1", "train.lr=0.2"]).train.lr == pytest.approx(0.2)


# --- the resolved job ------------------------------------------------------------------------


def test_dump_job_round_trip() -> None:
    spec = validate_job(
        _job({"train.strategy": "deepspeed", "train.zero_stage": 3, "train.precision": "bf16"})
    )
    text = dump_job(spec)
    resolved = yaml.safe_load(text)
    # Every default is written out.
    assert resolved["train"]["warmup_ratio"] == pytest.approx(0.1)
    assert resolved["data"]["seed"] == 0
    assert resolved["model"]["path"] is None
    again = validate_job(resolved)
    assert again == spec
    assert dump_job(again) == text


def test_job_spec_is_frozen() -> None:
    spec = validate_job(copy.deepcopy(BASE))
    with pytest.raises(ValidationError):
        spec.train.lr = 1.0
    with pytest.raises(ValidationError):
        spec.name = "other"
    assert isinstance(spec, JobSpec)


# --- orchestrator validate -------------------------------------------------------------------


def test_cli_validate_bad_override(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "job.yaml", BASE)
    assert main(["validate", str(path), "train.zero_stage=5"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "train.zero_stage" in err
    assert "5" in err


def test_cli_validate_good_job_prints_resolved_yaml(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "job.yaml", BASE)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["validate", "job.yaml", "train.lr=0.01"]) == 0
    out, err = capsys.readouterr()
    resolved = yaml.safe_load(out)
    assert resolved["train"]["lr"] == pytest.approx(0.01)
    assert validate_job(resolved) == load_job(path, ["train.lr=0.01"])
    # validate writes nothing: no runs/ folder, no cache, no resolved copy.
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "runs").exists()


def test_cli_validate_missing_file(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "does-not-exist.yaml"]) == 2
    _, err = capsys.readouterr()
    assert "no such file" in err
    assert "does-not-exist.yaml" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_validate_reports_every_problem(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "job.yaml", _job({"train.lrr": 1, "data.limit": 5}))
    assert main(["validate", str(path), "name=a/b"]) == 2
    _, err = capsys.readouterr()
    for key in ("train.lrr", "data.limit", "name"):
        assert key in err
    assert "did you mean train.lr" in err


def test_cli_malformed_override_and_usage(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "job.yaml", BASE)
    assert main(["validate", str(path), "train.lr"]) == 2
    assert "dotted.key=value" in capsys.readouterr().err
    assert main(["validate"]) == 2  # argparse usage error
    assert main(["frobnicate", str(path)]) == 2


def test_unstructured_pruning_refused_on_zero3() -> None:
    from orchestrator.config import validate_job

    job = {
        "name": "x",
        "model": {"name": "tiny-bert"},
        "data": {"name": "mr"},
        "train": {"strategy": "deepspeed", "zero_stage": 3},
        "compress": {"prune": {"method": "wanda", "sparsity": 0.5}},
    }
    with pytest.raises(ConfigError) as err:
        validate_job(job)
    assert [p.key for p in err.value.problems] == ["compress.prune.method"]
    assert "zero_stage=2" in str(err.value)
    job["compress"]["prune"]["method"] = "structured"  # shapes change before ZeRO-3 partitions
    validate_job(job)


def test_a_section_without_method_takes_the_stage_default() -> None:
    from orchestrator.config.compress import FakeQuantConfig, MagnitudePruneConfig, SvdConfig

    spec = validate_job(
        _job(
            {
                "compress.prune": {"sparsity": 0.3},
                "compress.factorize": {"rank": 4},
                "compress.quantize": {"bits": 4},
            }
        )
    )
    assert [type(t) for t in spec.compress.techniques()] == [
        MagnitudePruneConfig,
        SvdConfig,
        FakeQuantConfig,
    ]
    assert [t.stage for t in spec.compress.techniques()] == ["prune", "factorize", "quantize"]
    assert validate_job(yaml.safe_load(dump_job(spec))) == spec  # the method is written out


@pytest.mark.parametrize(
    ("override", "gone", "kept"),
    [
        ("data.path=/data/reviews.csv", "data.name", ("data.path", "/data/reviews.csv")),
        ("model.path=/models/bert", "model.name", ("model.path", "/models/bert")),
        ("compress.factorize.rank=8", "compress.factorize.rank_ratio", None),
    ],
)
def test_override_of_one_exclusive_key_replaces_the_other(
    tmp_path: Path, override: str, gone: str, kept: tuple | None
) -> None:
    """A job file naming a packaged corpus (or model, or rank rule), and the command line
    giving the other key of the pair: the command line wins, no "exactly one of" error."""
    job = _job({"compress.factorize": {"method": "svd", "rank_ratio": 0.25}})
    path = _write(tmp_path / "job.yaml", job)
    spec = load_job(path, [override])
    section, key = gone.rsplit(".", 1)
    node = spec
    for part in section.split("."):
        node = getattr(node, part)
    assert getattr(node, key) is None
    if kept is not None:
        section, key = kept[0].split(".")
        assert spec.model_dump()[section][key] == kept[1]
    assert spec.compress.factorize.rank == (8 if "rank=8" in override else None)
    # Both given on the command line: still the error naming them.
    with pytest.raises(ConfigError, match="exactly one"):
        load_job(path, ["data.path=/data/reviews.csv", "data.name=mr"])
