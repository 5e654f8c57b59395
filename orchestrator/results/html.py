"""``report.html``: one self-contained page a person opens to see where a search stands.

Self-contained (the plot is a base64 data URI, the style is inline, nothing is fetched) so it
can be copied off a cluster head node, mailed or opened from a file share as is. Every value
from the run directory is HTML-escaped: trial errors and job strings are arbitrary text.
"""

from __future__ import annotations

import base64
import shlex
from html import escape
from pathlib import Path
from typing import Any

import pyarrow as pa

from orchestrator.config.search import TRIAL_METRICS, SearchConfig
from orchestrator.results.confirm import Confirmation
from orchestrator.results.quality import (
    ACCURACY_DROP,
    PERPLEXITY_INCREASE,
    Quality,
    quality_of,
    quality_of_columns,
)
from orchestrator.results.table import (
    MB,
    STATUSES,
    held_text,
    not_selected_why,
    row_drop_text,
    selection_rule,
)
from orchestrator.storage import join

REFRESH_S = 15
# The list of all trials comes in pages of this many rows, each folded away but the first, so
# the page stays light at thousands of trials; every trial is in results.parquet too.
TRIAL_PAGE = 500
# A search where nothing was feasible lists what each trial broke: the first this many.
BROKEN_SHOWN = 50
_STATUS_WORDS = {
    "done": "done",
    "running": "running",
    "stopped": "stopped early",
    "error": "failed",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1300px; color: #222; }
h1 { margin-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td { overflow-wrap: anywhere; }
#trials-section table { font-size: 0.8em; }
#answer table { font-size: 1em; }
#answer td.change { font-weight: bold; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.infeasible td { color: #888; }
tr.pareto td:first-child { font-weight: bold; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
pre.error { background: #fff0f0; margin: 0; white-space: pre-wrap; }
.partial { background: #fff6d6; border: 1px solid #e0c060; padding: 0.5em 0.8em; }
.note { color: #555; }
img { max-width: 100%; }
"""

# Marks the body once the plot image is decoded, so a headless browser test can tell a broken
# data URI from a good one (a failed image load prints nothing to the console), and whether
# the page fits its window's width (no sideways scrolling).
_SCRIPT = """
(function () {
  var img = document.getElementById("pareto-plot");
  function mark() {
    if (img.naturalWidth > 0) { document.body.dataset.plotLoaded = "1"; }
  }
  if (img.complete) { mark(); } else { img.addEventListener("load", mark); }
  var doc = document.documentElement;
  document.body.dataset.fitsWidth = doc.scrollWidth <= doc.clientWidth ? "1" : "0";
})();
"""


def _num(v: Any, fmt: str, scale: float = 1.0) -> str:
    return "&ndash;" if v is None else escape(format(v / scale, fmt))


def _value(v: float) -> str:
    """A baseline metric: big counts (bytes, parameters) with thousands separators."""
    return f"{v:,.0f}" if abs(v) >= 1e4 and float(v).is_integer() else f"{v:.6g}"


def _td(text: str, num: bool = False) -> str:
    return f'<td class="num">{text}</td>' if num else f"<td>{text}</td>"


def _table(html_id: str, head: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """A table from already-escaped cells; ``rows`` are (css class, cells)."""
    out = [f'<table id="{html_id}">', "<thead><tr>"]
    out += [f"<th>{escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for css, cells in rows:
        out.append(f'<tr class="{css}">' + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def status_counts(table: pa.Table) -> dict[str, int]:
    statuses = table.column("status").to_pylist() if table.num_rows else []
    return {s: statuses.count(s) for s in STATUSES}


def status_lines(counts: dict[str, int], running: bool) -> tuple[str, str | None]:
    """The status line, and the partial-results note (None when every trial finished)."""
    total = sum(counts.values())
    line = f"{total} trial{'s' if total != 1 else ''}: " + ", ".join(
        f"{counts[s]} {_STATUS_WORDS[s]}" for s in STATUSES
    )
    unfinished = counts["running"] + counts["error"] + counts["stopped"]
    if not unfinished and not running:
        return line, None
    parts = []
    if counts["running"]:
        parts.append(
            f"{counts['running']} still running"
            if running
            else f"{counts['running']} were running when the search stopped (interrupted; "
            "`orchestrator search JOB.yaml --resume` continues it)"
        )
    if counts["error"]:
        parts.append(f"{counts['error']} failed (see the errors in the trial table)")
    if counts["stopped"]:
        parts.append(f"{counts['stopped']} stopped early by the scheduler")
    if running and not parts:
        parts.append("the search is still starting trials")
    return line, "Partial results: " + "; ".join(parts) + "."


def _baseline_section(baseline: dict[str, float] | None, q: Quality) -> str:
    if baseline is None:
        return (
            f'<p class="note">No dense baseline yet (baseline.json is missing): {q.words}s '
            f"are unknown and trials cannot meet {q.constraint}.</p>"
        )
    keys = [k for k in TRIAL_METRICS if k in baseline] + sorted(set(baseline) - set(TRIAL_METRICS))
    rows = [("", [_td(escape(k)), _td(escape(_value(baseline[k])), num=True)]) for k in keys]
    return _table("baseline-table", ["metric", "dense"], rows)


def _metric_cells(r: dict[str, Any]) -> list[str]:
    q = quality_of_columns(r)
    return [
        _td(_num(r.get(q.metric), q.metric_fmt), num=True),
        _td(_num(r.get(q.test_metric), q.metric_fmt), num=True),
        _td(escape(row_drop_text(r)), num=True),
        _td(escape(row_drop_text(r, "test_")), num=True),
        _td(_num(r.get("compress/size_bytes"), ".3f", MB), num=True),
        _td(_num(r.get("compress/weights_bytes"), ".3f", MB), num=True),
        _td(_num(r.get("compress/size_ratio"), ".2f"), num=True),
        _td(_num(r.get(q.latency), ".2f"), num=True),
        _td(_num(r.get("perf/speedup"), ".2f"), num=True),
    ]


def _metric_head(q: Quality) -> list[str]:
    return [
        q.metric,
        q.test_metric,
        f"validation {q.words}, {q.unit} [95 % interval] <= bound",
        f"test {q.words}, {q.unit} [95 % interval]",
        "size MB (on disk)",
        "weights MB",
        "size ratio (x smaller)",
        f"latency ms ({q.latency_words})",
        "speedup",
    ]


def _answer_rows(best: dict[str, Any], baseline: dict[str, float] | None) -> list[str]:
    """The selected recipe against the dense model, in words: accuracy or perplexity
    (validation, test), size on disk, latency. The dense size and latency are the ones the trial
    measured side by side with its own (``compress/dense_size_bytes``,
    ``perf/dense_latency_ms_b32``: same machine, threads and runtime), else the baseline's."""
    q = quality_of_columns(best)
    dense = baseline or {}
    side_by_side = {
        "compress/size_bytes": "compress/dense_size_bytes",
        q.latency: q.latency.replace("perf/latency", "perf/dense_latency"),
        "perf/decode_tokens_per_s": "perf/dense_decode_tokens_per_s",
    }

    def dense_value(key: str) -> float | None:
        own = best.get(side_by_side.get(key, ""))
        return own if own is not None else dense.get(key)

    def row(label: str, key: str, fmt: str, change: str, scale: float = 1.0) -> str:
        return (
            f"<tr><td>{escape(label)}</td>"
            + _td(_num(dense_value(key), fmt, scale), num=True)
            + _td(_num(best.get(key), fmt, scale), num=True)
            + f'<td class="num change">{escape(change)}</td></tr>'
        )

    def times(key: str, word: str) -> str:
        v = best.get(key)
        return "-" if v is None else f"{v:.2f}x {word}"

    score = q.metric.split("/", 1)[1]
    rows = [
        row(
            f"validation {score}",
            q.metric,
            q.metric_fmt,
            f"{q.loss_word} {row_drop_text(best)} {q.unit}",
        ),
        row(
            f"test {score}",
            q.test_metric,
            q.metric_fmt,
            f"{q.loss_word} {row_drop_text(best, 'test_')} {q.unit}",
        ),
        row(
            "size on disk (MB)",
            "compress/size_bytes",
            ".2f",
            times("compress/size_ratio", "smaller"),
            MB,
        ),
        row(f"latency, {q.latency_words} (ms)", q.latency, ".2f", times("perf/speedup", "faster")),
    ]
    if q is PERPLEXITY_INCREASE:
        rows.append(
            row(
                "greedy decoding (tokens/s)",
                "perf/decode_tokens_per_s",
                ".1f",
                times("perf/decode_speedup", "faster"),
            )
        )
    return rows


def _answer_section(
    best: dict[str, Any] | None,
    rows: list[dict[str, Any]],
    baseline: dict[str, float] | None,
    run_dir: str,
    search: SearchConfig,
) -> str:
    """The answer first: the selected recipe, its figures against the dense model, whether it
    held on test, and the command that exports it; or why there is none."""
    sel = search.selection
    if best is None:
        done = [r for r in rows if r["status"] == "done"]
        if not done:
            return "<p>No trial has finished yet, so there is no selected recipe.</p>"
        broken = "".join(
            f"<li>{escape(r['trial'])}: {escape(not_selected_why(r, sel.metric))}</li>"
            for r in done[:BROKEN_SHOWN]
        )
        more = len(done) - BROKEN_SHOWN
        if more > 0:
            broken += f"<li>and {more} more (the violations column of the trials below)</li>"
        return (
            "<p>No finished trial met the constraints, so there is nothing to export. "
            f"What each broke:</p><ul>{broken}</ul>"
        )
    command = (
        f"orchestrator export {shlex.quote(str(run_dir))} --best "
        f"--out {shlex.quote(join(run_dir, 'best'))}"
    )
    head = "<tr><th></th><th>dense</th><th>selected</th><th>change</th></tr>"
    return (
        f"<p>Selected (best feasible on {escape(sel.metric)}, {escape(sel.mode)}): "
        f"<strong>{escape(best['trial'])}</strong> &mdash; "
        f"<code>{escape(best.get('recipe') or '')}</code></p>"
        f'<table id="answer-table">{head}{"".join(_answer_rows(best, baseline))}</table>'
        f'<p id="held-on-test">Selected on validation; the '
        f"{escape(quality_of_columns(best).words)} constraint {escape(held_text(best))}.</p>"
        f"{_seeds_sentence(best, rows)}"
        f'<p>Export it with:</p><pre id="export-command">{escape(command)}</pre>'
    )


def _seeds_sentence(best: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """What training with other seeds said of the selection (nothing when no trial was)."""
    passed = [r["trial"] for r in rows if r.get("confirmed") is False]
    if best.get("confirmed") is None and not passed:
        return ""
    if best.get("confirmed"):
        text = "Trained again with other seeds, it is within the constraint over them"
    else:  # not trained again, or a run of it failed
        text = "It is not confirmed over other seeds"
    if passed:
        text += (
            f"; passed over: {', '.join(passed)}, not within the constraint over the seeds "
            "it was trained again with"
        )
    return f'<p id="seeds-verdict">{escape(text)} (below).</p>'


def _constraints_text(search: SearchConfig) -> str:
    given = search.constraints.model_dump(exclude_none=True)
    return ", ".join(f"{k} = {v}" for k, v in given.items()) or "none"


def _trial_row(r: dict[str, Any]) -> tuple[str, list[str]]:
    feasible = {True: "yes", False: "no", None: "&ndash;"}[r.get("feasible")]
    error = f'<pre class="error">{escape(r["error"])}</pre>' if r.get("error") else ""
    css = " ".join(
        c
        for c, on in (("pareto", r.get("pareto")), ("infeasible", r.get("feasible") is False))
        if on
    )
    cells = [
        _td(escape(r["trial"])),
        _td(escape(_STATUS_WORDS.get(r["status"], r["status"]))),
        _td(escape(r.get("recipe") or "")),
        *_metric_cells(r),
        _td(feasible),
        _td(escape(r.get("violations") or "")),
        _td(_num(r.get("wall_s"), ".0f"), num=True),
        _td(error),
    ]
    return css, cells


def _head(job_name: str, running: bool) -> list[str]:
    head = ['<meta charset="utf-8">']
    if running:
        head.append(f'<meta http-equiv="refresh" content="{REFRESH_S}">')
    head.append(f"<title>{escape(job_name)}: compression search report</title>")
    head.append(f"<style>{_STYLE}</style>")
    return head


def _status_section(
    counts: dict[str, int], running: bool, notes: list[str], search: SearchConfig, run_dir: str
) -> list[str]:
    """Where the search stands: trial counts, what is partial, notes, objectives."""
    _, partial = status_lines(counts, running)
    out = []
    if running:
        out.append(
            f'<p class="note" id="refresh-note">The search is running: this page reloads every '
            f"{REFRESH_S} s.</p>"
        )
    if partial:
        out.append(f'<p class="partial" id="partial-note">{escape(partial)}</p>')
    if notes:
        items = "".join(f"<li>{escape(n)}</li>" for n in notes)
        out.append(f'<ul class="note" id="notes">{items}</ul>')
    objectives = ", ".join(f"{o.metric} ({o.mode})" for o in search.objectives)
    out.append(
        f"<p>Objectives: {escape(objectives)}. Constraints: {escape(_constraints_text(search))}. "
        f"Run directory: <code>{escape(run_dir)}</code>.</p>"
    )
    q = quality_of(search)
    paired = (
        "accuracy drops are paired with the dense model on the same examples, in points"
        if q is ACCURACY_DROP
        else "perplexity increases are paired with the dense model on the same blocks of text, in %"
    )
    out.append(
        f'<p id="selection-rule">{escape(paired[0].upper() + paired[1:])}, with their '
        f"{search.constraints.confidence or 0.95:.0%} two-sided interval (and, when selection "
        "uses one, the one-sided upper bound after &le;). Rule: "
        f"{escape(selection_rule(search))}.</p>"
    )
    out.append(
        '<p class="note" id="interval-scope">The interval covers the sampling noise of the '
        "evaluation examples, not how much a recipe's own training or calibration varies with "
        "another seed; near a constraint that can move a drop by about a point. To see it, "
        "train a trial again with other seeds: <code>search.confirm_seeds</code> in the job "
        "does it for the selected recipe after the search, <code>orchestrator confirm RUN_DIR "
        "--seeds 1 2</code> for any finished trial afterwards.</p>"
    )
    return out


def _confirm_section(confirmed: list[Confirmation], q: Quality) -> list[str]:
    """Each trial trained again with other seeds: in how many the constraint held, and a row
    per seed (the trial's own first) with the figures the trials table shows."""
    if not confirmed:
        return []
    out = [
        '<h2 id="confirm-title">Trained again with other seeds</h2>',
        "<p>The same recipe and job, only <code>train.seed</code> changed (the recovery's data "
        "order and dropout), each run judged by the same rule as the trials. The runs' "
        "validation losses are pooled: their mean, and a one-sided bound that adds the seeds' "
        "spread to the evaluation's noise (normal approximation; the runs share their "
        "examples, so their sampling errors are not averaged away). A recipe whose pooled "
        "bound (without a confidence: its mean) breaks the quality constraint is not "
        "selected.</p>",
    ]
    head = ["seed", *_metric_head(q), "within the constraint", "violations", "wall s", "error"]
    for c in confirmed:
        rows = []
        for r in c.rows:
            feasible = {True: "yes", False: "no", None: "&ndash;"}[r.get("feasible")]
            error = f'<pre class="error">{escape(r["error"])}</pre>' if r.get("error") else ""
            cells = [
                _td(escape(str(r["seed"]))),
                *_metric_cells(r),
                _td(feasible),
                _td(escape(r.get("violations") or "")),
                _td(_num(r.get("wall_s"), ".0f"), num=True),
                _td(error),
            ]
            rows.append(("infeasible" if r.get("feasible") is False else "", cells))
        out.append(f'<p class="confirm-text">{escape(c.text())}.</p>')
        out.append(_table(f"confirm-{c.trial}", head, rows))
    return out


def _pareto_section(rows: list[dict[str, Any]], q: Quality) -> list[str]:
    front = [r for r in rows if r.get("pareto")]
    out = [f"<h2>Pareto front ({len(front)} trials)</h2>"]
    if not front:
        return [*out, '<p id="pareto-empty">No finished, feasible trial yet.</p>']
    cells = [
        ("pareto", [_td(escape(r["trial"])), _td(escape(r.get("recipe") or "")), *_metric_cells(r)])
        for r in front
    ]
    return [*out, _table("pareto-table", ["trial", "recipe", *_metric_head(q)], cells)]


def _trials_section(rows: list[dict[str, Any]], q: Quality) -> list[str]:
    """Every trial, in pages of ``TRIAL_PAGE`` rows: the first shown, the others folded
    (``<details>``), so thousands of trials keep the page quick to open."""
    head = ["trial", "status", "recipe", *_metric_head(q), "feasible", "violations", "wall s"]
    head.append("error")
    if len(rows) <= TRIAL_PAGE:
        return [_table("trials-table", head, [_trial_row(r) for r in rows])]
    out = [
        f'<p class="note" id="trial-pages">{len(rows)} trials in pages of {TRIAL_PAGE}; open a '
        "page to see its rows. Every trial is also in results.parquet.</p>"
    ]
    for page, start in enumerate(range(0, len(rows), TRIAL_PAGE), 1):
        chunk = rows[start : start + TRIAL_PAGE]
        html_id = "trials-table" if page == 1 else f"trials-table-{page}"
        label = f"trials {chunk[0]['trial']} to {chunk[-1]['trial']} ({len(chunk)})"
        out.append(
            f"<details{' open' if page == 1 else ''}><summary>{escape(label)}</summary>"
            + _table(html_id, head, [_trial_row(r) for r in chunk])
            + "</details>"
        )
    return out


def render_html(
    *,
    job_name: str,
    job_yaml: str,
    run_dir: str | Path,
    search: SearchConfig,
    table: pa.Table,
    baseline: dict[str, float] | None,
    png: bytes,
    best: dict[str, Any] | None,
    notes: list[str],
    running: bool,
    sensitivity_png: bytes | None = None,
    confirmed: list[Confirmation] | None = None,
) -> str:
    """The whole page as a string (the caller writes it atomically). ``sensitivity_png``: the
    selected recipe's per-layer allocation heatmaps, when it allocated any; ``confirmed``: the
    trials trained again with other seeds (``results.confirm``)."""
    confirmed = confirmed or []
    rows = table.to_pylist()
    q = quality_of(search)
    counts = status_counts(table)
    body = [f"<h1>{escape(job_name)}: compression search</h1>"]
    body.append(f'<p id="status">{escape(status_lines(counts, running)[0])}</p>')
    # The answer first, then the choices around it, then how to read them, then everything.
    body.append("<h2>Selected recipe</h2>")
    body.append(
        f'<div id="answer">{_answer_section(best, rows, baseline, str(run_dir), search)}</div>'
    )
    body += _confirm_section(confirmed, q)
    body += _pareto_section(rows, q)
    data = base64.b64encode(png).decode("ascii")
    body.append(
        f'<h2>Plot</h2><img id="pareto-plot" alt="{q.metric} vs size and latency" '
        f'src="data:image/png;base64,{data}">'
    )
    if sensitivity_png is not None:
        data = base64.b64encode(sensitivity_png).decode("ascii")
        body.append(
            "<h2>Per-layer allocation of the selected recipe</h2><p>Each Linear's measured "
            "sensitivity (KL divergence of the model's outputs on calibration data with only "
            "that layer changed) at each candidate bit width, sparsity or rank; outlined, the "
            'one it got under the budget.</p><img id="sensitivity-plot" alt="sensitivity per '
            f'layer and setting" src="data:image/png;base64,{data}">'
        )
    body.append("<h2>The search</h2>")
    body += _status_section(counts, running, notes, search, str(run_dir))
    # The resolved job writes every default out, so it is folded away unless asked for.
    body.append(
        "<details><summary>the resolved job.yaml</summary>"
        f'<pre id="job-yaml">{escape(job_yaml)}</pre></details>'
    )
    body.append(
        "<details><summary>the dense baseline's metrics</summary>"
        f"{_baseline_section(baseline, q)}</details>"
    )
    body.append(f'<h2 id="trials-section-title">All trials ({len(rows)})</h2>')
    body.append('<div id="trials-section">')
    body += _trials_section(rows, q)
    body.append("</div>")
    body.append(f"<script>{_SCRIPT}</script>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n'
        + "\n".join(_head(job_name, running))
        + "\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
