"""The job's ``search`` section: which dotted job keys Ray Tune varies, what it optimises, under
which constraints, and how the dense baseline is obtained.

Space keys are the same dotted keys as command-line overrides, and a trial's job is built by the
same ``apply_overrides``. A sampled ``null`` sets the key to null; on a whole technique section
(``compress.factorize``) that turns the technique off, and keys below a section that is off are
ignored for that trial, so conditional spaces ("a rank only when factorizing") never crash.
"""

from __future__ import annotations

import copy
import difflib
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from orchestrator.config.base import ConfigModel, cross_field_error
from orchestrator.config.compress import STAGES
from orchestrator.config.overrides import apply_overrides

# Final metrics every trial reports (docs/contracts.md, "Metric keys"; finalize.py and loop.py
# produce them).
TRIAL_METRICS = (
    "eval/accuracy",
    "eval/accuracy_drop",
    "eval/accuracy_drop_lo",
    "eval/accuracy_drop_hi",
    "eval/loss",
    "test/accuracy",
    "test/accuracy_drop",
    "test/accuracy_drop_lo",
    "test/accuracy_drop_hi",
    "test/loss",
    # A language model's (``finalize.split_metrics``, ``stats.PairedPerplexity``).
    "eval/perplexity",
    "eval/perplexity_ratio",
    "eval/perplexity_ratio_lo",
    "eval/perplexity_ratio_hi",
    "eval/token_accuracy",
    "test/perplexity",
    "test/perplexity_ratio",
    "test/perplexity_ratio_lo",
    "test/perplexity_ratio_hi",
    "test/token_accuracy",
    "compress/size_bytes",
    "compress/dense_size_bytes",
    "compress/weights_bytes",
    "compress/dense_weights_bytes",
    "compress/size_ratio",
    "compress/params",
    "compress/nonzero_params",
    "compress/sparsity",
    "compress/bits",
    "perf/latency_ms_b1",
    "perf/latency_ms_b32",
    "perf/speedup",
    "perf/decode_tokens_per_s",
    "perf/decode_speedup",
    "train/loss",
    "train/samples_per_s",
    "mem/peak_mb",
)
# Metrics reported during recovery training too (what an early-stopping scheduler can compare).
INTERMEDIATE_METRICS = ("eval/accuracy", "eval/loss", "eval/perplexity")
# Metrics only a classifier reports, and only a language model: a search's objectives and
# constraints say which kind of model it scores (``launch.check_task`` checks they fit the model).
CLASSIFIER_ONLY = tuple(m for m in TRIAL_METRICS if "/accuracy" in m)
LANGUAGE_MODEL_ONLY = tuple(m for m in TRIAL_METRICS if "perplexity" in m or "decode" in m)
# Whole sections a sampled null may switch off: the compression stages.
OPTIONAL_SECTIONS = tuple(f"compress.{stage}" for stage in STAGES)
# The field named ``int`` shadows the builtin inside the class body.
_Int = int
KINDS = ("uniform", "loguniform", "int", "choice", "grid")
# Space keys a search may vary layer by layer (``per_layer: true``) -> the job key that takes
# the per-layer values ({layer name: value}; see ``compress.<stage>.layers``).
PER_LAYER = {
    "compress.quantize.bits": "compress.quantize.layers",
    "compress.prune.sparsity": "compress.prune.layers",
    "compress.factorize.rank_ratio": "compress.factorize.layers",
}


