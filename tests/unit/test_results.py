"""orchestrator.results: the Pareto rule, the trial table with constraints, the best pick, the
report files of a (partial) run directory, and export of a trial's artifact."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.config.loader import dump_job, load_job
from orchestrator.config.search import SearchConfig
from orchestrator.errors import ConfigError
from orchestrator.results import (
    best_trial,
    build_table,
    export_trial,
    format_pareto_table,
    load_trials,
    pareto_front,
    recipe,
    write_report,
)
from orchestrator.results.pareto import dominates

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "debug" / "recover.yaml"
SPACE = (
    "search.space={compress.prune.sparsity: {uniform: [0.2, 0.7]}, "
    "compress.factorize: {choice: {off: null, svd: {method: svd, rank_ratio: 0.5}}}, "
    "compress.factorize.rank_ratio: {choice: [0.25, 0.5]}, "
    "compress.quantize.embeddings: {choice: [true, false]}}"
)
OBJECTIVES = (
    "search.objectives=[{metric: eval/accuracy, mode: max}, "
    "{metric: compress/size_bytes, mode: min}]"
)
BASELINE = {
    "eval/accuracy": 0.80,
    "test/accuracy": 0.79,
    "compress/size_bytes": 4.0e6,
    "perf/latency_ms_b32": 20.0,
    "perf/latency_ms_b1": 2.0,
    "compress/params": 1.0e6,
}


def _search(**constraints: Any) -> SearchConfig:
    overrides = [SPACE, OBJECTIVES, f"search.constraints={json.dumps(constraints)}"]
    search = load_job(JOB, overrides).search
    assert search is not None
    return search


def _metrics(acc: float, size: float, ms: float = 10.0, **extra: float) -> dict[str, float]:
    return {
        "eval/accuracy": acc,
        "test/accuracy": acc - 0.01,
        "compress/size_bytes": size,
        "compress/dense_size_bytes": 4.0e6,
        "compress/size_ratio": 4.0e6 / size,
        "perf/latency_ms_b32": ms,
        "perf/speedup": 20.0 / ms,
        **extra,
    }


def _trial(name: str, status: str, config: dict, metrics: dict, **extra: Any) -> dict[str, Any]:
    record = {
        "trial": name,
        "status": status,
        "config": config,
        "metrics": metrics,
        "error": None,
        "artifact": "model" if status == "done" else None,
        "wall_s": 12.5 if status != "running" else None,
    }
    record.update(extra)
    return record


def _cfg(sparsity: float, factorize: str = "svd", ratio: float = 0.25, emb: bool = True) -> dict:
    return {
        "compress.prune.sparsity": sparsity,
        "compress.factorize": factorize,
        "compress.factorize.rank_ratio": ratio,
        "compress.quantize.embeddings": emb,
    }


def _trials() -> list[dict[str, Any]]:
    """a, b: on the front (trade accuracy for size); c: dominated by a; d: infeasible (drop
    0.05 > 0.02), factorize off; e: running; f: failed."""
    return [
        _trial("t_a", "done", _cfg(0.3), _metrics(0.795, 2.0e6)),
        _trial("t_b", "done", _cfg(0.6, ratio=0.5), _metrics(0.785, 1.0e6)),
        _trial("t_c", "done", _cfg(0.4, emb=False), _metrics(0.79, 2.5e6)),
        _trial("t_d", "done", _cfg(0.7, factorize="off"), _metrics(0.75, 0.5e6)),
        _trial("t_e", "running", _cfg(0.5), {"eval/accuracy": 0.7}),
        _trial("t_f", "error", _cfg(0.2), {}, error="RuntimeError: <boom> & 'bad'"),
    ]


# ---------------------------------------------------------------- pareto_front


def test_pareto_dominance_two_objectives() -> None:
    points = [[0.9, 10.0], [0.8, 5.0], [0.85, 12.0], [0.7, 5.0], [0.95, 20.0]]
    # [0.85, 12] is beaten by [0.9, 10] on both; [0.7, 5] by [0.8, 5] on accuracy alone.
    assert pareto_front(points, ["max", "min"]) == [True, True, False, False, True]


def test_pareto_ties_are_all_kept() -> None:
    points = [[0.9, 10.0], [0.9, 10.0], [0.8, 20.0]]
    assert pareto_front(points, ["max", "min"]) == [True, True, False]


def test_pareto_one_objective_keeps_every_row_with_the_best_value() -> None:
    assert pareto_front([[0.7], [0.9], [0.9], [0.8]], ["max"]) == [False, True, True, False]
    assert pareto_front([[3.0], [1.0], [1.0]], ["min"]) == [False, True, True]


def test_pareto_mixed_modes_and_missing_values() -> None:
    points = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1.0, None, 0.5], [math.nan, 0.0, 0.0]]
    # max, min, min: row 1 loses to row 0 on the min columns and wins on the max one.
    assert pareto_front(points, ["max", "min", "min"]) == [True, True, False, False]
    # A row with a missing value never dominates either: [0.5] alone is not on the front.
    assert pareto_front([[None], [0.5]], ["max"]) == [False, True]
    assert pareto_front([], ["max"]) == []
    with pytest.raises(ValueError, match="mode"):
        pareto_front([[1.0]], ["up"])


def test_pareto_front_equals_the_pairwise_definition_on_random_points() -> None:
    """The front is found by comparing each point with the front so far (fast at thousands
    of trials); it must equal the definition: no other point dominates it."""
    rng = random.Random(0)
    modes = ["max", "min", "min"]
    for trial in range(200):
        n = rng.randint(0, 40)
        # Few distinct values, so ties and duplicates are common.
        points = [
            [
                rng.choice([None, 1, 2, 3, 3.5]) if trial % 5 == 0 else rng.randint(0, 4)
                for _ in modes
            ]
            for _ in range(n)
        ]
        full = [i for i, p in enumerate(points) if None not in p]
        expected = [
            i in full and not any(j != i and dominates(points[j], points[i], modes) for j in full)
            for i in range(n)
        ]
        assert pareto_front(points, modes) == expected, points


# ---------------------------------------------------------------- build_table


def test_build_table_columns_and_types() -> None:
    table = build_table(_trials(), _search(max_accuracy_drop=0.02), BASELINE)
    schema = table.schema
    assert table.column("trial").to_pylist() == ["t_a", "t_b", "t_c", "t_d", "t_e", "t_f"]
    assert schema.field("config/compress.prune.sparsity").type == pa.float64()
    assert schema.field("config/compress.factorize.rank_ratio").type == pa.float64()
    assert schema.field("config/compress.factorize").type == pa.string()
    assert schema.field("config/compress.quantize.embeddings").type == pa.bool_()
    for key in ("eval/accuracy", "test/accuracy", "compress/size_bytes", "perf/speedup"):
        assert schema.field(key).type == pa.float64()
    for name, kind in [
        ("accuracy_drop", pa.float64()),
        ("feasible", pa.bool_()),
        ("violations", pa.string()),
        ("pareto", pa.bool_()),
        ("error", pa.string()),
        ("wall_s", pa.float64()),
        ("best", pa.bool_()),
    ]:
        assert schema.field(name).type == kind, name
    rows = {r["trial"]: r for r in table.to_pylist()}
    # The factorize section is off for t_d: its rank_ratio was ignored, so it is null.
    assert rows["t_d"]["config/compress.factorize"] == "off"
    assert rows["t_d"]["config/compress.factorize.rank_ratio"] is None
    assert "factorize=off" in rows["t_d"]["recipe"]
    assert rows["t_a"]["accuracy_drop"] == pytest.approx(0.005)
    # Infeasible trials are kept and say why; unfinished ones have no verdict.
    assert rows["t_d"]["feasible"] is False
    assert rows["t_d"]["violations"] == "accuracy drop 0.05 > 0.02"
    assert [rows[t]["feasible"] for t in ("t_a", "t_e", "t_f")] == [True, None, None]
    assert [n for n, r in rows.items() if r["pareto"]] == ["t_a", "t_b"]
    assert rows["t_e"]["eval/accuracy"] == 0.7 and rows["t_e"]["compress/size_bytes"] is None
    assert rows["t_f"]["error"].startswith("RuntimeError")
    assert [n for n, r in rows.items() if r["best"]] == ["t_a"]


def test_recipe_is_short() -> None:
    text = recipe(
        {
            "compress.prune.sparsity": 0.4213,
            "compress.quantize": "int8",
            "compress.factorize.rank_ratio": 0.25,
            "compress.factorize.rank": 8.0,
            "compress.quantize.embeddings": False,
            "compress.prune": None,
        }
    )
    assert text == "sparsity=0.42 quantize=int8 rank_ratio=0.25 rank=8 embeddings=false prune=off"


@pytest.mark.parametrize(
    ("constraints", "metrics", "expected"),
    [
        ({"max_accuracy_drop": 0.01}, _metrics(0.777, 1e6), "accuracy drop 0.023 > 0.01"),
        ({"max_size_bytes": 1.5e6}, _metrics(0.8, 2e6), "size 2,000,000 bytes > 1,500,000 bytes"),
        ({"min_size_ratio": 3}, _metrics(0.8, 2e6), "size ratio 2x < 3x"),
        ({"max_latency_ms": 5}, _metrics(0.8, 1e6, ms=8), "latency 8 ms (batch 32) > 5 ms"),
        ({"min_speedup": 3}, _metrics(0.8, 1e6, ms=8), "speedup 2.5x < 3x"),
        ({"max_latency_ms": 5}, {"eval/accuracy": 0.8}, "latency unknown"),
    ],
)
def test_each_constraint_kind(constraints: dict, metrics: dict, expected: str) -> None:
    search = _search(**constraints)
    ok = _trial("ok", "done", _cfg(0.3), _metrics(0.8, 1e6, ms=1.0))
    bad = _trial("bad", "done", _cfg(0.3), metrics)
    rows = {r["trial"]: r for r in build_table([ok, bad], search, BASELINE).to_pylist()}
    assert rows["ok"]["feasible"] is True and rows["ok"]["violations"] is None
    assert rows["bad"]["feasible"] is False
    assert rows["bad"]["violations"].startswith(expected)
    assert not rows["bad"]["pareto"]


def test_several_violations_are_joined() -> None:
    search = _search(max_accuracy_drop=0.01, max_size_bytes=1e6)
    row = build_table([_trial("x", "done", _cfg(0.3), _metrics(0.7, 2e6))], search, BASELINE)
    assert row.column("violations")[0].as_py() == (
        "accuracy drop 0.1 > 0.01; size 2,000,000 bytes > 1,000,000 bytes"
    )


def test_missing_baseline_makes_accuracy_drop_unknown() -> None:
    table = build_table(_trials(), _search(max_accuracy_drop=0.02), None)
    assert table.column("accuracy_drop").null_count == table.num_rows
    done = [r for r in table.to_pylist() if r["status"] == "done"]
    assert all(r["feasible"] is False for r in done)
    assert all("no dense baseline" in r["violations"] for r in done)
    assert best_trial(table, _search(max_accuracy_drop=0.02)) is None
    # Without that constraint the baseline is not needed to pick a trial.
    assert best_trial(build_table(_trials(), _search(), None), _search())["trial"] == "t_a"


def test_best_trial_breaks_ties_on_the_next_objective() -> None:
    search = _search()
    trials = [
        _trial("t1", "done", _cfg(0.3), _metrics(0.8, 3e6)),
        _trial("t2", "done", _cfg(0.5), _metrics(0.8, 1e6)),  # same accuracy, smaller
        _trial("t3", "done", _cfg(0.5), _metrics(0.7, 0.5e6)),
        _trial("t4", "running", _cfg(0.5), {"eval/accuracy": 0.99}),  # not finished: ignored
    ]
    assert best_trial(build_table(trials, search, BASELINE), search)["trial"] == "t2"
    # An explicit selection metric wins over the first objective.
    small = search.model_copy(update={"select": search.objectives[1]})
    assert best_trial(build_table(trials, small, BASELINE), small)["trial"] == "t3"


def test_empty_table_and_format() -> None:
    search = _search()
    table = build_table([], search, BASELINE)
    assert table.num_rows == 0 and "eval/accuracy" in table.column_names
    assert best_trial(table, search) is None
    assert "none yet" in format_pareto_table(table)
    text = format_pareto_table(build_table(_trials(), search, BASELINE))
    lines = text.splitlines()
    # No constraints here: t_d (smallest) joins the front.
    assert lines[0].startswith("Pareto front: 3 of 4 finished trials (6 in all)")
    assert lines[1].split()[:3] == ["trial", "recipe", "eval"]
    assert any(ln.startswith("t_a ") and "sparsity=0.3" in ln for ln in lines)
    assert lines[-2].startswith("best feasible trial: t_a")
    assert lines[-1].strip() == "test drop +0.50 points"  # no accuracy constraint: no verdict


# ---------------------------------------------------------------- run directory


def _write_run(root: Path, trials: list[dict], baseline: dict | None = BASELINE) -> Path:
    spec = load_job(
        JOB,
        [SPACE, OBJECTIVES, "search.constraints={max_accuracy_drop: 0.02}", f"output.dir={root}"],
    )
    run = root / spec.name
    run.mkdir(parents=True)
    (run / "job.yaml").write_text(dump_job(spec))
    if baseline is not None:
        (run / "baseline.json").write_text(json.dumps(baseline))
    for t in trials:
        (run / "trials" / t["trial"]).mkdir(parents=True)
        (run / "trials" / t["trial"] / "trial.json").write_text(json.dumps(t))
    return run


def test_load_trials_skips_garbled_records(tmp_path: Path) -> None:
    run = _write_run(tmp_path, _trials()[:2])
    (run / "trials" / "t_bad").mkdir()
    (run / "trials" / "t_bad" / "trial.json").write_text('{"trial": "t_bad", "sta')
    (run / "trials" / "t_empty").mkdir()
    notes: list[str] = []
    assert [t["trial"] for t in load_trials(run, notes)] == ["t_a", "t_b"]
    assert any("t_bad" in n and "unreadable" in n for n in notes)
    assert any("t_empty" in n for n in notes)


def test_write_report_partial_run(tmp_path: Path) -> None:
    run = _write_run(tmp_path, _trials())
    summary = write_report(run, running=True)
    assert summary.counts == {"done": 4, "running": 1, "stopped": 0, "error": 1}
    assert summary.n_pareto == 2 and summary.best == "t_a"
    names = ["results.parquet", "pareto.parquet", "pareto.png", "report.html"]
    assert [p.name for p in summary.paths] == names
    assert all((run / n).is_file() for n in names)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    results = pq.read_table(run / "results.parquet")
    assert results.num_rows == 6
    assert {
        "trial",
        "status",
        "config/compress.prune.sparsity",
        "eval/accuracy",
        "accuracy_drop",
        "feasible",
        "violations",
        "pareto",
    } <= set(results.column_names)
    front = pq.read_table(run / "pareto.parquet")
    assert front.column("trial").to_pylist() == ["t_a", "t_b"]
    assert front.schema == results.schema
    assert (run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (run / "report.html").read_text()
    assert '<meta http-equiv="refresh" content="15">' in page
    assert 'id="pareto-table"' in page
    table_html = page.split('id="pareto-table"')[1].split("</table>")[0]
    assert table_html.count("<tr") == 3  # header + t_a + t_b
    assert "t_a" in table_html and "t_b" in table_html and "t_c" not in table_html
    assert '<img id="pareto-plot"' in page and 'src="data:image/png;base64,' in page
    assert "Partial results" in page and "1 still running" in page and "1 failed" in page
    # Errors are escaped, never markup; nothing is fetched from elsewhere.
    assert "RuntimeError: &lt;boom&gt; &amp; &#x27;bad&#x27;" in page and "<boom>" not in page
    assert "http://" not in page and "https://" not in page
    assert f"orchestrator export {run} --best --out {run / 'best'}" in page

    write_report(run, running=False)
    page = (run / "report.html").read_text()
    assert "http-equiv" not in page
    assert "were running when the search stopped" in page


def test_the_selected_recipes_allocation_is_drawn(tmp_path: Path) -> None:
    """A selected trial that allocated bit widths per layer: the report shows its sensitivity
    heatmap; a report without one has no such section."""
    run = _write_run(tmp_path, _trials())
    write_report(run)
    assert 'id="sensitivity-plot"' not in (run / "report.html").read_text()
    allocation = {
        "setting": "bits",
        "choice": {"a": 2, "b": 8},
        "mean": 5.0,
        "budget": 5.0,
        "profile": {
            "layers": ["a", "b"],
            "params": [10, 10],
            "setting": "bits",
            "values": [2, 8],
            "kl": [[0.01, 0.001], [0.5, 0.002]],
            "batches": 1,
            "seconds": 0.1,
        },
    }
    report = {"steps": [{"stage": "quantize", "config": {}, "entry": {"allocation": allocation}}]}
    (run / "trials" / "t_a" / "compress_report.json").write_text(json.dumps(report))
    assert write_report(run).best == "t_a"
    page = (run / "report.html").read_text()
    assert '<img id="sensitivity-plot"' in page and "Per-layer allocation" in page


def test_write_report_without_baseline_or_finished_trials(tmp_path: Path) -> None:
    running = [_trial("t_e", "running", _cfg(0.5), {})]
    run = _write_run(tmp_path, running, baseline=None)
    summary = write_report(run)
    assert summary.best is None and summary.n_pareto == 0
    assert any("baseline.json" in n for n in summary.notes)
    page = (run / "report.html").read_text()
    assert "No dense baseline yet" in page and "No trial has finished yet" in page
    assert (run / "pareto.png").stat().st_size > 0
    assert pq.read_table(run / "pareto.parquet").num_rows == 0


def test_write_report_says_what_no_trial_met(tmp_path: Path) -> None:
    bad = [_trial("t_d", "done", _cfg(0.7), _metrics(0.70, 0.5e6))]
    run = _write_run(tmp_path, bad)
    assert write_report(run).best is None
    page = (run / "report.html").read_text()
    assert "No finished trial met the constraints" in page
    assert "t_d: accuracy drop 0.1 &gt; 0.02" in page


def test_write_report_rejects_what_is_not_a_search_run(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as e:
        write_report(missing)
    assert e.value.problems[0].key == "RUN_DIR" and "no such directory" in str(e.value)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no job.yaml"):
        write_report(empty)
    assert list(empty.iterdir()) == []
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "job.yaml").write_text(dump_job(load_job(JOB)))
    with pytest.raises(ConfigError, match="without a search section"):
        write_report(plain)
    assert [p.name for p in plain.iterdir()] == ["job.yaml"]


# ---------------------------------------------------------------- export


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny BERT saved with save_artifact, and a batch to compare logits on."""
    from orchestrator import models
    from orchestrator.compress.artifact import save_artifact
    from orchestrator.config.schema import ModelConfig

    tokenizer = models.build_tokenizer(ModelConfig(name="minilm-l6"))
    model = models.build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=0)
    with torch.no_grad():  # some zeros, so the artifact stores sparse tensors too
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_((p.abs() > p.abs().median()).float())
    folder = tmp_path_factory.mktemp("artifact") / "model"
    save_artifact(model, folder, tokenizer=tokenizer)
    batch = tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt")
    return folder, dict(batch)


