"""Driver-side checks of `orchestrator train` that run before Ray starts: nothing is written
and no worker is scheduled for a job that cannot run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator import launch
from orchestrator.config import validate_job
from orchestrator.errors import ConfigError

pytestmark = pytest.mark.unit


def _spec(tmp_path: Path, **train) -> object:
    return validate_job(
        {
            "name": "t",
            "model": {"name": "tiny-bert"},
            "data": {"name": "mr", "limit": 60, "max_length": 16, "cache_dir": str(tmp_path / "c")},
            "train": {"num_workers": 2, **train},
            "output": {"dir": str(tmp_path / "runs")},
        }
    )


def test_batch_larger_than_the_data_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        launch.preflight(_spec(tmp_path, batch_size=32))
    assert err.value.problems[0].key == "train.batch_size"
    assert not (tmp_path / "runs").exists()


def test_compress_pattern_checked_on_the_driver(tmp_path) -> None:
    spec = validate_job(
        {
            **_spec(tmp_path).model_dump(mode="json"),
            "compress": {"prune": {"include": ["*no_such*"]}},
        }
    )
    with pytest.raises(ConfigError) as err:
        launch.preflight(spec)
    assert err.value.problems[0].key == "compress.prune.include"


def test_run_dir_claims(tmp_path) -> None:
    spec = launch.resolve_paths(_spec(tmp_path, batch_size=4))
    assert launch.claim_run_dir(spec) is False  # new run
    assert launch.claim_run_dir(spec) is True  # the same job again: resume
    other = launch.resolve_paths(_spec(tmp_path, batch_size=8))
    with pytest.raises(ConfigError, match="different job"):
        launch.claim_run_dir(other)


def test_paths_resolved_for_workers(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = launch.resolve_paths(
        validate_job(
            {
                "name": "t",
                "model": {"name": "tiny-bert"},
                "data": {"path": "d.csv"},
                "output": {"dir": "runs"},
            }
        )
    )
    assert spec.data.path == str(tmp_path / "d.csv")
    assert spec.output.dir == str(tmp_path / "runs")
    uri = f"file://{tmp_path}/store"
    in_storage = spec.model_copy(update={"output": spec.output.model_copy(update={"dir": uri})})
    assert launch.resolve_paths(in_storage).output.dir == uri


def test_run_dir_claims_in_storage(tmp_path, monkeypatch) -> None:
    """With output.dir a storage URI the job is claimed there; the check of an earlier run reads
    storage, not this machine's mirror (a different machine, or an emptied cache)."""
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path}/store"
    spec = launch.resolve_paths(_spec(tmp_path, batch_size=4))
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"dir": uri})})
    assert launch.claim_run_dir(spec) is False
    assert (tmp_path / "store" / spec.name / "job.yaml").is_file()
    import shutil

    shutil.rmtree(tmp_path / "cache")
    assert launch.claim_run_dir(spec) is True
    other = spec.model_copy(update={"train": spec.train.model_copy(update={"batch_size": 8})})
    with pytest.raises(ConfigError, match="different job"):
        launch.claim_run_dir(other)
    launch.check_output_dir(spec, 1)
    (tmp_path / "file").write_text("x")
    bad = spec.model_copy(
        update={"output": spec.output.model_copy(update={"dir": f"file://{tmp_path}/file"})}
    )
    with pytest.raises(ConfigError, match="is a file"):
        launch.check_output_dir(bad, 1)


def test_unreachable_address_fails_fast_naming_it() -> None:
    """Ray itself retries an address where nothing answers for minutes; the probe says so at
    once, naming where the address came from."""
    from orchestrator.testing.distributed import free_port

    # The probe connect_ray runs before ray.init (connect_ray itself returns at once in a
    # process already connected, as this one is after the integration tier).
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=r"RAY_ADDRESS = '127\.0\.0\.1:\d+': nothing answers"):
        launch._check_reachable("RAY_ADDRESS", address)
    with pytest.raises(ConfigError, match=r"--address = 'head-node': is not a Ray address"):
        launch._check_reachable("--address", "head-node")