class Distribution(ConfigModel):
    """Exactly one of: ``uniform: [lo, hi]``, ``loguniform: [lo, hi]``, ``int: [lo, hi]``
    (inclusive), ``choice: [values]`` or ``choice: {label: value}`` (values may be whole
    sections or null), ``grid: [values]`` (every value is tried)."""

    uniform: tuple[float, float] | None = Field(default=None, description="[lo, hi), lo < hi")
    loguniform: tuple[float, float] | None = Field(
        default=None, description="[lo, hi), 0 < lo < hi, sampled on a log scale"
    )
    int: tuple[_Int, _Int] | None = Field(default=None, description="[lo, hi] inclusive, lo < hi")
    choice: list[Any] | dict[str, Any] | None = Field(
        default=None,
        description="values to choose from; a mapping gives each value a label (needed for "
        "sections and null: {off: null, int8: {method: dynamic_int8}})",
    )
    grid: list[Any] | None = Field(default=None, description="values, each tried")
    per_layer: bool = Field(
        default=False,
        description="one dimension per targeted layer, each drawn from this distribution "
        f"(the layers are read from the model when the search starts); for {', '.join(PER_LAYER)}",
    )
    allocations: list[float] | None = Field(
        default=None,
        description="with per_layer and choice: budgets whose per-layer allocation (from the "
        "dense model's measured sensitivity, as compress.<stage>.allocate makes it, over the "
        "choice's values) the searcher tries first: mean bits, mean sparsity, or the fraction "
        "of the weights factorization keeps",
    )

    @field_validator("choice", mode="before")
    @classmethod
    def _string_labels(cls, v: Any) -> Any:
        """YAML 1.1 reads the labels ``off`` / ``on`` as booleans: keep them labels."""
        if isinstance(v, dict):
            return {
                ({False: "off", True: "on"}.get(k, k) if isinstance(k, bool) else str(k)): x
                for k, x in v.items()
            }
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        given = [k for k in KINDS if self.kind_is(k)]
        if len(given) != 1:
            raise cross_field_error(
                [
                    (
                        given[1] if len(given) > 1 else "uniform",
                        None,
                        "exactly one of uniform, loguniform, int, choice, grid must be given"
                        + (f" (got {', '.join(given)})" if given else ""),
                        "write e.g. {uniform: [0.1, 0.6]} or {choice: [4, 8]}",
                    )
                ]
            )
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("uniform", "loguniform", "int"):
            lo, hi = value
            if not lo < hi:
                raise cross_field_error(
                    [
                        (
                            kind,
                            list(value),
                            "is an empty or inverted range (lo must be below hi)",
                            f"write {kind}: [lo, hi] with lo < hi, or use choice: [{lo}] "
                            "for a fixed value (or set it in the job instead)",
                        )
                    ]
                )
            if kind == "loguniform" and lo <= 0:
                raise cross_field_error(
                    [(kind, list(value), "needs lo > 0", "use uniform, or a positive lo")]
                )
        elif not value:
            raise cross_field_error(
                [(kind, value, "has no values", f"list at least one value under {kind}")]
            )
        elif kind == "choice" and isinstance(value, list):
            for v in value:
                if isinstance(v, dict | list):
                    raise cross_field_error(
                        [
                            (
                                kind,
                                v,
                                "a choice that is a section or a list needs a label",
                                "write choice as a mapping, e.g. {off: null, asvd: {method: "
                                "asvd, rank_ratio: 0.25}}",
                            )
                        ]
                    )
        return self

    @model_serializer(mode="wrap")
    def _only_kind(self, handler: Any) -> Any:
        """Saved as written (``{uniform: [0.2, 0.7]}``), without the four unused kinds."""
        return {
            k: v
            for k, v in handler(self).items()
            if v is not None and not (k == "per_layer" and v is False)
        }

    def kind_is(self, kind: str) -> bool:
        return getattr(self, kind) is not None

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if self.kind_is(k))

    def candidates(self) -> list[Any]:
        """What the searcher may hand a trial: the ends of a range and a fractional value
        inside a float range (a whole-number key such as a bit width must not take one), every
        choice / grid value (labels for a labelled choice)."""
        if self.kind in ("uniform", "loguniform"):
            lo, hi = getattr(self, self.kind)
            return [lo, lo + 0.37 * (hi - lo), hi]
        return list(getattr(self, self.kind))  # range ends, a mapping's labels, or the values

    def resolve(self, sampled: Any) -> Any:
        """The job value for what the searcher sampled (a label -> its value)."""
        if self.kind == "choice" and isinstance(self.choice, dict):
            return self.choice[sampled]
        return sampled