def _logits(folder: Path, batch: dict) -> torch.Tensor:
    from orchestrator.compress.artifact import load_artifact

    model = load_artifact(folder)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_export_best_copies_the_artifact(tmp_path: Path, tiny_artifact) -> None:
    import shutil

    src, batch = tiny_artifact
    run = _write_run(tmp_path, _trials())
    shutil.copytree(src, run / "trials" / "t_a" / "model")
    out = tmp_path / "export" / "best"
    record = export_trial(run, out)
    assert record["trial"] == "t_a" and record["status"] == "done"
    assert torch.equal(_logits(out, batch), _logits(src, batch))
    provenance = json.loads((out / "trial.json").read_text())
    assert provenance["trial"] == "t_a" and provenance["row"]["pareto"] is True
    assert provenance["row"]["eval/accuracy"] == 0.795
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]

    with pytest.raises(ConfigError) as e:  # never overwrites
        export_trial(run, out)
    assert e.value.problems[0].key == "--out"


def test_export_errors(tmp_path: Path, tiny_artifact) -> None:
    run = _write_run(tmp_path, _trials())
    with pytest.raises(ConfigError) as e:
        export_trial(run, tmp_path / "o1", trial="t_aa")
    p = e.value.problems[0]
    assert p.key == "--trial" and "did you mean t_a?" in p.fix and "t_f" in p.fix
    with pytest.raises(ConfigError, match="is running, not done"):
        export_trial(run, tmp_path / "o2", trial="t_e")
    with pytest.raises(ConfigError, match="has no exported model"):
        export_trial(run, tmp_path / "o3", trial="t_b")  # done, but its model folder is gone
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))

    infeasible = _write_run(tmp_path / "r2", [_trial("t_d", "done", _cfg(0.7), _metrics(0.7, 1))])
    with pytest.raises(ConfigError) as e:
        export_trial(infeasible, tmp_path / "o4")
    p = e.value.problems[0]
    assert p.key == "--best" and "no trial met the search constraints" in p.message
    assert "accuracy drop 0.1 > 0.02" in p.message and "--trial" in p.fix


