"""A torn Tune snapshot made whole again before ``--resume`` restores it.

Ray Tune saves an experiment as separate files: the trial list (``experiment_state-*.json``),
the search generator (``search_gen_state-*.json``, a pickle: how many trials it drew, which
are live) and the searcher (``searcher-state-*.pkl``: here the Optuna study). It writes them
to a staging folder at every step of its loop and copies that folder to the run's storage in
the background, file by file, while the next step may already overwrite the staging files
(checked on Ray 2.60, ``tune/execution/experiment_state.py``). A driver killed during a copy
can therefore leave a trial list from one moment beside a searcher from another. Restored as it is:

- the trial list ahead (it holds a trial the searcher had not drawn yet): Tune continues that
  trial *and* the searcher, whose random state is from before the draw, draws the same recipe
  again as a new trial: the recipe runs twice and one trial too many runs;
- the searcher ahead (it drew a trial the list does not hold): the searcher waits for a trial
  Tune never runs, holding one of its concurrent slots for good.

``reconcile`` makes them agree. A trial the list holds and the searcher lacks is drawn again
by the restored searcher under its own id: the draw is deterministic, so it gives the trial's
recipe, which is checked (when it does not, the trial is dropped from the list and drawn anew,
as a trial started after the last snapshot is). A draw the list lacks is told to the searcher as
failed and its sample given back, so the search draws a replacement. Only the Optuna searcher
(the default) is reconciled; the random and grid generators are restored as Tune saved them.
The files read here are Tune's own pickles, which ``Tuner.restore`` loads right after anyway
(README, "What --resume trusts").
"""

from __future__ import annotations

import fnmatch
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from orchestrator import storage
from orchestrator.config.search import SearchConfig

EXPERIMENT = "experiment_state-*.json"
GENERATOR = "search_gen_state-*.json"  # a pickle, despite its name
SEARCHER = "searcher-state-*.pkl"


def _newest(names: list[str], pattern: str) -> str | None:
    """The newest file of ``pattern``: Tune names them by session time and takes the maximum."""
    matching = fnmatch.filter(names, pattern)
    return max(matching) if matching else None


def _session(name: str) -> str:
    """``search_gen_state-<session>.json`` -> ``<session>``."""
    return re.sub(r"^search_gen_state-(.*)\.json$", r"\1", name)


def tune_trials(state: dict) -> list[dict[str, Any]]:
    """The trials of an experiment state: ``trial_id``, ``status``, ``config`` and
    ``last_result`` each."""
    out = []
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        trial["last_result"] = json.loads(entry[1]).get("last_result") or {}
        out.append(trial)
    return out


def reconcile(experiment: str, search: SearchConfig, parallel: int) -> list[str]:
    """Make the snapshot in ``experiment`` (a folder or URI) agree with itself; returns what was
    changed, in words (empty when the snapshot was whole)."""
    if search.algorithm != "optuna":
        return []
    from ray.tune.search.search_generator import SearchGenerator

    from orchestrator.search import space as space_lib

    names = [Path(p).name for p, _, _ in storage.walk(experiment) if "/" not in p.strip("/")]
    found = {p: _newest(names, p) for p in (EXPERIMENT, GENERATOR, SEARCHER)}
    if None in found.values():
        return []  # nothing drawn yet, or not a snapshot this code knows: Tune decides
    state = json.loads(storage.read_bytes(storage.join(experiment, found[EXPERIMENT])))
    with tempfile.TemporaryDirectory() as tmp:
        for name in (found[GENERATOR], found[SEARCHER]):
            (Path(tmp) / name).write_bytes(storage.read_bytes(storage.join(experiment, name)))
        generator = SearchGenerator(space_lib.searcher(search, parallel))
        generator.restore_from_dir(tmp)
        notes, dropped = align(generator, tune_trials(state))
        if not notes:
            return []
        # Saved under the session of the files read, so they are replaced, not shadowed.
        generator.save_to_dir(tmp, session_str=_session(found[GENERATOR]))
        for name in (found[GENERATOR], found[SEARCHER]):
            storage.write_bytes(storage.join(experiment, name), (Path(tmp) / name).read_bytes())
    if dropped:
        state["trial_data"] = [
            e for e in state["trial_data"] if json.loads(e[0])["trial_id"] not in dropped
        ]
        storage.write_bytes(storage.join(experiment, found[EXPERIMENT]), json.dumps(state).encode())
    return notes


def _optuna(generator: Any) -> Any:
    searcher = generator.searcher
    while hasattr(searcher, "searcher"):  # Tune's ConcurrencyLimiter
        searcher = searcher.searcher
    return searcher


FINISHED = ("TERMINATED", "ERROR")


def _tell(generator: Any, trial: dict[str, Any]) -> None:
    """Tell the searcher how a trial the list holds as finished ended."""
    error = trial["status"] == "ERROR"
    generator.searcher.on_trial_complete(
        trial["trial_id"], result=None if error else trial["last_result"], error=error
    )


def align(generator: Any, trials: list[dict[str, Any]]) -> tuple[list[str], set[str]]:
    """Bring the restored ``generator`` (a ``SearchGenerator`` over Optuna) in line with the
    trial list ``trials``. Returns the notes and the ids of trials to drop from the list."""
    optuna = _optuna(generator)
    listed = {t["trial_id"]: t for t in trials}
    notes: list[str] = []
    dropped: set[str] = set()
    # Finished in the list, still running for the searcher: it would wait for them for good.
    for tid, trial in listed.items():
        if tid in optuna._ot_trials and tid not in optuna._completed_trials:
            if trial["status"] in FINISHED:
                _tell(generator, trial)
                notes.append(f"the searcher was told that trial {tid} ended")
    # Drawn by the searcher, never in the list: Tune will not run it.
    for tid in sorted(set(optuna._ot_trials) - set(listed)):
        if tid in optuna._completed_trials:
            continue
        generator.searcher.on_trial_complete(tid, error=True)
        generator._counter -= 1
        generator._finished = False
        notes.append(
            f"the searcher's draw {tid} never reached the trial list: told as failed, and its "
            "sample drawn anew"
        )
    # In the list, not yet drawn by the searcher: draw it again (deterministic) under its id.
    for tid, trial in listed.items():
        if tid in optuna._ot_trials:
            continue
        drawn = generator.searcher.suggest(tid)
        if drawn == trial["config"]:
            generator._counter += 1
            if trial["status"] in FINISHED:
                _tell(generator, trial)
            notes.append(f"the searcher drew trial {tid} again (its snapshot was older)")
            continue
        if drawn is not None:
            generator.searcher.on_trial_complete(tid, error=True)
        if trial["status"] == "TERMINATED":
            # A finished trial stays: the searcher learns its recipe and result as given.
            metrics = optuna.metric if isinstance(optuna.metric, list) else [optuna.metric]
            values = [trial["last_result"].get(m) for m in metrics]
            optuna.add_evaluated_point(
                trial["config"], values if isinstance(optuna.metric, list) else values[0]
            )
            generator._counter += 1
            notes.append(f"the searcher was given finished trial {tid} as evaluated")
            continue
        dropped.add(tid)
        notes.append(
            f"trial {tid} is dropped from the trial list and its sample drawn anew: the "
            "searcher's snapshot did not hold it and could not draw it again"
        )
    return notes, dropped
