"""A torn Tune snapshot (trial list and searcher saved at different moments, as a driver killed
during Tune's background copy leaves them) is made whole before ``--resume``: the searcher is
brought to exactly the state it would have had, so the resumed search draws what the unbroken
one would have drawn, and no recipe twice. Real Tune ``SearchGenerator`` over a real Optuna
study, saved and restored by Tune's own code; no Ray cluster is needed for that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config.search import SearchConfig
from orchestrator.search import space as space_lib
from orchestrator.search.snapshot import reconcile

pytestmark = pytest.mark.unit

SESSION = "2026-11-30_10-00-00"
SEARCH = SearchConfig.model_validate(
    {
        "space": {
            "compress.prune.sparsity": {"uniform": [0.2, 0.7]},
            "compress.quantize": {"choice": {"off": None, "int8": {"method": "dynamic_int8"}}},
        },
        "objectives": [
            {"metric": "eval/accuracy", "mode": "max"},
            {"metric": "compress/size_bytes", "mode": "min"},
        ],
        "num_samples": 4,
        "seed": 3,
    }
)
RESULT = {"eval/accuracy": 0.8, "compress/size_bytes": 1000.0}


def _generator():
    from ray.tune.search.search_generator import SearchGenerator

    generator = SearchGenerator(space_lib.searcher(SEARCH, 1))
    generator.searcher.set_search_properties(None, None, space_lib.param_space(SEARCH))
    generator._total_samples = SEARCH.samples
    return generator


def _draw(generator, tid: str) -> dict:
    config = generator.searcher.suggest(tid)
    generator._counter += 1
    return config


def _restored(folder: Path):
    from ray.tune.search.search_generator import SearchGenerator

    generator = SearchGenerator(space_lib.searcher(SEARCH, 1))
    generator.restore_from_dir(str(folder))
    return generator


def _write_list(folder: Path, trials: list[tuple[str, str, dict]]) -> None:
    data = [
        [
            json.dumps({"trial_id": tid, "status": status, "config": config}),
            json.dumps({"last_result": RESULT if status == "TERMINATED" else {}}),
        ]
        for tid, status, config in trials
    ]
    (folder / f"experiment_state-{SESSION}.json").write_text(
        json.dumps({"trial_data": data, "runner_data": {}, "stats": {}})
    )


def test_a_trial_list_ahead_of_the_searcher_draws_no_recipe_twice(tmp_path: Path) -> None:
    truth = _generator()
    a = _draw(truth, "a")
    truth.searcher.on_trial_complete("a", result=RESULT)
    truth.save_to_dir(str(tmp_path), session_str=SESSION)  # the searcher's copy: before b
    b = _draw(truth, "b")
    _write_list(tmp_path, [("a", "TERMINATED", a), ("b", "RUNNING", b)])  # the list: after b

    notes = reconcile(str(tmp_path), SEARCH, 1)
    assert notes == ["the searcher drew trial b again (its snapshot was older)"]
    restored = _restored(tmp_path)
    assert restored._counter == 2
    # Tune continues b; when it ends, the next draw is the unbroken search's, not b's recipe.
    for generator in (truth, restored):
        generator.searcher.on_trial_complete("b", result=RESULT)
    c = _draw(restored, "c")
    assert c == _draw(truth, "c") and c != b
    # Made whole once, the snapshot is left alone.
    assert reconcile(str(tmp_path), SEARCH, 1) == []


def test_a_searcher_ahead_of_the_trial_list_gives_its_draw_back(tmp_path: Path) -> None:
    generator = _generator()
    a = _draw(generator, "a")
    generator.searcher.on_trial_complete("a", result=RESULT)
    _draw(generator, "b")  # drawn, but the list never held it
    generator.save_to_dir(str(tmp_path), session_str=SESSION)
    _write_list(tmp_path, [("a", "TERMINATED", a)])

    notes = reconcile(str(tmp_path), SEARCH, 1)
    assert len(notes) == 1 and "draw b never reached the trial list" in notes[0]
    restored = _restored(tmp_path)
    # Its sample is drawn anew, and its slot is free: the limiter does not wait for b.
    assert restored._counter == 1
    assert restored.searcher.suggest("c") is not None


def test_a_trial_finished_in_the_list_and_running_for_the_searcher_is_told(tmp_path: Path) -> None:
    truth = _generator()
    a = _draw(truth, "a")
    truth.save_to_dir(str(tmp_path), session_str=SESSION)  # a still running here
    truth.searcher.on_trial_complete("a", result=RESULT)
    b = _draw(truth, "b")
    _write_list(tmp_path, [("a", "TERMINATED", a), ("b", "RUNNING", b)])

    notes = reconcile(str(tmp_path), SEARCH, 1)
    assert notes[0] == "the searcher was told that trial a ended"
    restored = _restored(tmp_path)
    assert restored._counter == 2
    for generator in (truth, restored):
        generator.searcher.on_trial_complete("b", result=RESULT)
    assert _draw(restored, "c") == _draw(truth, "c")


def test_a_whole_snapshot_and_other_searchers_are_left_alone(tmp_path: Path) -> None:
    generator = _generator()
    a = _draw(generator, "a")
    generator.save_to_dir(str(tmp_path), session_str=SESSION)
    _write_list(tmp_path, [("a", "RUNNING", a)])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert reconcile(str(tmp_path), SEARCH, 1) == []
    random = SEARCH.model_copy(update={"algorithm": "random"})
    assert reconcile(str(tmp_path), random, 1) == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