def test_export_refuses_a_damaged_artifact(tmp_path: Path, tiny_artifact) -> None:
    """A truncated model is never shipped; a shipped one damaged later fails to load clearly."""
    import shutil

    from orchestrator.compress.artifact import load_artifact
    from orchestrator.errors import CorruptFileError

    src, batch = tiny_artifact
    run = _write_run(tmp_path, _trials())
    weights = run / "trials" / "t_a" / "model" / "model.safetensors"
    shutil.copytree(src, weights.parent)
    weights.write_bytes(src.joinpath("model.safetensors").read_bytes()[:1000])
    out = tmp_path / "export" / "best"
    with pytest.raises(ConfigError) as e:
        export_trial(run, out, trial="t_a")
    p = e.value.problems[0]
    assert p.key == "--trial" and "has a damaged model" in p.message
    assert f"{weights} is truncated or corrupt" in p.message and "export another trial" in p.fix
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))

    shutil.copy(src / "model.safetensors", weights)
    export_trial(run, out, trial="t_a")
    assert torch.equal(_logits(out, batch), _logits(src, batch))
    shipped = out / "model.safetensors"
    shipped.write_bytes(shipped.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match=f"{shipped} is truncated or corrupt"):
        load_artifact(out)


@pytest.mark.parametrize("store", ["file", "s3"])
def test_report_and_export_of_a_run_in_storage(
    store: str, tmp_path: Path, tiny_artifact, monkeypatch: pytest.MonkeyPatch, capsys, request
) -> None:
    """``orchestrator report`` and ``export`` take a storage URI (``file://``, and ``s3://`` on a
    local S3 server): the report files go back to storage, the model comes from there."""
    import html
    import shlex
    import shutil

    from orchestrator import storage
    from orchestrator.cli import main

    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    src, batch = tiny_artifact
    run = _write_run(tmp_path / "store", _trials())
    shutil.copytree(src, run / "trials" / "t_a" / "model")
    if store == "file":
        uri, nothing = f"file://{run}", f"file://{tmp_path}/store/nothing"
    else:
        root = request.getfixturevalue("s3_root")
        uri, nothing = storage.join(root, tmp_path.name, run.name), storage.join(root, "nothing")
        storage.upload(run, uri)

    assert main(["report", uri]) == 0
    out = capsys.readouterr().out
    assert f"report: {storage.join(uri, 'report.html')}" in out and "local copy:" in out
    for name in ("results.parquet", "pareto.parquet", "pareto.png", "report.html"):
        assert storage.kind(storage.join(uri, name)) == "file", name
    page = storage.read_bytes(storage.join(uri, "report.html")).decode()
    best = storage.join(uri, "best")
    command = f"orchestrator export {shlex.quote(uri)} --best --out {shlex.quote(best)}"
    assert html.escape(command) in page

    assert main(["export", uri, "--best", "--out", str(tmp_path / "shipped")]) == 0
    assert torch.equal(_logits(tmp_path / "shipped", batch), _logits(src, batch))
    provenance = json.loads((tmp_path / "shipped" / "trial.json").read_text())
    assert provenance["source"] == storage.join(uri, "trials/t_a/model")
    assert provenance["run_dir"] == uri
    assert main(["export", uri, "--best"]) == 0  # default: <RUN_DIR>/best, in storage
    storage.download(best, tmp_path / "best-back")
    assert torch.equal(_logits(tmp_path / "best-back", batch), _logits(src, batch))
    assert main(["export", uri, "--best"]) == 2  # never overwrites, in storage either
    assert "exists and is not empty" in capsys.readouterr().err

    assert main(["report", nothing]) == 2
    assert "holds no job.yaml" in capsys.readouterr().err


