"""How much worse than the dense model a trial is, for the kind of model a search scores: a
classifier's paired accuracy drop (in points) or a language model's perplexity increase (in
percent), each with its interval, its one-sided bound and the constraint that bounds it. The
results table, the report, the plot and the terminal read the one ``Quality`` of their search
instead of naming accuracy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.config.search import SearchConfig
from orchestrator.stats import PairedCounts, ratio_interval, ratio_upper_bound

# The interval shown beside a drop when the search sets no confidence of its own.
DEFAULT_CONFIDENCE = 0.95


def accuracy_drop(
    metrics: dict[str, float],
    baseline: dict[str, float] | None,
    prefix: str = "eval",
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float | None, float | None, float | None]:
    """(drop, lo, hi) of the split ``prefix``: paired with the dense model on the same
    examples when the trial reported its counts, the interval at ``confidence``; else the
    difference from the baseline's accuracy, without an interval."""
    counts = PairedCounts.from_metrics(metrics, prefix)
    if counts is not None and counts.n > 0:
        lo, hi = counts.interval(confidence)
        return counts.drop, lo, hi
    base = None if baseline is None else baseline.get(f"{prefix}/accuracy")
    acc = metrics.get(f"{prefix}/accuracy")
    return (None if base is None or acc is None else base - acc), None, None


def drop_bound(metrics: dict[str, float], confidence: float, prefix: str = "eval") -> float | None:
    """The one-sided upper confidence bound of a trial's paired drop, or None without counts."""
    counts = PairedCounts.from_metrics(metrics, prefix)
    return None if counts is None or counts.n == 0 else counts.upper_bound(confidence)


def perplexity_increase(
    metrics: dict[str, float],
    baseline: dict[str, float] | None,
    prefix: str = "eval",
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float | None, float | None, float | None]:
    """(increase, lo, hi) of the split ``prefix``: the perplexity ratio to the dense model on the
    same blocks, minus 1 (0.07: 7 % higher), with its interval at ``confidence``; else from the
    baseline's perplexity, without an interval."""
    ratio = metrics.get(f"{prefix}/perplexity_ratio")
    interval = ratio_interval(metrics, prefix, confidence)
    if ratio is not None and interval is not None:
        return ratio - 1, interval[0] - 1, interval[1] - 1
    base = None if baseline is None else baseline.get(f"{prefix}/perplexity")
    ppl = metrics.get(f"{prefix}/perplexity")
    return (None if not base or ppl is None else ppl / base - 1), None, None


def increase_bound(
    metrics: dict[str, float], confidence: float, prefix: str = "eval"
) -> float | None:
    bound = ratio_upper_bound(metrics, confidence, prefix)
    return None if bound is None else bound - 1


@dataclass(frozen=True)
class Quality:
    metric: str  # the validation score shown beside the loss
    metric_fmt: str
    column: str  # the results table's column of the loss (test_<column> for the test split)
    words: str  # the loss in words
    unit: str  # the loss is shown x 100 in this unit
    constraint: str  # the key of search.constraints that bounds it
    latency: str  # the latency perf/speedup compares
    latency_words: str
    # How the terminal and the report name things: the score ("acc"), the loss ("drop"), the
    # loss in the line under the selected trial, the Pareto table's loss and latency columns.
    abbrev: str
    loss_word: str
    held_words: str
    loss_header: str
    latency_header: str
    # (metrics, baseline, prefix="eval", confidence=0.95) -> (loss, lo, hi)
    loss: Callable[..., tuple[float | None, float | None, float | None]]
    # (metrics, confidence, prefix="eval") -> the one-sided upper bound, or None
    bound: Callable[..., float | None]

    @property
    def test_metric(self) -> str:
        return "test/" + self.metric.split("/", 1)[1]

    def limit(self, search: SearchConfig) -> float | None:
        return getattr(search.constraints, self.constraint)


ACCURACY_DROP = Quality(
    metric="eval/accuracy",
    metric_fmt=".4f",
    column="accuracy_drop",
    words="accuracy drop",
    unit="points",
    constraint="max_accuracy_drop",
    latency="perf/latency_ms_b32",
    latency_words="batch 32",
    abbrev="acc",
    loss_word="drop",
    held_words="drop",
    loss_header="drop",
    latency_header="ms b32",
    loss=accuracy_drop,
    bound=drop_bound,
)
PERPLEXITY_INCREASE = Quality(
    metric="eval/perplexity",
    metric_fmt=".2f",
    column="perplexity_increase",
    words="perplexity increase",
    unit="%",
    constraint="max_perplexity_increase",
    latency="perf/latency_ms_b1",
    latency_words="prefill of one block, batch 1",
    abbrev="ppl",
    loss_word="increase",
    held_words="perplexity increase",
    loss_header="ppl +%",
    latency_header="ms prefill",
    loss=perplexity_increase,
    bound=increase_bound,
)


def quality_of(search: SearchConfig) -> Quality:
    return PERPLEXITY_INCREASE if search.scores_perplexity else ACCURACY_DROP


def quality_of_columns(columns: Any) -> Quality:
    """The quality a results table (its column names, or a row) was built with."""
    return PERPLEXITY_INCREASE if PERPLEXITY_INCREASE.column in columns else ACCURACY_DROP


def confidence_of(search: SearchConfig) -> float:
    return search.constraints.confidence or DEFAULT_CONFIDENCE