def _per_layer_problems(
    key: str, dist: Distribution, algorithm: str, samples: int
) -> list[tuple[str, Any, str, str]]:
    """A per-layer key (``per_layer``, ``allocations``) the search can expand and start from."""
    problems: list[tuple[str, Any, str, str]] = []
    if not dist.per_layer:
        if dist.allocations is not None:
            problems.append(
                (
                    f"space.{key}.allocations",
                    dist.allocations,
                    "allocations are starting points of a per-layer search",
                    "set per_layer: true (on a bit width, sparsity or rank ratio), or "
                    "remove allocations",
                )
            )
        return problems
    if key not in PER_LAYER:
        problems.append(
            (
                f"space.{key}.per_layer",
                True,
                "only a bit width, a sparsity or a rank ratio can be set layer by layer",
                f"remove per_layer, or put it on one of {', '.join(PER_LAYER)}",
            )
        )
    elif dist.kind == "choice" and isinstance(dist.choice, dict):
        problems.append(
            (
                f"space.{key}.per_layer",
                True,
                "each layer's value is a number: labels name sections, not widths, "
                "sparsities or rank ratios",
                f"list the values: {key}: {{choice: [...], per_layer: true}}",
            )
        )
    elif dist.allocations is not None:
        problems += _allocations_problems(key, dist, samples)
    if dist.kind == "grid" or algorithm == "grid":
        problems.append(
            (
                f"space.{key}.per_layer",
                True,
                "a grid over every layer's value has as many points as the values to "
                "the power of the layers",
                "use choice (or a range) with search.algorithm optuna or random",
            )
        )
    return problems


def _allocations_problems(
    key: str, dist: Distribution, samples: int
) -> list[tuple[str, Any, str, str]]:
    """An allocation draws each layer's value from a choice's values, and a budget must be
    one some choice of them meets."""
    where, budgets = f"space.{key}.allocations", dist.allocations or []
    if dist.kind != "choice":
        return [
            (
                where,
                budgets,
                "an allocation picks each layer's value among candidates: it needs choice",
                f"write {key}: {{choice: [...], per_layer: true, allocations: [...]}}",
            )
        ]
    values = [float(v) for v in dist.choice]
    problems = []
    rank = key == "compress.factorize.rank_ratio"
    if rank:
        lo, hi, what = 0.0, 1.0, "the fraction of the factorized layers' weights kept"
        if 1.0 not in values:
            problems.append(
                (
                    where,
                    budgets,
                    "an allocation may keep a layer dense (rank ratio 1), which the choice lacks",
                    f"add 1 to {key}'s choice",
                )
            )
        if not any(v < 1.0 for v in values):
            problems.append(
                (
                    where,
                    budgets,
                    "an allocation factorizes layers at the choice's ratios below 1; it has none",
                    f"add a rank ratio below 1 to {key}'s choice",
                )
            )
    else:
        lo, hi, what = min(values), max(values), "the mean over the layers' weights"
    for b in budgets:
        if not (lo < b <= hi if rank else lo <= b <= hi):  # a rank budget of 0 keeps nothing
            problems.append(
                (
                    where,
                    b,
                    f"is out of reach: the budget is {what}, between {lo:g} and {hi:g} here",
                    f"use budgets between {lo:g} and {hi:g}",
                )
            )
    if len(budgets) > samples:
        problems.append(
            (
                where,
                budgets,
                f"lists more starting points than the search's {samples} trials",
                "list fewer allocations, or raise search.num_samples",
            )
        )
    return problems