def test_a_record_naming_another_artifact_path_is_not_followed(tmp_path: Path) -> None:
    """``trial.json``'s artifact field goes into a path: only the folder this tool writes."""
    record = _trial("t_a", "done", _cfg(0.3), _metrics(0.79, 1), artifact="../../elsewhere")
    run = _write_run(tmp_path, [record])
    notes: list[str] = []
    (loaded,) = load_trials(run, notes)
    assert loaded["artifact"] is None
    assert any("'../../elsewhere'" in n and "not used" in n for n in notes)
    with pytest.raises(ConfigError, match="has no exported model"):
        export_trial(run, tmp_path / "out", trial="t_a")
    assert not (tmp_path / "out").exists()


def _paired(both: int, worse: int, better: int, neither: int, prefix: str = "eval") -> dict:
    from orchestrator.stats import PairedCounts

    return PairedCounts(both, worse, better, neither).metrics(prefix)


def test_confidence_decides_on_the_one_sided_upper_bound() -> None:
    """Both trials' point drops are within 1 point; only the one measured on enough examples
    is within it with 95 % confidence (its one-sided upper bound)."""
    # 0.5-point drop on 300 examples (6 worse, 4 better) and on 6,000 (60 worse, 30 better).
    few = {**_metrics(0.795, 1e6), **_paired(230, 6, 4, 60), **_paired(230, 6, 4, 60, "test")}
    many = {
        **_metrics(0.795, 1e6),
        **_paired(4700, 60, 30, 1210),
        **_paired(4700, 60, 30, 1210, "test"),
    }
    trials = [_trial("t_few", "done", _cfg(0.3), few), _trial("t_many", "done", _cfg(0.3), many)]
    point = {
        r["trial"]: r
        for r in build_table(trials, _search(max_accuracy_drop=0.01), None).to_pylist()
    }
    assert point["t_few"]["feasible"] and point["t_many"]["feasible"]
    rows = {
        r["trial"]: r
        for r in build_table(
            trials, _search(max_accuracy_drop=0.01, confidence=0.95), None
        ).to_pylist()
    }
    assert rows["t_few"]["accuracy_drop"] == pytest.approx(2 / 300)
    assert rows["t_few"]["accuracy_drop_lo"] < 0 < 0.01 < rows["t_few"]["accuracy_drop_hi"]
    # The one-sided bound lies inside the two-sided interval's upper end.
    assert rows["t_few"]["accuracy_drop"] < rows["t_few"]["accuracy_drop_bound"]
    assert rows["t_few"]["accuracy_drop_bound"] < rows["t_few"]["accuracy_drop_hi"]
    assert rows["t_few"]["feasible"] is False
    assert "upper bound" in rows["t_few"]["violations"]
    assert "(one-sided 95%)" in rows["t_few"]["violations"]
    assert rows["t_many"]["feasible"] is True and rows["t_many"]["accuracy_drop_bound"] < 0.01
    assert rows["t_many"]["held_on_test"] is True and rows["t_many"]["best"]
    text = format_pareto_table(
        build_table(trials, _search(max_accuracy_drop=0.01, confidence=0.95), None)
    )
    assert "held on test (test drop +0.50 [" in text


