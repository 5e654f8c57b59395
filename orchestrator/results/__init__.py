"""Results of a search: the trial table, the Pareto front, the plot, the HTML report, export.

Reads a run directory (docs/contracts.md, "Run directory") written by ``orchestrator.search``
and needs no Ray, so a report can be rebuilt and a model exported on any machine that has the
folder.

- ``pareto``: the non-dominated rule;
- ``table``: trial records -> a pyarrow table with feasibility, violations and the front;
- ``plot``: ``pareto.png``; ``html``: ``report.html``;
- ``report``: ``write_report`` (all four files, atomically), ``write_run_report`` (the same for
  a run folder, copied to storage when the run is in one);
- ``export``: ``export_trial`` (one trial's compressed model, for ``orchestrator export``).
"""

from orchestrator.results.export import export_trial
from orchestrator.results.pareto import pareto_front
from orchestrator.results.report import ReportSummary, read_run, write_report, write_run_report
from orchestrator.results.table import (
    best_trial,
    build_table,
    check_constraints,
    format_pareto_table,
    load_baseline,
    load_trials,
    recipe,
)

__all__ = [
    "ReportSummary",
    "best_trial",
    "build_table",
    "check_constraints",
    "export_trial",
    "format_pareto_table",
    "load_baseline",
    "load_trials",
    "pareto_front",
    "read_run",
    "recipe",
    "write_report",
    "write_run_report",
]
