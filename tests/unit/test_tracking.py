"""``tracking.mlflow``: the config section, the check before a search, the search run taken up
again by --resume, and a tracker that fails mid-search warning instead of stopping it. The whole
search against a real MLflow server is in tests/integration/test_search_ray.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchestrator.config import load_job
from orchestrator.config.search import baseline_base, trial_base
from orchestrator.errors import ConfigError
from orchestrator.results.report import ReportSummary
from orchestrator.search import tracking
from orchestrator.storage import RunFolder
from orchestrator.testing.distributed import free_port

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs/debug/search.yaml"


def _spec(uri: str, *extra: str):
    return load_job(JOB, [f"tracking.mlflow.tracking_uri={uri}", *extra])


def test_section_defaults_and_trials_leave_it_out() -> None:
    spec = _spec("http://127.0.0.1:5000")
    assert spec.tracking.mlflow.log_model is True
    assert tracking.experiment_name(spec) == spec.name
    assert tracking.experiment_name(_spec("x", "tracking.mlflow.experiment=e1")) == "e1"
    job = spec.model_dump(mode="json")
    assert "tracking" not in trial_base(job, spec.search, "/m")
    assert "tracking" not in baseline_base(job, spec.search)


def test_unreachable_server_names_the_key(capsys: pytest.CaptureFixture) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError) as e:
        tracking.check(_spec(uri))
    text = str(e.value)
    assert f"tracking.mlflow.tracking_uri = '{uri}'" in text
    assert "cannot be reached" in text and "mlflow server" in text
    assert e.value.exit_code == 2


def test_missing_package_names_the_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import fails as if absent
    with pytest.raises(ConfigError) as e:
        tracking.check(_spec("http://127.0.0.1:5000"))
    assert "tracking.mlflow = " in str(e.value) and "pip install -e '.[mlflow]'" in str(e.value)


def test_job_as_params_has_dotted_keys_and_json_leaves() -> None:
    flat = tracking._flatten({"a": {"b": 1, "c": [1, 2], "d": {}}, "e": "x", "f": None})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "a.d": "{}", "e": "x", "f": "null"}


def test_resume_takes_up_the_search_run_and_kills_stale_children(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real MLflow store (sqlite, no server): the second start is a resumed driver."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # without a server, artifacts go to ./mlruns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _spec(uri)
    tracking.check(spec)
    folder = RunFolder(str(tmp_path / "run"))
    first = tracking.Tracker(spec, folder)
    run_id = first.start()
    client = MlflowClient(uri)
    child = client.create_run(
        client.get_run(run_id).info.experiment_id, tags={"mlflow.parentRunId": run_id}
    )
    again = tracking.Tracker(spec, folder)
    assert again.start() == run_id
    assert client.get_run(child.info.run_id).info.status == "KILLED"
    assert client.get_run(run_id).data.params["name"] == spec.name
    assert f"search run {run_id} in {uri}" in capsys.readouterr().out


def test_a_tracker_that_fails_mid_search_warns_and_the_search_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the search's 3 take ~15 s
    tracker = tracking.Tracker(
        _spec(f"http://127.0.0.1:{free_port()}"), RunFolder(str(tmp_path / "run"))
    )
    tracker.run_id = "0" * 32  # as if the server had gone away after the search run started
    summary = ReportSummary(counts={"done": 1}, n_pareto=1, best=None, notes=[], paths=[])
    tracker.finish(summary)  # no exception
    out = capsys.readouterr().out
    assert "MLflow logging stopped (at the end of the search" in out
    assert "the search goes on" in out and tracker.failed
