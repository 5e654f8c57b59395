"""The search driver's callback at scale: records kept in memory and written once per event,
the report rebuilt on a schedule bounded by its own cost, and a report that stays light at
thousands of trials (pages of trial rows, error bars for the front only)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from orchestrator.config.loader import dump_job, load_job
from orchestrator.results import html as html_lib
from orchestrator.results import report as report_lib
from orchestrator.search import callbacks
from orchestrator.search.callbacks import ReportSchedule, record_trials
from orchestrator.storage import RunFolder

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


class FakeTrial:
    """What the callback reads of a Tune trial."""

    def __init__(self, name: str, sparsity: float) -> None:
        self.name = name
        self.config = {"compress.prune.sparsity": sparsity, "compress.quantize": "int8"}
        self.last_result: dict[str, Any] = {}
        self.error_file = None

    def __str__(self) -> str:
        return self.name


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _metrics(rng: random.Random) -> dict[str, float]:
    n, worse, better = 400, rng.randint(0, 30), rng.randint(0, 30)
    return {
        "eval/examples": n,
        "eval/pairs_both": 300,
        "eval/pairs_worse": worse,
        "eval/pairs_better": better,
        "eval/accuracy": (300 + better) / n,
        "compress/size_bytes": rng.uniform(1e6, 4e6),
        "perf/latency_ms_b32": rng.uniform(2, 9),
    }


def _run(tmp_path: Path) -> tuple[RunFolder, Any]:
    spec = load_job(ROOT / "jobs/debug/search.yaml", [f"output.dir={tmp_path}"])
    folder = RunFolder(str(tmp_path / spec.name))
    folder.write_text("job.yaml", dump_job(spec))
    folder.write_text(
        "baseline.json", json.dumps({"eval/accuracy": 0.78, "compress/size_bytes": 9e6})
    )
    return folder, spec


def _finish(callback: Any, folder: RunFolder, trial: FakeTrial, rng: random.Random) -> None:
    callback.on_trial_start(0, [], trial)
    trial.last_result = _metrics(rng)
    callback.on_trial_result(0, [], trial, trial.last_result)
    folder.write_text(f"trials/{trial}/metrics.json", json.dumps(trial.last_result))
    (folder.local / "trials" / str(trial) / "model").mkdir()
    callback.on_trial_complete(0, [], trial)


def test_report_schedule_is_bounded_by_its_own_cost() -> None:
    clock = Clock()
    schedule = ReportSchedule(factor=20, clock=clock)
    assert not schedule.due()  # nothing changed yet
    schedule.dirty = True
    assert schedule.due()  # the first rebuild is never held back

    def rebuild() -> None:
        clock.now += 0.5  # a rebuild that takes 0.5 s

    schedule.run(rebuild)
    assert not schedule.dirty and schedule.last_cost == pytest.approx(0.5)
    schedule.dirty = True
    clock.now += 9.9
    assert not schedule.due()  # 20 x 0.5 s = 10 s must pass after its end
    clock.now += 0.1
    assert schedule.due()


def test_records_in_memory_and_report_on_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, spec = _run(tmp_path)
    rebuilt: list[int] = []
    original = report_lib.write_run_report

    def counting(*args: Any, **kwargs: Any) -> Any:
        rebuilt.append(len(kwargs["trials"]))
        clock.now += 1.0  # each rebuild takes 1 s of the fake clock: the next waits 20 s
        return original(*args, **kwargs)

    monkeypatch.setattr("orchestrator.results.write_run_report", counting)
    clock = Clock()
    callback = record_trials(folder, spec)
    callback.setup()  # as Tune does when the experiment starts
    callback.schedule = ReportSchedule(factor=20, clock=clock)
    # Records are written, never read back: a read of the run's records would fail here.
    monkeypatch.setattr(callbacks, "load_trials", None)
    rng = random.Random(0)

    _finish(callback, folder, FakeTrial("t001_a", 0.3), rng)
    assert rebuilt == [1]  # the first finished trial: a report at once
    _finish(callback, folder, FakeTrial("t002_b", 0.4), rng)
    assert rebuilt == [1]  # not due: 20 x 1 s after the last rebuild ended
    clock.now += 19.5
    callback.on_step_end(0, [])
    assert rebuilt == [1]
    clock.now += 0.5
    callback.on_step_end(0, [])  # Tune's loop: now it is due
    assert rebuilt == [1, 2]
    clock.now += 100
    callback.on_step_end(0, [])
    assert rebuilt == [1, 2]  # nothing changed since

    failed = FakeTrial("t003_c", 0.5)
    callback.on_trial_start(0, [], failed)
    callback.on_trial_error(0, [], failed)  # due at once: the last rebuild is long past
    assert rebuilt == [1, 2, 3]

    records = {
        p.parent.name: json.loads(p.read_text())
        for p in folder.local.glob("trials/*/*")
        if p.name == "trial.json"
    }
    assert {n: r["status"] for n, r in records.items()} == {
        "t001_a": "done",
        "t002_b": "done",
        "t003_c": "error",
    }
    assert records["t002_b"]["metrics"]["eval/accuracy"] == pytest.approx(
        callback.records["t002_b"]["metrics"]["eval/accuracy"]
    )
    table = pq.read_table(folder.local / "results.parquet")
    assert table.column("status").to_pylist() == ["done", "done", "error"]


def test_a_resumed_driver_keeps_the_finished_records(tmp_path: Path) -> None:
    folder, spec = _run(tmp_path)
    rng = random.Random(1)
    first = record_trials(folder, spec)
    saved = cloudpickle.dumps(first)  # Tune saves its callbacks when the experiment is made
    first.setup()
    _finish(first, folder, FakeTrial("t001_a", 0.3), rng)
    done = json.loads((folder.local / "trials/t001_a/trial.json").read_text())

    resumed = cloudpickle.loads(saved)  # a resumed experiment runs the saved callback
    resumed.setup()  # which reads the records once, when the resumed experiment starts
    again = FakeTrial("t001_a", 0.9)
    resumed.on_trial_start(0, [], again)  # Tune hands it back: its record stands
    assert json.loads((folder.local / "trials/t001_a/trial.json").read_text()) == done
    assert resumed.records["t001_a"]["status"] == "done"


def test_thousands_of_trials_make_a_light_paged_report(tmp_path: Path) -> None:
    folder, spec = _run(tmp_path)
    rng = random.Random(2)
    n = 2 * html_lib.TRIAL_PAGE + 7
    for i in range(1, n + 1):
        record = {
            "trial": f"t{i:04d}_x",
            "status": "done",
            "config": {"compress.prune.sparsity": rng.uniform(0.2, 0.7)},
            "metrics": _metrics(rng),
            "error": None,
            "artifact": "model",
            "wall_s": 30.0,
        }
        folder.write_text(f"trials/{record['trial']}/trial.json", json.dumps(record))
    summary = report_lib.write_report(folder.local)
    assert summary.n_trials == n
    page = (folder.local / "report.html").read_text()
    assert page.count("<details open><summary>trials ") == 1
    assert page.count("<details><summary>trials ") == 2
    assert 'id="trials-table-3"' in page and "(7)</summary>" in page
    assert page.count('<tr class="') >= n  # every trial is still listed
    # Well under 5 MB at 5,000 trials: under 1 kB a trial row here.
    assert len(page.encode()) / n < 1000


def test_a_line_per_started_and_finished_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder, spec = _run(tmp_path)
    callback = record_trials(folder, spec)
    callback.setup()  # as Tune does when the experiment starts
    rng = random.Random(3)
    _finish(callback, folder, FakeTrial("t001_a", 0.3), rng)
    failed = FakeTrial("t002_b", 0.5)
    callback.on_trial_start(0, [], failed)
    callback.on_trial_error(0, [], failed)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[orchestrator]")]
    assert lines[0] == "[orchestrator] trial t001_a started: sparsity=0.3 quantize=int8"
    done = lines[1]
    assert done.startswith("[orchestrator] trial t001_a done (1 of 2): val acc 0.")
    assert "(drop +" in done or "(drop -" in done
    assert done.endswith("| feasible") or "| infeasible: accuracy drop" in done
    assert lines[2] == "[orchestrator] trial t002_b started: sparsity=0.5 quantize=int8"
    assert lines[3].startswith("[orchestrator] trial t002_b failed (2 of 2): ")