def test_held_on_test_and_the_rule_in_the_report(tmp_path: Path) -> None:
    """Selected on validation, the report says whether the constraint held on test, and which
    rule selection used."""
    good_val_bad_test = {
        **_metrics(0.80, 1e6),
        **_paired(4700, 40, 35, 1225),  # validation: +0.08 points
        **_paired(4600, 200, 20, 1180, "test"),  # test: +3 points
    }
    run = _write_run(tmp_path, [_trial("t_a", "done", _cfg(0.3), good_val_bad_test)])
    summary = write_report(run)
    assert summary.best == "t_a"
    row = pq.read_table(run / "results.parquet").to_pylist()[0]
    assert row["held_on_test"] is False and row["test_accuracy_drop"] == pytest.approx(0.03)
    html = (run / "report.html").read_text()
    assert "did not hold on test (test drop +3.00 [" in html
    assert "validation accuracy drop (point estimate) is at most 0.02" in html
    # What the interval does not cover, and how to measure it.
    assert 'id="interval-scope"' in html and "orchestrator confirm RUN_DIR --seeds 1 2" in html
    assert "search.confirm_seeds" in html


def _confirmed_run(tmp_path: Path, failed: bool = True) -> Path:
    """A run whose smallest trial t_a (trained with seed 0: +0.08 points on validation) was
    trained again with seeds 1 (+0.08) and 2 (+6.33), and 10, which ``failed``; t_b, twice its
    size, was not trained again. The constraint: at most 2 points (point estimate)."""
    near = {
        **_metrics(0.80, 1e6),
        **_paired(4700, 40, 35, 1225),
        **_paired(3600, 30, 40, 30, "test"),
    }
    far = {
        **_metrics(0.74, 1e6),
        **_paired(4400, 400, 20, 1180),
        **_paired(3600, 40, 30, 30, "test"),
    }
    bigger = {**near, "compress/size_bytes": 2e6, "compress/size_ratio": 2.0}
    trials = [_trial("t_a", "done", _cfg(0.3), near), _trial("t_b", "done", _cfg(0.2), bigger)]
    run = _write_run(tmp_path, trials)
    confirm = {
        "t_a": {
            "2": {"status": "done", "metrics": far, "wall_s": 40.0},
            "1": {"status": "done", "metrics": near, "wall_s": 41.0},
        },
        "t_gone": {"1": {"status": "done", "metrics": near}},  # not a trial of the run
    }
    if failed:
        confirm["t_a"]["10"] = {"status": "error", "error": "training failed: <boom>"}
    (run / "confirm.json").write_text(json.dumps(confirm))
    return run


