"""The debug search through real Ray Tune + Ray Train (trials of 2 DDP workers), driven by the
CLI as a user runs it, logging to a real local MLflow server: the driver is SIGKILLed after its
first finished trial and resumed with ``--resume``; then the run directory of docs/contracts.md,
what MLflow holds of the search, ``report`` rebuilding the run directory, and ``export`` of the
best model predicting exactly as the trial's own artifact."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.cli import main
from orchestrator.testing.bad_input import cli_in_process

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs/debug/search.yaml"
N_TRIALS = 3


def _command(out: Path, *extra: str) -> list[str]:
    """The debug search writing under ``out``; logging to MLflow when ``out/mlflow-uri``
    names a server."""
    uri = out / "mlflow-uri"
    tracking = [f"tracking.mlflow.tracking_uri={uri.read_text()}"] if uri.is_file() else []
    return [
        sys.executable,
        "-m",
        "orchestrator",
        "search",
        str(JOB),
        f"output.dir={out}",
        f"data.cache_dir={out / 'cache'}",
        f"search.num_samples={N_TRIALS}",
        "search.confirm_seeds=[1]",
        *tracking,
        *extra,
    ]


def _done_trials(run: Path) -> dict[str, dict]:
    done = {}
    for path in (run / "trials").glob("*/trial.json"):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue
        if record["status"] == "done":
            done[record["trial"]] = record
    return done


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (sqlite store) for the module's searches."""
    from orchestrator.testing.mlflow_server import local_mlflow

    with local_mlflow(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def search_run(ray_cluster: str, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Start the search, SIGKILL the driver once a trial has finished, resume it."""
    out = tmp_path_factory.mktemp("search")
    (out / "mlflow-uri").write_text(mlflow_uri)
    run = out / "debug-search"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    log = (out / "first.log").open("w")
    proc = subprocess.Popen(_command(out), cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not _done_trials(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(2)
    assert proc.poll() is None, (
        "the search ended before it could be interrupted:\n"
        + (out / "first.log").read_text()[-3000:]
    )
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up of any kind, as with a lost machine
    proc.wait()
    log.close()
    before = _done_trials(run)
    assert before, (out / "first.log").read_text()[-3000:]
    stamps = {n: (run / "trials" / n / "metrics.json").stat().st_mtime_ns for n in before}

    resumed = subprocess.run(
        _command(out, "--resume"),
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    return {
        "run": run,
        "out": out,
        "before": before,
        "stamps": stamps,
        "stdout": resumed.stdout,
        "mlflow": mlflow_uri,
    }


def test_resume_reruns_no_finished_trial(search_run: dict) -> None:
    run = search_run["run"]
    table = pq.read_table(run / "results.parquet").to_pylist()
    names = [r["trial"] for r in table]
    done = [r for r in table if r["status"] == "done"]
    assert len(names) == len(set(names)) and len(done) == N_TRIALS, names
    # A trial the driver started just before the kill, before Tune's snapshot of it reached
    # the run folder (Tune copies it there in the background), is unknown to the restored
    # experiment: marked interrupted, its recipe drawn again (README, "When things fail").
    for r in table:
        if r["status"] != "done":
            assert r["status"] == "error" and r["error"].startswith("interrupted:"), r
            assert r["recipe"] in {d["recipe"] for d in done}, r
    for name, record in search_run["before"].items():
        # Same files, untouched: the resumed driver did not run the trial again.
        assert (run / "trials" / name / "metrics.json").stat().st_mtime_ns == search_run["stamps"][
            name
        ]
        assert json.loads((run / "trials" / name / "trial.json").read_text()) == record
    out = search_run["stdout"]
    assert "resuming the search" in out and "Pareto front" in out
    # The terminal: the dashboard's address, a line per trial, no Tune table without --verbose.
    assert "[orchestrator] Ray dashboard: http" in out
    assert re.search(r"\[orchestrator\] trial t\d+\S* done \(\d+ of \d+\): val acc", out), out
    assert "Trial status" not in out


def test_run_directory_has_every_file(search_run: dict) -> None:
    run = search_run["run"]
    for name in (
        "job.yaml",
        "baseline.json",
        "results.parquet",
        "pareto.parquet",
        "pareto.png",
        "report.html",
    ):
        assert (run / name).is_file(), name
    baseline = json.loads((run / "baseline.json").read_text())
    trial = json.loads(next((run / "trials").glob("*/trial.json")).read_text())
    for key in (
        "eval/accuracy",
        "test/accuracy",
        "compress/size_bytes",
        "perf/latency_ms_b32",
        "compress/params",
    ):
        assert key in baseline and key in trial["metrics"], key
    table = pq.read_table(run / "results.parquet")
    for column in (
        "trial",
        "status",
        "config/compress.prune.sparsity",
        "config/compress.quantize",
        "eval/accuracy",
        "test/accuracy",
        "compress/size_bytes",
        "perf/latency_ms_b32",
        "feasible",
        "violations",
        "pareto",
    ):
        assert column in table.column_names, column
    rows = table.to_pylist()
    pareto = pq.read_table(run / "pareto.parquet").to_pylist()
    assert pareto and {r["trial"] for r in pareto} == {r["trial"] for r in rows if r["pareto"]}
    assert (run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (run / "report.html").read_text()
    assert 'id="pareto-table"' in html and 'http-equiv="refresh"' not in html
    # Tune's own folders: per-trial results and TensorBoard event files.
    assert list((run / "tune").glob("*/events.out.tfevents*"))
    # Every trial starts from the fine-tuned dense baseline, not from the raw model.
    job = (run / "trials" / rows[0]["trial"] / "job.yaml").read_text()
    assert str(run / "baseline" / "model") in job


def test_the_selected_trial_is_trained_again_with_the_confirm_seed(
    search_run: dict, capsys: pytest.CaptureFixture
) -> None:
    """``search.confirm_seeds``: after the search, the selected trial's own job with only
    train.seed changed, its metrics in confirm.json, judged in the report and the terminal (a
    trial that broke the constraint with the seed is passed over and the next one trained
    again: at most ``confirm_candidates``, 2); ``orchestrator confirm`` with the same seed
    afterwards trains nothing."""
    import yaml

    run = search_run["run"]
    rows = {r["trial"]: r for r in pq.read_table(run / "results.parquet").to_pylist()}
    record = json.loads((run / "confirm.json").read_text())
    assert 1 <= len(record) <= 2, record
    for name, seeds in record.items():
        assert list(seeds) == ["1"] and seeds["1"]["status"] == "done", record
        # Within the constraint with the seed: selected; not: passed over.
        assert rows[name]["confirmed"] is rows[name]["best"], rows[name]
        again = run / "confirm" / f"{name}-seed1"
        assert seeds["1"]["run"] == str(again)
        metrics = json.loads((again / "metrics.json").read_text())
        assert seeds["1"]["metrics"]["eval/accuracy"] == metrics["eval/accuracy"]
        mine = yaml.safe_load((again / "job.yaml").read_text())
        trial = yaml.safe_load((run / "trials" / name / "job.yaml").read_text())
        assert mine["train"].pop("seed") == 1 and trial["train"].pop("seed") == 0
        assert mine["name"] == f"{name}-seed1" and mine["output"]["dir"] == str(run / "confirm")
        for job in (mine, trial):
            del job["name"], job["output"]["dir"]
        assert mine == trial  # the same recipe, data, recovery and measurement
        assert (again / "model").is_dir()
        line = f"trained again with other seeds: {name}, trained with seed 0 in the search"
        assert line in search_run["stdout"]
        assert f'id="confirm-{name}"' in (run / "report.html").read_text()
    stamp = (run / "confirm.json").stat().st_mtime_ns
    assert main(["confirm", str(run), "--seeds", "1", "--trial", name]) == 0
    out = capsys.readouterr().out
    assert f"{name}: seed(s) 1 already measured" in out and "trained again with other seeds" in out
    assert (run / "confirm.json").stat().st_mtime_ns == stamp


def test_the_dense_baseline_is_evaluated_once(search_run: dict) -> None:
    """The baseline run caches the dense model's answers as it scores its saved model, under
    the key the driver's measurement of that model (and every trial) looks them up by: the
    answers under that key were written by the baseline run, before its final metrics."""
    from orchestrator import finalize
    from orchestrator.config.loader import load_job

    run = search_run["run"]
    spec = load_job(JOB, [f"data.cache_dir={search_run['out'] / 'cache'}"])  # as _command
    key = finalize.saved_model_spec(spec, str(run / "baseline" / "model"))
    cached = finalize._dense_answers_path(key)
    assert cached.is_file()
    assert cached.stat().st_mtime <= (run / "baseline" / "metrics.json").stat().st_mtime
    baseline = json.loads((run / "baseline.json").read_text())
    saved = json.loads(cached.read_text())["metrics"]
    assert {k: baseline[k] for k in saved} == saved


def test_mlflow_holds_the_search_and_a_run_per_trial(search_run: dict) -> None:
    """One search run (taken up again by --resume, not a second one) with the job, the dense
    and selected figures, the report and the selected model; a finished child run per trial with
    its recipe, final metrics and compress report; the child the killed driver left running is
    KILLED."""
    from mlflow.tracking import MlflowClient

    from orchestrator.search.tracking import ROLE_TAG

    run = search_run["run"]
    client = MlflowClient(search_run["mlflow"])
    experiment = client.get_experiment_by_name("debug-search")  # default: the job's name
    runs = client.search_runs([experiment.experiment_id])
    searches = [r for r in runs if r.data.tags.get(ROLE_TAG) == "search"]
    assert len(searches) == 1, [r.info.run_name for r in searches]
    parent = searches[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "debug-search"
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == parent.info.run_id
    assert parent.data.params["train.strategy"] == "ddp"
    assert parent.data.params["search.num_samples"] == str(N_TRIALS)
    baseline = json.loads((run / "baseline.json").read_text())
    assert parent.data.metrics["dense/eval/accuracy"] == pytest.approx(baseline["eval/accuracy"])
    rows = pq.read_table(run / "results.parquet").to_pylist()
    best = min((r for r in rows if r["feasible"]), key=lambda r: r["compress/size_bytes"])
    assert parent.data.tags["selected_trial"] == best["trial"]
    assert parent.data.metrics["selected/compress/size_bytes"] == best["compress/size_bytes"]
    assert parent.data.metrics["trials/done"] == N_TRIALS
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"job.yaml", "report.html", "pareto.png", "pareto_table.json", "selected_model"} <= files
    assert "confirm.json" in files  # search.confirm_seeds ran before the search run ended
    model = {a.path for a in client.list_artifacts(parent.info.run_id, "selected_model")}
    assert "selected_model/trial.json" in model and any(p.endswith(".safetensors") for p in model)

    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1, "every trial run is a child of the search run"
    finished = {r.info.run_name: r for r in children if r.info.status == "FINISHED"}
    assert set(finished) == {r["trial"] for r in rows if r["status"] == "done"}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    for name, child in finished.items():
        record = json.loads((run / "trials" / name / "trial.json").read_text())
        assert child.data.params["compress.prune.sparsity"] == str(
            record["config"]["compress.prune.sparsity"]
        )
        metrics = json.loads((run / "trials" / name / "metrics.json").read_text())
        assert child.data.metrics["test/accuracy"] == pytest.approx(metrics["test/accuracy"])
        assert child.data.tags["orchestrator.status"] == "done"
        feasible = child.data.tags["orchestrator.feasible"]
        assert feasible == "yes" or feasible.startswith("no: "), feasible
        assert "compress_report.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
    assert f"search run {search_run['mlflow']}/#/experiments/" in search_run["stdout"]
    assert "View run" not in search_run["stdout"]  # MLflow's own link per run is turned off


def _search_again(search_run: dict, *extra: str) -> tuple[int, str]:
    """The module's search command once more (with ``extra`` overrides), refused before Ray
    starts: run in this process; returns (exit code, stderr)."""
    args = _command(search_run["out"], *extra)[3:]  # past `python -m orchestrator`
    return cli_in_process(args, {}, search_run["out"])


def test_a_deleted_mlflow_experiment_is_refused(search_run: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(search_run["mlflow"])
    client.delete_experiment(client.create_experiment("gone"))
    out = search_run["out"] / "deleted"
    code, err = _search_again(search_run, "tracking.mlflow.experiment=gone", f"output.dir={out}")
    assert code == 2, err[-2000:]
    assert "tracking.mlflow.experiment = 'gone'" in err and "restore" in err
    assert not out.exists()


def test_same_search_again_needs_resume(search_run: dict) -> None:
    code, err = _search_again(search_run)
    assert code == 2, err[-2000:]
    assert "--resume" in err


def test_report_rebuilds_the_files(search_run: dict, capsys: pytest.CaptureFixture) -> None:
    run = search_run["run"]
    before = pq.read_table(run / "results.parquet").to_pylist()
    for name in ("results.parquet", "pareto.parquet", "pareto.png", "report.html"):
        (run / name).unlink()
    assert main(["report", str(run)]) == 0
    assert "Pareto front" in capsys.readouterr().out
    after = pq.read_table(run / "results.parquet").to_pylist()
    assert [r["trial"] for r in after] == [r["trial"] for r in before]
    assert all((run / n).is_file() for n in ("pareto.parquet", "pareto.png", "report.html"))


def test_export_best_predicts_like_the_trial(search_run: dict, tmp_path: Path) -> None:
    from orchestrator.compress.artifact import load_artifact

    run = search_run["run"]
    out = tmp_path / "best"
    assert main(["export", str(run), "--best", "--out", str(out)]) == 0
    record = json.loads((out / "trial.json").read_text())
    source = run / "trials" / record["trial"] / "model"
    exported, original = load_artifact(out), load_artifact(source)
    ids = torch.randint(1000, 2000, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        a = exported.eval()(**batch).logits
        b = original.eval()(**batch).logits
    assert torch.equal(a, b)
    # The best under the constraints is the smallest feasible artifact (the job's select).
    rows = pq.read_table(run / "results.parquet").to_pylist()
    feasible = [r for r in rows if r["feasible"]]
    assert record["trial"] == min(feasible, key=lambda r: r["compress/size_bytes"])["trial"]


def _export_each(
    run: Path, fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> Iterator[tuple[dict, Path, int, Any]]:
    """``orchestrator export --format FMT`` of every finished trial: (its row in
    results.parquet, the --out folder, the exit code, what it printed)."""
    rows = [r for r in pq.read_table(run / "results.parquet").to_pylist() if r["status"] == "done"]
    for row in rows:
        out = tmp_path / row["trial"]
        rc = main(["export", str(run), "--trial", row["trial"], "--format", fmt, "--out", str(out)])
        yield row, out, rc, capsys.readouterr()


def test_export_to_onnx_or_a_clear_refusal(
    search_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Every finished trial of the run: ONNX for a recipe ONNX Runtime can run (checked on the
    test split against the artifact), exit 2 naming --format and nothing written for 4-bit
    weights."""
    run = search_run["run"]
    for row, out, rc, text in _export_each(run, "onnx", tmp_path, capsys):
        if row["config/compress.quantize"] == "int4":
            assert rc == 2 and "--format = 'onnx'" in text.err and "weight_only" in text.err
            assert not out.exists()
            continue
        assert rc == 0, text.out + text.err
        check = json.loads((out / "onnx_check.json").read_text())
        test_examples = json.loads((run / "trials" / row["trial"] / "metrics.json").read_text())
        assert check["examples"] == test_examples["test/examples"]
        assert check["float_graph_max_diff"] < 1e-3 and check["agreement"] >= 0.9, check
        assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()
        assert not list(out.glob("*.safetensors"))
        assert "same labels" in text.out


def test_export_to_plain_transformers(
    search_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Every finished trial of the run (magnitude pruning, with float, int8 or 4-bit weights) as
    a folder transformers alone loads, checked on the test split against the artifact: the
    same logits but for the int8 kernels' activation quantization."""
    for row, out, rc, text in _export_each(search_run["run"], "hf", tmp_path, capsys):
        assert rc == 0, text.out + text.err
        check = json.loads((out / "hf_check.json").read_text())
        if row["config/compress.quantize"] == "int8":
            assert check["agreement"] >= 0.9, check
        else:
            assert check["agreement"] == 1.0 and check["max_logit_diff"] < 1e-4, check
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in out.iterdir()
        }
        assert not (out / "manifest.json").exists()
        assert "as a plain transformers model" in text.out and "transformers against" in text.out


def test_asha_stops_the_poor_trial_at_its_first_rung(ray_cluster: str, tmp_path: Path) -> None:
    """Early stopping end to end: a grid of a sane and a diverging learning rate, validation
    loss every 2 steps, ASHA with rungs at steps 2, 4 and 8. The diverging trial is stopped
    at the first rung (its last result is step 2, its record "stopped"); the sane one runs to
    the end and ships its artifact. The dense baseline is the job's model as it is (no
    fine-tuning run of its own: the module's first search shows that one)."""
    out = tmp_path
    cmd = _command(
        out,
        "name=debug-asha",
        "train.max_steps=8",
        "train.eval_every=2",
        # Logging off the evaluation steps: each progress report must carry its own step.
        "train.log_every=3",
        "search.space={train.lr: {grid: [1.0e-3, 10.0]}}",
        "search.algorithm=grid",
        "search.num_samples=1",  # the later value of a key wins: one pass over the grid
        "search.scheduler=asha",
        "search.objectives=[{metric: eval/loss, mode: min}]",
        "search.select=null",
        "search.constraints={}",
        "search.baseline.train=false",
    )
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = pq.read_table(out / "debug-asha" / "results.parquet").to_pylist()
    by_lr = {r["config/train.lr"]: r for r in rows}
    assert set(by_lr) == {1.0e-3, 10.0}, rows
    sane, diverging = by_lr[1.0e-3], by_lr[10.0]
    assert sane["status"] == "done" and sane["train/step"] == 8, sane
    assert diverging["status"] == "stopped" and diverging["train/step"] == 2, diverging
    assert diverging["eval/loss"] > sane["eval/loss"]
    assert (out / "debug-asha" / "trials" / sane["trial"] / "model").is_dir()
    assert not (out / "debug-asha" / "trials" / diverging["trial"] / "model").exists()


def test_a_search_whose_every_trial_fails_exits_1(
    ray_cluster: str, mlflow_uri: str, tmp_path: Path
) -> None:
    """A recipe that cannot apply to the model (more blocks removed than the tiny BERT has,
    which only the model can tell): the trial fails, and with no trial done the search is a
    failed run (exit 1) that shows the trial's error, not a search that found nothing; its
    MLflow run ends FAILED, its trial's run too. The dense baseline is only evaluated, not
    fine-tuned: the trial fails whatever it starts from."""
    (tmp_path / "mlflow-uri").write_text(mlflow_uri)
    cmd = _command(
        tmp_path,
        "name=debug-fails",
        "search.space={compress.depth: {choice: {five: {method: named, remove: [0, 1, 2, 3, 4]}}}}",
        "search.num_samples=1",
        "search.baseline.train=false",
    )
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every trial of the search failed (1 of 1)" in proc.stderr
    assert "compress.depth.remove" in proc.stderr
    assert (tmp_path / "debug-fails" / "report.html").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("debug-fails").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"], runs