def test_a_full_disk_is_named(tmp_path) -> None:
    error = RuntimeError("Training failed ... OSError: [Errno 28] No space left on device: 'x'")
    named = launch.full_disk(error, tmp_path / "run")
    assert named is not None and str(tmp_path / "run") in str(named)
    assert launch.full_disk(RuntimeError("worker died"), tmp_path) is None


def test_driver_disk_errors_exit_1_naming_the_file(tmp_path, monkeypatch, capsys) -> None:
    import errno

    from orchestrator import cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "results.parquet"))

    monkeypatch.setattr(launch, "train", full)
    job = Path(__file__).resolve().parents[2] / "jobs/debug/ddp.yaml"
    assert cli.main(["train", str(job), f"output.dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'results.parquet'}: No space left on device" in err


def test_trainer_polls_its_workers_often_unless_told(tmp_path, monkeypatch) -> None:
    """Ray Train's controller polls every 2 s by default (a finished run is seen up to 2 s
    late); build_trainer sets 0.5 s for the controller Ray starts, and a user's value wins."""
    spec = launch.resolve_paths(_spec(tmp_path, batch_size=4))
    monkeypatch.delenv(launch.HEALTH_CHECK_ENV, raising=False)
    launch.build_trainer(spec, launch.run_dir(spec))
    assert os.environ[launch.HEALTH_CHECK_ENV] == launch.HEALTH_CHECK_S == "0.5"
    monkeypatch.setenv(launch.HEALTH_CHECK_ENV, "3")
    launch.build_trainer(spec, launch.run_dir(spec))
    assert os.environ[launch.HEALTH_CHECK_ENV] == "3"


def test_embedded_ray_runs_no_preemption_watcher_unless_told(monkeypatch) -> None:
    """A local instance has no cloud to take its node back: Ray Train's preemption watcher
    (a process per Train run) is off there, unless the user set it."""
    monkeypatch.delenv(launch.PREEMPTION_WATCHER_ENV, raising=False)
    launch.embedded_defaults()
    assert os.environ[launch.PREEMPTION_WATCHER_ENV] == "0"
    monkeypatch.setenv(launch.PREEMPTION_WATCHER_ENV, "1")
    launch.embedded_defaults()
    assert os.environ[launch.PREEMPTION_WATCHER_ENV] == "1"


def test_a_run_that_cannot_get_its_workers_says_why() -> None:
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    from orchestrator.config import load_job

    root = Path(__file__).resolve().parents[2]
    spec = load_job(
        root / "jobs/debug/ddp.yaml", ["train.num_workers=4", "train.max_start_failures=2"]
    )
    error = ControllerError(WorkerGroupStartupTimeoutError(num_workers=4))
    text = launch.train_failure(error, spec)
    assert "4 workers x 1 CPU / 0 GPU" in text and "3 times (train.max_start_failures=2)" in text
    assert "Fix:" in text
    assert launch.train_failure(RuntimeError("boom"), spec) == "boom"


def test_failure_budgets_reach_ray_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.config import load_job
    from orchestrator.storage import RunFolder

    root = Path(__file__).resolve().parents[2]
    spec = load_job(
        root / "jobs/debug/ddp.yaml",
        ["train.max_failures=3", "train.max_start_failures=1", "train.start_timeout_s=7.5"],
    )
    monkeypatch.delenv(launch.START_TIMEOUT_ENV, raising=False)
    failure = launch.build_trainer(spec, RunFolder(str(tmp_path))).run_config.failure_config
    assert (failure.max_failures, failure.controller_failure_limit) == (3, 1)
    assert failure.max_preemption_failures == -1  # preemptions: Ray's own unlimited budget
    # Ray Train reads its start timeout from the variable, passed on to its controller.
    assert os.environ[launch.START_TIMEOUT_ENV] == "7.5"