def _points_problems(search: SearchConfig) -> list[tuple[str, Any, str, str]]:
    """Starting points the searcher can take: whole recipes of the space, each value in its
    key's domain, no more (with the allocations' points) than the search has trials."""
    if not search.points:
        return []
    grids = [k for k, d in search.space.items() if d.kind == "grid"]
    if search.algorithm == "grid" or grids:
        return [
            (
                "points",
                search.points,
                "a grid search tries every grid value itself; starting points are for a "
                "sampled space",
                "remove search.points, or sample: choice instead of grid with search.algorithm "
                "optuna or random",
            )
        ]
    for point in search.points:  # YAML 1.1 reads the labels off / on as booleans
        for key, value in point.items():
            dist = search.space.get(key)
            if isinstance(value, bool) and dist and isinstance(dist.choice, dict):
                point[key] = {False: "off", True: "on"}[value]
    problems: list[tuple[str, Any, str, str]] = []
    allocated = sum(len(d.allocations or []) for d in search.space.values())
    if len(search.points) + allocated > search.samples:
        problems.append(
            (
                "points",
                len(search.points),
                f"{len(search.points)} starting points"
                + (f" and {allocated} allocations" if allocated else "")
                + f" are more than the search's {search.samples} trials",
                "list fewer points, or raise search.num_samples",
            )
        )
    for i, point in enumerate(search.points):
        missing = [k for k in search.space if k not in point]
        if missing:
            problems.append(
                (
                    f"points.{i}",
                    point,
                    f"gives no value for {', '.join(missing)}: the searcher starts from whole "
                    "recipes of its space",
                    f"add {missing[0]}: <value> to this point",
                )
            )
        for key, value in point.items():
            dist = search.space.get(key)
            if dist is None:
                close = difflib.get_close_matches(key, list(search.space), n=1, cutoff=0.6)
                fix = f"did you mean {close[0]}?" if close else "give only keys of search.space"
                problems.append((f"points.{i}.{key}", value, "is not a key of search.space", fix))
                continue
            outside = _outside(dist, value)
            if outside:
                problems.append((f"points.{i}.{key}", value, *outside))
    return problems


def _outside(dist: Distribution, value: Any) -> tuple[str, str] | None:
    """(message, fix) when ``value`` is not one the searcher could draw from ``dist``."""
    kind = dist.kind
    if kind == "choice":
        if isinstance(dist.choice, dict):
            if isinstance(value, str) and value in dist.choice:
                return None
            return "is not a label of this choice", f"write one of {', '.join(dist.choice)}"
        if any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in dist.choice):
            return None
        return "is not one of this choice's values", f"write one of {dist.choice}"
    lo, hi = getattr(dist, kind)
    whole = isinstance(value, _Int) and not isinstance(value, bool)
    number = whole or isinstance(value, float)
    if kind == "int" and not whole:
        return "is not a whole number", f"write a whole number between {lo} and {hi}"
    if not number or not lo <= value <= hi:
        span = f"[{lo:g}, {hi:g}]"
        return f"is outside the {kind} range {span}", f"write a number in {span}"
    return None


class Objective(ConfigModel):
    metric: str = Field(description=f"a trial metric: one of {', '.join(TRIAL_METRICS)}")
    mode: Literal["max", "min"] = Field(description="max or min")

    @model_validator(mode="after")
    def _known(self) -> Objective:
        if self.metric not in TRIAL_METRICS:
            close = difflib.get_close_matches(self.metric, TRIAL_METRICS, n=1, cutoff=0.5)
            raise cross_field_error(
                [
                    (
                        "metric",
                        self.metric,
                        "no trial reports this metric",
                        f"did you mean {close[0]}?"
                        if close
                        else f"use one of {', '.join(TRIAL_METRICS)}",
                    )
                ]
            )
        return self


class Constraints(ConfigModel):
    """A trial that breaks one is kept in the results, marked infeasible, and never picked."""

    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="eval/accuracy at most this far below the dense model's on the same "
        "validation examples (0.01 = 1 point)",
    )
    max_perplexity_increase: float | None = Field(
        default=None,
        gt=0,
        description="a language model: eval/perplexity at most this much above the dense "
        "model's on the same validation blocks, as a fraction (0.15 = within 15 %: "
        "eval/perplexity_ratio at most 1.15)",
    )
    confidence: Annotated[float, Field(gt=0.5, lt=1)] | None = Field(
        default=None,
        description="with max_accuracy_drop or max_perplexity_increase: a trial is feasible "
        "only if its paired validation drop (or perplexity increase) is within the bound with "
        "this confidence (the one-sided upper confidence bound, e.g. at 0.95); unset: the "
        "point estimate decides. (0.5, 1)",
    )
    max_size_bytes: float | None = Field(
        default=None, gt=0, description="compress/size_bytes (the artifact on disk) at most this"
    )
    min_size_ratio: float | None = Field(
        default=None, gt=0, description="dense bytes / artifact bytes at least this (2: 2x smaller)"
    )
    max_latency_ms: float | None = Field(
        default=None, gt=0, description="perf/latency_ms_b32 at most this (ms per batch of 32)"
    )
    min_speedup: float | None = Field(
        default=None, gt=0, description="perf/speedup (dense / compressed latency) at least this"
    )

    @model_validator(mode="after")
    def _confidence_needs_a_bound(self) -> Constraints:
        quality = (self.max_accuracy_drop, self.max_perplexity_increase)
        if self.confidence is not None and quality == (None, None):
            raise cross_field_error(
                [
                    (
                        "confidence",
                        self.confidence,
                        "is the confidence of the accuracy-drop (or perplexity-increase) "
                        "interval, and no max_accuracy_drop or max_perplexity_increase is set",
                        "set search.constraints.max_accuracy_drop (e.g. 0.01) or "
                        "max_perplexity_increase (e.g. 0.15), or remove "
                        "search.constraints.confidence",
                    )
                ]
            )
        if None not in quality:
            raise cross_field_error(
                [
                    (
                        "max_perplexity_increase",
                        self.max_perplexity_increase,
                        "bounds a language model's perplexity, and max_accuracy_drop a "
                        "classifier's accuracy: one search scores one kind of model",
                        "keep the one that fits the job's model",
                    )
                ]
            )
        return self


