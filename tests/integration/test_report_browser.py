"""report.html in a real browser: headless Chromium loads the file, runs its script, decodes the
embedded plot, and logs nothing to the console.

Chromium's ``--enable-logging=stderr`` prints every page console message (errors, uncaught
exceptions, warnings) as a line containing ``CONSOLE``; a decoded plot is seen through the
``data-plot-loaded`` marker the page's script sets only when the image has pixels. A broken copy
of the page is checked first, so both assertions are known to be able to fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.config.loader import dump_job, load_job
from orchestrator.results import write_report

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "debug" / "recover.yaml"
OVERRIDES = [
    "search.space={compress.prune.sparsity: {uniform: [0.2, 0.7]}, "
    "compress.quantize: {choice: {off: null, int8: {method: dynamic_int8}}}}",
    "search.objectives=[{metric: eval/accuracy, mode: max}, "
    "{metric: compress/size_bytes, mode: min}]",
    "search.constraints={max_accuracy_drop: 0.02}",
]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "chromium is not on PATH; this test needs a headless browser: "
            "run `bash scripts/setup_test.sh` (it apt-installs chromium)"
        )
    return path


def _dump_dom(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and the console lines Chromium logged."""
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=3000",
        "--window-size=1400,900",  # a laptop browser window
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln]


def _trial(name: str, status: str, sparsity: float, acc: float | None, size: float) -> dict:
    metrics = (
        {}
        if acc is None
        else {
            "eval/accuracy": acc,
            "test/accuracy": acc - 0.01,
            "compress/size_bytes": size,
            "compress/size_ratio": 4e6 / size,
            "perf/latency_ms_b32": 5 + 10 * size / 4e6,
            "perf/speedup": 1.5,
        }
    )
    return {
        "trial": name,
        "status": status,
        "config": {"compress.prune.sparsity": sparsity, "compress.quantize": "int8"},
        "metrics": metrics,
        "error": "ValueError: <script>alert(1)</script>" if status == "error" else None,
        "artifact": "model" if status == "done" else None,
        "wall_s": 30.0,
    }


@pytest.fixture
def report(tmp_path: Path) -> Path:
    """A partial run: three done (two on the front, one infeasible), one running, one failed."""
    spec = load_job(JOB, [*OVERRIDES, f"output.dir={tmp_path}"])
    run = tmp_path / spec.name
    run.mkdir()
    (run / "job.yaml").write_text(dump_job(spec))
    baseline = {"eval/accuracy": 0.8, "compress/size_bytes": 4e6, "perf/latency_ms_b32": 15.0}
    (run / "baseline.json").write_text(json.dumps(baseline))
    trials = [
        _trial("trial_000", "done", 0.3, 0.795, 2e6),
        _trial("trial_001", "done", 0.6, 0.785, 1e6),
        _trial("trial_002", "done", 0.7, 0.70, 0.5e6),
        _trial("trial_003", "running", 0.5, None, 0),
        _trial("trial_004", "error", 0.2, None, 0),
    ]
    for t in trials:
        (run / "trials" / t["trial"]).mkdir(parents=True)
        (run / "trials" / t["trial"] / "trial.json").write_text(json.dumps(t))
    write_report(run, running=False)
    return run / "report.html"


def test_a_broken_page_is_caught(report: Path, tmp_path: Path) -> None:
    """The checks below can fail: a script error is logged, a corrupt plot sets no marker."""
    page = report.read_text()
    page = re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,bm90IGEgcG5n", page)
    page = page.replace("</body>", "<script>undefined_function();</script></body>")
    page = page.replace("<body>", '<body><div style="width: 3000px">too wide</div>')
    broken = tmp_path / "broken.html"
    broken.write_text(page)
    dom, console = _dump_dom(broken, tmp_path / "profile-broken")
    assert any("undefined_function" in ln for ln in console), console
    assert 'data-plot-loaded="1"' not in dom
    assert 'data-fits-width="0"' in dom


def test_report_renders_in_chromium(report: Path, tmp_path: Path) -> None:
    dom, console = _dump_dom(report, tmp_path / "profile")
    assert console == [], "the page logged to the console:\n" + "\n".join(console)
    assert 'data-plot-loaded="1"' in dom, "the embedded pareto.png did not decode"
    assert 'data-fits-width="1"' in dom, "the page scrolls sideways in a 1400-pixel window"
    # The answer comes first: the selected recipe against the dense model, then the front.
    assert (
        dom.index('id="answer"') < dom.index('id="pareto-table"') < dom.index('id="trials-table"')
    )
    answer = dom.split('id="answer-table"')[1].split("</table>")[0]
    assert "validation accuracy" in answer and "x smaller" in answer and "x faster" in answer
    table = dom.split('id="pareto-table"')[1].split("</table>")[0]
    rows = re.findall(r"<tr[ >].*?</tr>", table, flags=re.S)
    assert len(rows) == 3  # header, trial_000, trial_001
    assert "trial_000" in rows[1] and "trial_001" in rows[2]
    assert "sparsity=0.3 quantize=int8" in rows[1]
    assert "trial_002" not in table  # infeasible: in the trial table only
    assert "accuracy drop 0.1 &gt; 0.02" in dom
    # The failed trial's error is text, not a script the browser ran.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "Partial results" in dom and "http-equiv" not in dom
