"""Accuracy (and a language model's perplexity, ``PairedPerplexity``) with its uncertainty: the
paired accuracy drop of a compressed model against the dense model on the same examples, and
its confidence interval.

Paired, because both models answer the same examples: what varies between them is only the
examples where they disagree, so the interval is far narrower than two independent accuracy
intervals would suggest. The interval is Newcombe's hybrid score interval for a difference of
paired proportions (Newcombe 1998, "Improved confidence intervals for the difference between
binomial proportions based on paired data", method 10): Wilson score intervals of both
accuracies combined with the correlation of the paired outcomes. It has close to nominal
coverage down to small samples, and needs no resampling (the same counts always give the same
interval). Plain Python: no torch, no scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


def wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` at normal quantile ``z``."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairedCounts:
    """The 2 x 2 table of a dense and a compressed model answering the same ``n`` examples."""

    both: int  # both right
    worse: int  # the dense model right, the compressed one wrong
    better: int  # the dense model wrong, the compressed one right
    neither: int  # both wrong

    @classmethod
    def of(cls, dense: list[bool], compressed: list[bool]) -> PairedCounts:
        if len(dense) != len(compressed):
            raise ValueError(f"{len(dense)} dense and {len(compressed)} compressed answers")
        pairs = list(zip(dense, compressed, strict=True))
        return cls(
            both=sum(d and c for d, c in pairs),
            worse=sum(d and not c for d, c in pairs),
            better=sum(c and not d for d, c in pairs),
            neither=sum(not (d or c) for d, c in pairs),
        )

    @property
    def n(self) -> int:
        return self.both + self.worse + self.better + self.neither

    @property
    def dense_accuracy(self) -> float:
        return (self.both + self.worse) / self.n

    @property
    def accuracy(self) -> float:
        return (self.both + self.better) / self.n

    @property
    def drop(self) -> float:
        """Dense accuracy minus compressed accuracy (positive: the compressed model is worse)."""
        return (self.worse - self.better) / self.n

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """The two-sided ``confidence`` interval of ``drop`` (Newcombe's method 10)."""
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        z = NormalDist().inv_cdf(0.5 + confidence / 2)
        n, p1, p2 = self.n, self.dense_accuracy, self.accuracy
        l1, u1 = wilson(self.both + self.worse, n, z)
        l2, u2 = wilson(self.both + self.better, n, z)
        a, b, c, d = self.both, self.worse, self.better, self.neither
        denominator = (a + b) * (c + d) * (a + c) * (b + d)
        phi = (a * d - b * c) / math.sqrt(denominator) if denominator > 0 else 0.0
        below = math.sqrt(
            max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
        )
        above = math.sqrt(
            max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
        )
        return self.drop - below, self.drop + above

    def upper_bound(self, confidence: float = 0.95) -> float:
        """The one-sided upper confidence bound of ``drop`` at ``confidence``: the drop is at
        most this with that confidence (the upper end of the two-sided interval at
        ``2 * confidence - 1``). ``confidence`` in (0.5, 1)."""
        if not 0.5 < confidence < 1.0:
            raise ValueError(f"a one-sided confidence must be in (0.5, 1), got {confidence}")
        return self.interval(2 * confidence - 1)[1]

    def metrics(self, prefix: str, confidence: float = 0.95) -> dict[str, float]:
        """The metric keys of docs/contracts.md for one split (``prefix``: eval or test)."""
        lo, hi = self.interval(confidence)
        return {
            f"{prefix}/accuracy_drop": self.drop,
            f"{prefix}/accuracy_drop_lo": lo,
            f"{prefix}/accuracy_drop_hi": hi,
            f"{prefix}/dense_accuracy": self.dense_accuracy,
            f"{prefix}/examples": float(self.n),
            f"{prefix}/pairs_both": float(self.both),
            f"{prefix}/pairs_worse": float(self.worse),
            f"{prefix}/pairs_better": float(self.better),
        }

    @classmethod
    def from_metrics(cls, metrics: dict[str, float], prefix: str) -> PairedCounts | None:
        """The counts a trial reported, or None when it reported none."""
        keys = [f"{prefix}/{k}" for k in ("examples", "pairs_both", "pairs_worse", "pairs_better")]
        if any(metrics.get(k) is None for k in keys):
            return None
        n, both, worse, better = (int(round(metrics[k])) for k in keys)
        return cls(both, worse, better, n - both - worse - better)


@dataclass(frozen=True)
class PairedPerplexity:
    """A language model's perplexity against the dense model's on the same blocks of text.

    Each block's summed negative log-likelihood (nats, over its predicted tokens) is known for
    both models; the ratio of perplexities is ``exp`` of the mean per-token difference. Its
    interval is the normal (CLT) interval of the mean per-block difference, exponentiated:
    paired, so the text's own difficulty (shared by both models) cancels. Blocks cut from one
    document are not fully independent; with hundreds of blocks from hundreds of documents the
    interval is close, and it is stated as what it is."""

    dense_nll: tuple[float, ...]  # per block, summed over its tokens
    nll: tuple[float, ...]
    tokens_per_block: int

    @classmethod
    def of(
        cls, dense: list[float], compressed: list[float], tokens_per_block: int
    ) -> PairedPerplexity:
        if len(dense) != len(compressed):
            raise ValueError(f"{len(dense)} dense and {len(compressed)} compressed blocks")
        return cls(tuple(dense), tuple(compressed), tokens_per_block)

    @property
    def n(self) -> int:
        return len(self.nll)

    def _diffs(self) -> list[float]:
        t = self.tokens_per_block
        return [(c - d) / t for d, c in zip(self.dense_nll, self.nll, strict=True)]

    @property
    def ratio(self) -> float:
        """Perplexity of the compressed model over the dense model's (1.10: 10 % higher)."""
        diffs = self._diffs()
        return math.exp(sum(diffs) / len(diffs))

    @property
    def dense_perplexity(self) -> float:
        return math.exp(sum(self.dense_nll) / (self.n * self.tokens_per_block))

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        diffs = self._diffs()
        n = len(diffs)
        mean = sum(diffs) / n
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
        half = NormalDist().inv_cdf(0.5 + confidence / 2) * sd / math.sqrt(n)
        return math.exp(mean - half), math.exp(mean + half)

    def metrics(self, prefix: str, confidence: float = 0.95) -> dict[str, float]:
        """The metric keys of docs/contracts.md for one split (``prefix``: eval or test)."""
        lo, hi = self.interval(confidence)
        return {
            f"{prefix}/perplexity_ratio": self.ratio,
            f"{prefix}/perplexity_ratio_lo": lo,
            f"{prefix}/perplexity_ratio_hi": hi,
            f"{prefix}/dense_perplexity": self.dense_perplexity,
            f"{prefix}/examples": float(self.n),
        }


def ratio_interval(
    metrics: dict[str, float], prefix: str, confidence: float = 0.95
) -> tuple[float, float] | None:
    """The two-sided ``confidence`` interval of a trial's reported ``perplexity_ratio`` (split
    ``prefix``), from the 95 % interval it reported: that interval is normal in the log of the
    ratio (``PairedPerplexity.interval``), so its width gives the standard error exactly and any
    other confidence follows. None when the trial reported no interval."""
    keys = [f"{prefix}/perplexity_ratio{s}" for s in ("", "_lo", "_hi")]
    if any(metrics.get(k) is None or metrics[k] <= 0 for k in keys):
        return None
    ratio, lo, hi = (metrics[k] for k in keys)
    se = (math.log(hi) - math.log(lo)) / (2 * NormalDist().inv_cdf(0.975))
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * se
    return ratio * math.exp(-half), ratio * math.exp(half)


def ratio_upper_bound(
    metrics: dict[str, float], confidence: float, prefix: str = "eval"
) -> float | None:
    """The one-sided upper confidence bound of the perplexity ratio at ``confidence`` (0.5, 1):
    the upper end of the two-sided interval at ``2 * confidence - 1``."""
    interval = ratio_interval(metrics, prefix, 2 * confidence - 1)
    return None if interval is None else interval[1]


def pooled_over_seeds(
    losses: list[float], bounds: list[float], confidence: float
) -> tuple[float, float]:
    """One recipe trained with several seeds, each run's loss (accuracy drop, perplexity
    increase) measured on the same evaluation examples with its one-sided upper bound at
    ``confidence``: the mean loss over the runs (what the recipe costs, whichever seed trains
    it) and its one-sided upper bound at ``confidence``.

    A normal approximation. Each run's standard error is read back from its bound
    (``(bound - loss) / z``). The runs share their examples, so their sampling errors are taken
    as fully correlated: the mean's sampling error is the runs' mean standard error, not that
    over the square root of the runs (the conservative side). The seeds' own spread adds its
    sample variance over the number of runs. With two or three runs that spread is itself
    rough; more seeds tighten the bound, never widen it on average."""
    k = len(losses)
    if k < 2 or len(bounds) != k:
        raise ValueError(f"need a bound for each of at least 2 runs, got {k} and {len(bounds)}")
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"a one-sided confidence must be in (0.5, 1), got {confidence}")
    z = NormalDist().inv_cdf(confidence)
    mean = sum(losses) / k
    sampling = sum((b - loss) / z for loss, b in zip(losses, bounds, strict=True)) / k
    spread = sum((loss - mean) ** 2 for loss in losses) / (k - 1)
    return mean, mean + z * math.sqrt(sampling**2 + spread / k)