class BaselineConfig(ConfigModel):
    """The dense reference every trial is compared with, computed once per search."""

    train: bool = Field(
        default=True,
        description="fine-tune the dense model once (a Ray Train run) and start every trial "
        "from it; false: the job's model is already fine-tuned and is only evaluated",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted job keys changed for the baseline run only, e.g. {train.epochs: 2}",
    )


def confirm_seeds_problem(seeds: list[int], own: int) -> tuple[str, list[int]] | None:
    """Why ``seeds`` cannot train again a recipe trained with ``train.seed`` = ``own`` (it holds
    ``own`` itself, a seed twice or a negative one) and seeds to give instead; None when they
    can. One rule for the job's ``search.confirm_seeds`` and ``orchestrator confirm --seeds``."""
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if own in seeds:
        why = f"holds {own}, the recipe's own train.seed: that run is the trial itself"
    elif repeated:
        why = f"gives seed {repeated[0]} more than once: the same seed trains the same model again"
    elif min(seeds, default=0) < 0:
        why = "holds a negative seed; train.seed is 0 or more"
    else:
        return None
    others = [s for s in dict.fromkeys(seeds) if s != own and s >= 0]
    return why, others or [s for s in range(3) if s != own][:2]


class SearchConfig(ConfigModel):
    """Ray Tune over dotted job keys; each trial compresses, recovers, evaluates, measures."""

    space: dict[str, Distribution] = Field(
        description="dotted job key -> distribution, e.g. compress.prune.sparsity: "
        "{uniform: [0.2, 0.7]}",
        min_length=1,
    )
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="eval/accuracy", mode="max")],
        min_length=1,
        description="one (single-objective) or more (Pareto search) {metric, mode}",
    )
    constraints: Constraints = Constraints()
    select: Objective | None = Field(
        default=None,
        description="how the best feasible trial is picked (export --best); default: the first "
        "objective",
    )
    algorithm: Literal["optuna", "random", "grid"] = Field(
        default="optuna",
        description="optuna (TPE, Gaussian-process or NSGA-II sampler, through Ray Tune's Optuna "
        "integration), random, grid",
    )
    sampler: Literal["tpe", "gp", "nsga2"] = Field(
        default="tpe",
        description="optuna's sampler: tpe (tree-structured Parzen estimator), gp (Gaussian-"
        "process Bayesian optimisation; expected hypervolume improvement with several "
        "objectives) or nsga2 (a genetic algorithm for many trials)",
    )
    scheduler: Literal["none", "asha"] = Field(
        default="none", description="asha stops poor trials early (single objective only)"
    )
    num_samples: int | None = Field(
        default=None,
        ge=1,
        description="trials to run (default 8); with algorithm=grid, how often the grid repeats "
        "(default 1)",
    )
    points: list[dict[str, Any]] = Field(
        default_factory=list,
        description="recipes the searcher tries first, before it samples (Tune's "
        "points_to_evaluate): each gives every key of the space a value in its domain (a label "
        "for a labelled choice, one value for every layer of a per-layer key); with "
        "algorithm optuna or random",
    )
    time_budget_s: float | None = Field(
        default=None,
        gt=0,
        description="end the search after this many seconds; trials still running are stopped "
        "and recorded as stopped",
    )
    max_concurrent_trials: int | None = Field(
        default=None,
        ge=1,
        description="cap on trials at once; default: as many as the cluster's CPUs/GPUs fit",
    )
    max_failures: int = Field(
        default=0,
        ge=-1,
        description="retries of a trial that errored (Tune's FailureConfig; -1: unlimited); a "
        "trial whose node was preempted retries without counting",
    )
    seed: int = Field(default=0, ge=0, description="seed of the searcher")
    confirm_seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list,
        description="after the search, train the selected recipe again with each of these "
        "train.seed values (the selection's interval covers the evaluation's noise, not the "
        "recipe's own training); one whose validation loss pooled over its runs breaks the "
        "quality constraint is passed over and the next selected is trained again, up to "
        "confirm_candidates recipes; each seed costs about one trial",
    )
    confirm_candidates: int = Field(
        default=2,
        ge=1,
        description="with confirm_seeds: how many selected recipes, one after another, are "
        "trained again at most until one stays within the constraint over its seeds",
    )
    baseline: BaselineConfig = BaselineConfig()

    @model_validator(mode="after")
    def _checks(self) -> SearchConfig:
        problems = []
        kinds = {k: d.kind for k, d in self.space.items()}
        if self.algorithm == "optuna":
            for key, kind in kinds.items():
                if kind == "grid":
                    problems.append(
                        (
                            f"space.{key}.grid",
                            getattr(self.space[key], kind),
                            "grid values need search.algorithm=grid (or random, which crosses "
                            "the grid with sampled keys)",
                            f"use choice instead of grid for {key}, or search.algorithm=grid",
                        )
                    )
        if self.algorithm == "grid":
            for key, kind in kinds.items():
                if kind not in ("grid", "choice"):
                    problems.append(
                        (
                            f"space.{key}",
                            kind,
                            "a grid search enumerates values; it cannot sample a range",
                            f"give {key} as grid: [values], or use search.algorithm=optuna",
                        )
                    )
        for key, dist in self.space.items():
            problems += _per_layer_problems(key, dist, self.algorithm, self.samples)
        problems += _points_problems(self)
        # Not "set": a dumped job writes every default out, and reads back valid.
        default = type(self).model_fields["confirm_candidates"].default
        if self.confirm_candidates != default and not self.confirm_seeds:
            problems.append(
                (
                    "confirm_candidates",
                    self.confirm_candidates,
                    "has no effect without search.confirm_seeds: no recipe is trained again",
                    "add the seeds to train them with, e.g. search.confirm_seeds=[1, 2], or "
                    "remove confirm_candidates",
                )
            )
        if self.scheduler == "asha":
            if len(self.objectives) > 1:
                problems.append(
                    (
                        "scheduler",
                        "asha",
                        "early stopping ranks trials on one metric; with several objectives "
                        "trials stopped early would land on the Pareto front with their early "
                        "values",
                        "set search.scheduler=none for a multi-objective search",
                    )
                )
            elif self.objectives[0].metric not in INTERMEDIATE_METRICS:
                problems.append(
                    (
                        "scheduler",
                        "asha",
                        f"{self.objectives[0].metric} is only known at the end of a trial, so "
                        "trials cannot be compared early on it",
                        f"use an objective of {INTERMEDIATE_METRICS}, or search.scheduler=none",
                    )
                )
        if problems:
            raise cross_field_error(problems)
        return self

    @property
    def samples(self) -> int:
        return self.num_samples or (1 if self.algorithm == "grid" else 8)

    @property
    def selection(self) -> Objective:
        return self.select or self.objectives[0]

    @property
    def metrics(self) -> list[str]:
        """The metrics the objectives and the selection name."""
        return [o.metric for o in self.objectives] + [self.selection.metric]

    @property
    def scores_perplexity(self) -> bool:
        """A search of a language model: its constraint or a metric it names is a perplexity
        (``launch.check_task`` makes a language model's search say so)."""
        return self.constraints.max_perplexity_increase is not None or any(
            m in LANGUAGE_MODEL_ONLY for m in self.metrics
        )


