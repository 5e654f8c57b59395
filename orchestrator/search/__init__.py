"""``orchestrator search``: Ray Tune over compression recipes, split by concern:

- ``driver``: the command (checks, baseline, the Tune experiment, the final report);
- ``trial``: one trial, a Tune function trainable fitting one ``TorchTrainer``;
- ``baseline``: the dense model every trial starts from and is compared with;
- ``callbacks``: the driver's trial records and the report refreshed as trials finish;
- ``records``: those records, and the checks a run folder passes before it is resumed;
- ``names``: trial names from the recipe; ``space``: the search section in Tune's vocabulary.
"""

from orchestrator.search.driver import TUNE_NAME, search
from orchestrator.search.records import TRIALS
from orchestrator.search.trial import train_driver_fn

__all__ = ["TRIALS", "TUNE_NAME", "search", "train_driver_fn"]