def test_a_trial_trained_again_with_other_seeds_is_judged_as_trials_are(tmp_path: Path) -> None:
    from orchestrator.results.confirm import confirmations
    from orchestrator.results.report import read_run

    run = read_run(_confirmed_run(tmp_path))
    [c] = confirmations(run.run_dir, run.trials, 0, run.search, run.baseline)
    assert c.trial == "t_a"
    # The trial's own run first, then the seeds in order (10 after 2, not as text).
    assert [r["seed"] for r in c.rows] == [0, 1, 2, 10]
    assert [r["status"] for r in c.rows] == ["done", "done", "done", "error"]
    assert [r["feasible"] for r in c.rows] == [True, True, False, None]
    assert c.rows[2]["accuracy_drop"] == pytest.approx(380 / 6000)
    assert "accuracy drop 0.0633 > 0.02" in c.rows[2]["violations"]
    assert c.rows[3]["error"] == "training failed: <boom>"
    # Pooled over the three finished runs: their mean, and a bound above it.
    mean, bound = c.pooled()
    assert mean == pytest.approx((5 + 5 + 380) / 3 / 6000) and bound > mean
    assert c.held is None  # a run failed: no verdict until it is trained again
    test_mean = 100 * (-10 / 3700 * 2 + 10 / 3700) / 3
    assert c.text() == (
        "t_a, trained with seed 0 in the search and again with seeds 1, 2, 10 (1 run failed): "
        f"validation accuracy drop +2.17 points over the 3 runs, pooled one-sided 95% bound "
        f"{100 * bound:+.2f}; test drop {test_mean:+.2f} points on average (-0.27 to +0.27), "
        "within the constraint in 3 of 3"
    )


def test_the_report_and_the_terminal_show_the_seeds(tmp_path: Path) -> None:
    run = _confirmed_run(tmp_path)
    summary = write_report(run)
    assert len(summary.confirmed) == 1 and summary.confirmed[0].startswith("t_a, trained with")
    html = (run / "report.html").read_text()
    assert 'id="confirm-title"' in html and 'id="confirm-t_a"' in html
    assert "validation accuracy drop +2.17 points over the 3 runs" in html
    assert "training failed: &lt;boom&gt;" in html  # escaped
    assert "t_gone" not in html
    text = format_pareto_table(pq.read_table(run / "results.parquet"), summary.confirmed)
    assert text.splitlines()[-1].startswith("trained again with other seeds: t_a, trained with")