def _under(key: str, section: str) -> bool:
    return key.startswith(section + ".")


def switched_off(space: dict[str, Distribution], sampled: dict[str, Any]) -> list[str]:
    """The technique sections this trial's sampled values turn off (a sampled null)."""
    off = []
    for section in OPTIONAL_SECTIONS:
        if section in sampled:
            try:
                value = space[section].resolve(sampled[section]) if section in space else None
            except (KeyError, TypeError):  # a label the space no longer has: not "off"
                value = sampled[section]
            if value is None:
                off.append(section)
    return off


def ignored(key: str, off: list[str]) -> bool:
    """True for a key below a switched-off section: the trial does not use it."""
    return any(_under(key, s) for s in off)


def layer_key(key: str, layer: str) -> str:
    """The searcher's name of layer ``layer``'s dimension of the per-layer key ``key``:
    ``compress.quantize.bits:encoder.layer.0.attention.self.query`` (characters an MLflow
    param name may hold, and no ``/``, which Tune reads as nesting)."""
    return f"{key}:{layer}"


def sampled_values(space: dict[str, Distribution], config: dict[str, Any]) -> dict[str, Any]:
    """The values a trial was given, by space key, from the searcher's flat ``config``: a
    per-layer key's dimensions (``layer_key``) gathered into {layer: value}. A config that
    already holds a space key as such (a trial record) is taken as it is."""
    out: dict[str, Any] = {}
    for key, dist in space.items():
        if key in config:
            out[key] = config[key]
        elif dist.per_layer:
            prefix = layer_key(key, "")
            layers = {k[len(prefix) :]: v for k, v in config.items() if k.startswith(prefix)}
            if layers:
                out[key] = layers
    return out


