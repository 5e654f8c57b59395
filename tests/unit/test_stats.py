"""The paired accuracy drop and its interval: counts from answers, the interval's properties,
and its coverage measured on simulated pairs (seeded)."""

from __future__ import annotations

import random

import pytest

from orchestrator.stats import PairedCounts, wilson

pytestmark = pytest.mark.unit


def test_counts_from_answers() -> None:
    dense = [True, True, False, False, True]
    compressed = [True, False, True, False, True]
    c = PairedCounts.of(dense, compressed)
    assert (c.both, c.worse, c.better, c.neither, c.n) == (2, 1, 1, 1, 5)
    assert c.dense_accuracy == c.accuracy == 0.6 and c.drop == 0.0
    with pytest.raises(ValueError, match="4 compressed"):
        PairedCounts.of(dense, compressed[:4])


def test_interval_holds_the_drop_and_narrows_with_more_examples() -> None:
    small = PairedCounts(230, 6, 4, 60)
    large = PairedCounts(23000, 600, 400, 6000)  # the same rates, 100x the examples
    for c in (small, large):
        lo, hi = c.interval()
        assert lo < c.drop < hi
    width = [c.interval()[1] - c.interval()[0] for c in (small, large)]
    assert width[1] < width[0] / 8  # about 1/sqrt(100)
    lo90, hi90 = small.interval(0.90)
    lo99, hi99 = small.interval(0.99)
    assert lo99 < lo90 and hi90 < hi99  # more confidence, wider
    assert PairedCounts(10, 0, 0, 0).interval()[1] > 0  # no disagreement is not certainty
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        small.interval(1.0)


def test_one_sided_bound_is_the_upper_end_of_a_narrower_interval() -> None:
    c = PairedCounts(230, 6, 4, 60)
    assert c.upper_bound(0.95) == c.interval(0.90)[1]
    assert c.drop < c.upper_bound(0.95) < c.interval(0.95)[1]
    with pytest.raises(ValueError, match=r"\(0.5, 1\)"):
        c.upper_bound(0.4)


def test_metrics_round_trip() -> None:
    c = PairedCounts(230, 6, 4, 60)
    m = c.metrics("eval")
    assert m["eval/accuracy_drop"] == pytest.approx(2 / 300)
    assert m["eval/dense_accuracy"] == pytest.approx(236 / 300)
    assert PairedCounts.from_metrics(m, "eval") == c
    assert PairedCounts.from_metrics({"eval/accuracy": 0.8}, "eval") is None


def test_wilson_is_inside_zero_one() -> None:
    assert wilson(0, 20, 1.96)[0] == 0.0 and 0 < wilson(0, 20, 1.96)[1] < 0.2
    assert wilson(20, 20, 1.96)[1] == 1.0


@pytest.mark.parametrize("n", [300, 2000])
def test_coverage_is_close_to_nominal(n: int) -> None:
    """95 % intervals on 400 simulated evaluations of a model that disagrees with the dense one
    on 8 % of examples, true drop 2 points: they cover the true drop 93-97 % of the time."""
    rng = random.Random(n)
    truth = 0.05 - 0.03
    covered = 0
    runs = 400
    for _ in range(runs):
        counts = {"both": 0, "worse": 0, "better": 0, "neither": 0}
        for _ in range(n):
            u = rng.random()
            key = (
                "both" if u < 0.74 else "worse" if u < 0.79 else "better" if u < 0.82 else "neither"
            )
            counts[key] += 1
        lo, hi = PairedCounts(**counts).interval(0.95)
        covered += lo <= truth <= hi
    assert 0.92 <= covered / runs <= 0.98, covered / runs


def test_a_perplexity_interval_at_any_confidence_from_the_reported_one() -> None:
    """The 95 % interval a trial reports fixes the standard error of the log ratio: the
    interval and one-sided bound at another confidence are what ``PairedPerplexity`` itself
    gives at that confidence."""
    from orchestrator.stats import PairedPerplexity, ratio_interval, ratio_upper_bound

    rng = random.Random(0)
    dense = [rng.uniform(90, 110) for _ in range(200)]
    paired = PairedPerplexity.of(dense, [d + rng.gauss(3, 4) for d in dense], tokens_per_block=31)
    reported = paired.metrics("eval")
    for confidence in (0.5, 0.8, 0.99):
        assert ratio_interval(reported, "eval", confidence) == pytest.approx(
            paired.interval(confidence)
        )
    assert ratio_upper_bound(reported, 0.9) == pytest.approx(paired.interval(0.8)[1])
    assert ratio_interval({"eval/perplexity_ratio": 1.1}, "eval") is None


def test_pooled_over_seeds() -> None:
    """The mean over the runs and a bound that adds the seeds' spread to the runs' shared
    evaluation noise: runs that agree give back their own bound; more runs with the same
    spread tighten it; the quickstart's selected recipe over its 3 seeds (BENCHMARKS.md)."""
    from orchestrator.stats import pooled_over_seeds

    assert pooled_over_seeds([0.01, 0.01], [0.02, 0.02], 0.95) == pytest.approx((0.01, 0.02))
    two = pooled_over_seeds([0.0, 0.01], [0.008, 0.018], 0.95)
    four = pooled_over_seeds([0.0, 0.01] * 2, [0.008, 0.018] * 2, 0.95)
    assert two[0] == four[0] == pytest.approx(0.005) and four[1] < two[1]
    # The shared noise is not averaged away: never below the mean run's own bound.
    assert four[1] > 0.005 + 0.008
    mean, bound = pooled_over_seeds([-0.00105, 0.00147, 0.00421], [0.00602, 0.00877, 0.0116], 0.95)
    assert (round(100 * mean, 2), round(100 * bound, 2)) == (0.15, 0.92)
    with pytest.raises(ValueError):
        pooled_over_seeds([0.01], [0.02], 0.95)
    with pytest.raises(ValueError):
        pooled_over_seeds([0.01, 0.02], [0.02, 0.03], 0.4)