def test_a_trial_that_breaks_the_constraints_with_another_seed_is_not_selected(
    tmp_path: Path,
) -> None:
    """t_a is the smallest feasible trial, but over its seeds its mean drop is 2.17 points, more
    than 2: t_b is selected and exported instead; trained again within the constraint, t_b says
    so."""
    from orchestrator.results.export import finished_trial
    from orchestrator.results.report import read_run

    run = _confirmed_run(tmp_path, failed=False)
    summary = write_report(run)
    assert summary.best == "t_b"
    rows = {r["trial"]: r for r in pq.read_table(run / "results.parquet").to_pylist()}
    assert rows["t_a"]["feasible"] and rows["t_a"]["confirmed"] is False
    assert rows["t_b"]["confirmed"] is None and rows["t_b"]["best"]
    assert finished_trial(read_run(run), None, "export", "")[0] == "t_b"
    html = (run / "report.html").read_text()
    assert (
        "It is not confirmed over other seeds; passed over: t_a, not within the constraint "
        "over the seeds it was trained again with (below)."
    ) in html
    confirm = json.loads((run / "confirm.json").read_text())
    t_b = json.loads((run / "trials" / "t_b" / "trial.json").read_text())["metrics"]
    confirm["t_b"] = {"1": {"status": "done", "metrics": t_b, "wall_s": 1.0}}
    (run / "confirm.json").write_text(json.dumps(confirm))
    assert write_report(run).best == "t_b"
    html = (run / "report.html").read_text()
    assert "Trained again with other seeds, it is within the constraint over them" in html
    # With t_b infeasible too, there is nothing to select, and the answer says why t_a is not.
    confirm["t_b"]["2"] = confirm["t_a"]["2"]
    (run / "confirm.json").write_text(json.dumps(confirm))
    assert write_report(run).best is None
    html = (run / "report.html").read_text()
    assert "t_a: not within the constraint over the seeds it was trained again with" in html
    # An unreadable confirm.json costs a note, not the report.
    (run / "confirm.json").write_text("{not json")
    summary = write_report(run)
    assert not summary.confirmed and any("confirm.json is unreadable" in n for n in summary.notes)