def trial_overrides(space: dict[str, Distribution], sampled: dict[str, Any]) -> dict[str, Any]:
    """Dotted overrides for one trial: labels resolved, sections applied before their keys, and
    keys below a section the trial switched off dropped (they would re-create it). A per-layer
    key sets its stage's ``layers``: {layer: value}, or one value for all ({"*": value})."""
    off = switched_off(space, sampled)
    out: dict[str, Any] = {}
    for key in sorted(sampled, key=lambda k: k.count(".")):
        if ignored(key, off):
            continue
        dist = space.get(key)
        if dist is not None and dist.per_layer:
            value = sampled[key]
            layers = value if isinstance(value, dict) else {"*": value}
            out[PER_LAYER[key]] = {n: dist.resolve(v) for n, v in layers.items()}
        else:
            out[key] = dist.resolve(sampled[key]) if dist is not None else sampled[key]
    return out


# Sections of a search job that its trials' and baseline's own jobs leave out.
DRIVER_ONLY = ("search", "tracking")


def trial_base(job: dict[str, Any], search: SearchConfig, baseline_model: str) -> dict[str, Any]:
    """The raw job every trial starts from (its sampled keys go on top): the job without its
    search section and its tracking (the search driver alone logs to trackers), starting from
    the fine-tuned dense baseline at ``baseline_model`` when the search trains one (and
    distilling from it, when the job distils)."""
    base = copy.deepcopy({k: v for k, v in job.items() if k not in DRIVER_ONLY})
    if search.baseline.train:
        num_layers = (job.get("model") or {}).get("num_layers")
        base["model"] = {"path": baseline_model, "num_layers": num_layers}
    return base


def baseline_base(
    job: dict[str, Any], search: SearchConfig, exclusive: list[tuple[str, ...]] | tuple = ()
) -> dict[str, Any]:
    """The raw dense job: no search, no tracking, no compression, no distillation (the dense
    model is the teacher: it learns from the labels), the baseline's own overrides applied."""
    raw = copy.deepcopy({k: v for k, v in job.items() if k not in (*DRIVER_ONLY, "compress")})
    raw.setdefault("train", {})["distill"] = None
    return apply_overrides(raw, search.baseline.overrides, exclusive)
