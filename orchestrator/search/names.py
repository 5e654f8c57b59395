"""Trial names from an ordinal and the sampled recipe (``t003_sparsity0.42_quantize-int8``).
Names derive from the config, never from timestamps: resume finds trials by name."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.config.search import SearchConfig, ignored, sampled_values, switched_off
from orchestrator.search.records import NAMES, trial_ordinal
from orchestrator.search.space import trial_name
from orchestrator.storage import RunFolder


class TrialNamer:
    """Kept per Tune trial id in ``trials/names.json``. Tune deep-copies the name creator for
    every trial and calls it again for trials it restores, so the mapping lives on disk: a
    resumed trial keeps its name (and with it its folder and its Train checkpoints), a new one
    takes the next ordinal."""

    def __init__(self, run_dir: RunFolder, search: SearchConfig) -> None:
        self.run_dir = run_dir
        self.path = run_dir.local / NAMES
        self.search = search

    def __call__(self, trial: Any) -> str:
        try:
            names: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            names = {}
        if trial.trial_id not in names:
            used = [trial_ordinal(n) for n in names.values()]
            index = 1 + max((i for i in used if i is not None), default=-1)
            sampled = sampled_values(self.search.space, trial.config)
            # Keys under a section the trial switched off are not part of its recipe.
            off = switched_off(self.search.space, sampled)
            recipe = {k: v for k, v in sampled.items() if not ignored(k, off)}
            names[trial.trial_id] = trial_name(index, recipe)
            self.run_dir.write_text(NAMES, json.dumps(names, indent=2, sort_keys=True))
        return names[trial.trial_id]