def test_the_search_trains_the_next_selected_trial_when_one_breaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``search.confirm_seeds``: the driver trains the selected trial again; t_a is not within
    the constraint over seeds 1 and 2, so t_b is selected and trained again in turn, and holds.
    Training is replaced by the figures each seed's run would record (the real runs: the
    integration test of the debug search)."""
    from orchestrator.results.report import read_run
    from orchestrator.search import driver
    from orchestrator.storage import RunFolder

    run = _confirmed_run(tmp_path, failed=False)
    confirm = json.loads((run / "confirm.json").read_text())
    measured = {"t_a": confirm.pop("t_a")}
    measured["t_b"] = {"1": dict(measured["t_a"]["1"]), "2": dict(measured["t_a"]["1"])}
    (run / "confirm.json").write_text(json.dumps(confirm))
    trained = []

    def fake_confirm_trial(folder: RunFolder, trial: str, seeds: list[int], address: Any):
        trained.append((trial, seeds))
        record = json.loads((folder.local / "confirm.json").read_text())
        record[trial] = {str(s): measured[trial][str(s)] for s in seeds}
        (folder.local / "confirm.json").write_text(json.dumps(record))

    monkeypatch.setattr(driver, "confirm_trial", fake_confirm_trial)
    spec = read_run(run).spec
    search = spec.search.model_copy(update={"confirm_seeds": [1, 2]})
    spec = spec.model_copy(update={"search": search})
    folder = RunFolder(str(run))
    summary = driver._confirm_selected(spec, folder, write_report(run), None)
    assert trained == [("t_a", [1, 2]), ("t_b", [1, 2])] and summary.best == "t_b"
    out = capsys.readouterr().out
    assert "trained again with other seeds: t_a, trained with seed 0" in out
    assert "trained again with other seeds: t_b, trained with seed 0" in out
    # With one candidate only, t_b is selected without being trained again, and that is said.
    (run / "confirm.json").write_text(json.dumps(confirm))
    trained.clear()
    one = search.model_copy(update={"confirm_candidates": 1})
    spec = spec.model_copy(update={"search": one})
    summary = driver._confirm_selected(spec, folder, write_report(run), None)
    assert trained == [("t_a", [1, 2])] and summary.best == "t_b"
    assert "selected: t_b, not trained with other seeds: the 1 selected before it were not" in (
        capsys.readouterr().out
    )


def test_confirm_refuses_bad_seeds_and_trials_before_it_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from orchestrator.cli import main

    run = _write_run(tmp_path, _trials())
    before = sorted(p.name for p in run.iterdir())
    cases = [
        (["--seeds", "0", "1"], "--seeds = [0, 1]: holds 0, the recipe's own train.seed"),
        (["--seeds", "1", "1"], "same model again. Fix: give other seeds, each once"),
        (["--seeds", "-1"], "holds a negative seed"),
        (["--seeds", "1", "--trial", "t_zz"], "--trial = 't_zz': no such trial in the run"),
        (["--seeds", "1", "--trial", "t_e"], "is running, not done, so there is no result"),
    ]
    for extra, message in cases:
        assert main(["confirm", str(run), *extra]) == 2
        assert message in capsys.readouterr().err
    # Without --trial, the selected one; none is selected here when every trial is infeasible.
    bad = _write_run(tmp_path / "bad", [_trial("t_d", "done", _cfg(0.7), _metrics(0.70, 1e6))])
    assert main(["confirm", str(bad), "--seeds", "1"]) == 2
    assert "--trial = None: no trial met the search constraints" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written


def test_confidence_outside_the_open_interval_is_refused() -> None:
    for value in (0, 0.5, 1, 1.5):
        with pytest.raises(ConfigError) as e:
            _search(max_accuracy_drop=0.01, confidence=value)
        assert e.value.problems[0].key == "search.constraints.confidence"
    with pytest.raises(ConfigError) as e:
        _search(confidence=0.95)
    assert e.value.problems[0].key == "search.constraints.confidence"
    assert "max_accuracy_drop" in e.value.problems[0].fix


def test_the_answer_compares_with_the_dense_model_measured_beside_the_trial() -> None:
    from orchestrator.results.html import _answer_rows

    best = {
        "eval/accuracy": 0.8,
        "perf/latency_ms_b32": 10.0,
        "perf/dense_latency_ms_b32": 40.0,  # timed side by side, in the same runtime
        "perf/speedup": 4.0,
        "compress/size_bytes": 2e6,
    }
    baseline = {"eval/accuracy": 0.81, "perf/latency_ms_b32": 55.0, "compress/size_bytes": 9e6}
    rows = _answer_rows(best, baseline)
    latency = next(r for r in rows if "latency" in r)
    assert "40.00" in latency and "55.00" not in latency and "4.00x faster" in latency
    size = next(r for r in rows if "size on disk" in r)
    assert "9.00" in size  # no side-by-side dense size in this trial: the baseline's


def _lm_metrics(ratio: float, spread: float, size: float, prefix_ratio: float | None = None):
    """A language model's trial: perplexity ratio to the dense model on validation (test:
    ``prefix_ratio``) with a 95 % interval of +-``spread`` in log space."""
    out = {
        "compress/size_bytes": size,
        "compress/dense_size_bytes": 9.0e6,
        "compress/size_ratio": 9.0e6 / size,
        "perf/latency_ms_b1": 2.0,
        "perf/dense_latency_ms_b1": 2.5,
        "perf/speedup": 1.25,
        "perf/decode_tokens_per_s": 400.0,
        "perf/dense_decode_tokens_per_s": 500.0,
        "perf/decode_speedup": 0.8,
    }
    for prefix, r in (("eval", ratio), ("test", prefix_ratio or ratio)):
        out |= {
            f"{prefix}/perplexity": 40.0 * r,
            f"{prefix}/perplexity_ratio": r,
            f"{prefix}/perplexity_ratio_lo": r * math.exp(-spread),
            f"{prefix}/perplexity_ratio_hi": r * math.exp(spread),
        }
    return out


def test_a_language_model_search_is_scored_on_its_perplexity_increase(tmp_path: Path) -> None:
    """The decoder search's table, feasibility, terminal table, report and plot speak of the
    paired perplexity increase in %, with its interval; the constraint decides on the one-sided
    upper bound at the job's confidence (0.9), recomputed from the reported 95 % interval."""
    spec = load_job(ROOT / "jobs/debug/decoder_search.yaml", [f"output.dir={tmp_path}"])
    search = spec.search.model_copy(
        update={
            "constraints": spec.search.constraints.model_copy(
                update={"max_perplexity_increase": 0.1}
            )
        }
    )
    trials = [
        # 5 % higher, tightly measured: feasible; 8 % on test: held.
        _trial("t_a", "done", {}, _lm_metrics(1.05, 0.01, 3e6, 1.08)),
        # 8 % higher but so noisy that the 90 % one-sided bound passes 10 %.
        _trial("t_b", "done", {}, _lm_metrics(1.08, 0.05, 2e6)),
        # 12 % higher: infeasible however measured.
        _trial("t_c", "done", {}, _lm_metrics(1.12, 0.01, 1e6)),
    ]
    baseline = {"eval/perplexity": 40.0, "compress/size_bytes": 9.0e6, "perf/latency_ms_b1": 2.5}
    table = build_table(trials, search, baseline)
    rows = {r["trial"]: r for r in table.to_pylist()}
    assert "accuracy_drop" not in table.column_names
    assert rows["t_a"]["perplexity_increase"] == pytest.approx(0.05)
    from statistics import NormalDist

    z90, z95 = NormalDist().inv_cdf(0.9), NormalDist().inv_cdf(0.975)
    assert rows["t_b"]["perplexity_increase_bound"] == pytest.approx(
        1.08 * math.exp(0.05 * z90 / z95) - 1
    )
    assert [rows[t]["feasible"] for t in ("t_a", "t_b", "t_c")] == [True, False, False]
    assert rows["t_b"]["violations"].startswith("perplexity increase upper bound 0.")
    assert rows["t_c"]["violations"].startswith("perplexity increase upper bound 0.1")
    assert rows["t_a"]["held_on_test"] is True and rows["t_a"]["best"] is True
    text = format_pareto_table(table)
    assert "val ppl +% [95 % interval] <= bound" in text and "ms prefill" in text
    assert "held on test (test perplexity increase +8.00 [" in text

    run = tmp_path / spec.name
    (run / "trials").mkdir(parents=True)
    (run / "job.yaml").write_text(dump_job(spec.model_copy(update={"search": search})))
    (run / "baseline.json").write_text(json.dumps(baseline))
    for t in trials:
        (run / "trials" / t["trial"]).mkdir()
        (run / "trials" / t["trial"] / "trial.json").write_text(json.dumps(t))
    summary = write_report(run)
    assert summary.best == "t_a"
    html = (run / "report.html").read_text()
    assert "validation perplexity" in html and "greedy decoding (tokens/s)" in html
    assert "0.80x faster" in html  # decoding, against the dense model timed beside it
    assert "the perplexity increase constraint held on test" in html
    assert "paired validation perplexity increase is at most 0.1 with 90% confidence" in html
    assert (run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
