"""The job's ``compress`` section: one optional sub-section per stage, applied in the order of
the fields of ``CompressConfig`` (vocab -> depth -> prune -> factorize -> quantize), so no order
can be wrong.

Each sub-section is one technique config, picked by its ``method`` (a pydantic discriminated
union): a class per method holding only the keys that method takes, so a key that does not apply
to the chosen method is an error naming it. Every knob is a dotted key that overrides and the
search space address alike (``compress.prune.sparsity``).

Adding a technique: a ``*Config`` class below, deriving from its stage's base
(``VocabMethod``, ``DepthMethod``, ``PruneMethod``, ``FactorizeMethod``, ``QuantizeMethod``)
with ``method: Literal["name"] = "name"`` (the stage's union picks it up), and its handler in
``orchestrator/compress/techniques/`` (registered for the class). Nothing else changes.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import Discriminator, Field, Tag, TypeAdapter, model_validator

from orchestrator.config.base import ConfigModel, cross_field_error

# Output heads stay dense by default: a classifier's are tiny and sensitive, and a language
# model's output head is usually the input embedding table itself (tied), which the
# embedding options of quantization cover.
DEFAULT_EXCLUDE = ["*classifier*", "*score*", "*pooler*", "lm_head"]


class TechniqueConfig(ConfigModel):
    """Base of every technique's config: its ``method`` tag."""

    stage: ClassVar[str] = ""  # the compress sub-section that takes it
    # Unstructured masks are re-applied to whole weights after every optimizer step, which a
    # ZeRO-3 worker, holding only a shard of each weight, cannot do.
    needs_whole_weights: ClassVar[bool] = False

    method: str


def candidate_problems(
    values_key: str, values: list[float], budget_key: str, budget: float | None, what: str
) -> list[tuple[str, Any, str, str]]:
    """An allocation's candidates listed once each, and a mean ``budget`` (None: none to
    check) that some choice of them reaches."""
    problems: list[tuple[str, Any, str, str]] = []
    if len(set(values)) != len(values):
        problems.append((values_key, values, f"lists a {what} twice", f"list each {what} once"))
    if budget is not None and values:
        lo, hi = min(values), max(values)
        if not lo - 1e-9 <= budget <= hi + 1e-9:
            problems.append(
                (
                    budget_key,
                    budget,
                    f"no allocation of {sorted(set(values))} averages {budget:g} (every layer "
                    f"at {lo:g} averages {lo:g}, every layer at {hi:g} averages {hi:g})",
                    f"set {budget_key} between {lo:g} and {hi:g}, or add candidates to "
                    f"{values_key}",
                )
            )
    return problems


def _plain(value: Any) -> Any:
    """A sub-section's value as the job wrote it (a dict), for an error message."""
    return value.model_dump() if isinstance(value, ConfigModel) else value


# The calibration batches an ``allocate`` section measures its profile on, unless it says.
ALLOCATE_CALIB_BATCHES = 2


def _calib_batches_field() -> Any:
    return Field(
        default=ALLOCATE_CALIB_BATCHES,
        ge=1,
        le=1024,
        description="calibration batches the sensitivity is measured on (the first of "
        "compress.calib_batches)",
    )


def _refine_field() -> Any:
    return Field(
        default=0,
        ge=0,
        le=1000,
        description="after the knapsack, up to this many allocations measured with every layer "
        "changed at once, each one step from the best so far (one or two layers moved one "
        "candidate within the budget, the profile's least harmful moves first); 0 keeps the "
        "knapsack's (and the joint check's) choice",
    )


def _layers_field(what: str, unmatched: str) -> Any:
    return Field(
        default_factory=dict,
        description=f"per-layer {what}: module-name glob pattern (fnmatch) -> value; a layer "
        "takes the value of the first pattern that matches its name or the name of a module "
        f"holding it, the others {unmatched}; each pattern must match a targeted layer "
        "(exclusive with allocate)",
    )


def layers_problems(layers: dict[str, Any], allocate: Any) -> list[tuple[str, Any, str, str]]:
    """``layers`` (set by hand, or per layer by a search) and ``allocate`` (chosen from a
    measured profile) both decide each layer's setting: one of them."""
    if not layers or allocate is None:
        return []
    return [
        (
            "layers",
            layers,
            "sets each layer's value by hand, and allocate chooses them from a measured profile",
            "keep one of layers and allocate",
        )
    ]


class SelectsModules(TechniqueConfig):
    """A technique applied to the modules ``include`` / ``exclude`` select."""

    include: list[str] = Field(
        default_factory=lambda: ["*"],
        description="module-name glob patterns to compress (fnmatch); each must match a module",
    )
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="module-name glob patterns kept untouched (default: output heads)",
    )


# ---------------------------------------------------------------------------------------------
# vocab


class VocabMethod(TechniqueConfig):
    """Shrink the input embedding table to the vocabulary a task uses."""

    stage: ClassVar[str] = "vocab"
    default_method: ClassVar[str] = "trim"


class TrimVocabConfig(VocabMethod):
    """Keep the embedding rows of the tokens the training split uses (and every special
    token); the others read a kept row. The tokenizer is unchanged, so the model still takes
    raw text and tokenizes exactly as before."""

    method: Literal["trim"] = "trim"
    min_count: int = Field(
        default=1,
        ge=1,
        description="keep a token the training split uses at least this many times, >= 1",
    )
    unseen: Literal["nearest", "unknown"] = Field(
        default="nearest",
        description="what a token that was not kept reads: nearest (the kept row closest to "
        "its own embedding, by cosine) or unknown (the unknown token's row)",
    )


# ---------------------------------------------------------------------------------------------
# depth


class DepthMethod(SelectsModules):
    """Remove whole transformer blocks (the model gets shallower: bytes and time drop)."""

    stage: ClassVar[str] = "depth"
    default_method: ClassVar[str] = "similarity"


class SimilarityDepthConfig(DepthMethod):
    """Remove the blocks that change their input least on calibration data: the highest cosine
    similarity between a block's input and output hidden states (ShortGPT's block influence,
    Men et al. 2024)."""

    exclusive: ClassVar[tuple[str, ...]] = ("blocks", "ratio")

    method: Literal["similarity"] = "similarity"
    blocks: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="how many blocks to remove, >= 1 (exclusive with ratio)"
    )
    ratio: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        default=None, description="fraction of the blocks to remove, rounded, (0, 1)"
    )

    @model_validator(mode="after")
    def _one_count(self) -> SimilarityDepthConfig:
        given = [k for k in self.exclusive if getattr(self, k) is not None]
        if len(given) != 1:
            raise cross_field_error(
                [
                    (
                        given[1] if len(given) > 1 else "blocks",
                        getattr(self, given[1]) if len(given) > 1 else None,
                        "exactly one of compress.depth.blocks and ratio must be set",
                        "keep one, e.g. compress.depth.blocks=2",
                    )
                ]
            )
        return self


class NamedDepthConfig(DepthMethod):
    """Remove the blocks the user names."""

    method: Literal["named"] = "named"
    remove: list[Annotated[int, Field(ge=0)]] = Field(
        min_length=1, description="indices of the blocks to remove (0: the first block)"
    )


# ---------------------------------------------------------------------------------------------
# prune


class PruneMethod(SelectsModules):
    """Remove weights: unstructured (magnitude, Wanda) or structured (FFN neurons, heads)."""

    stage: ClassVar[str] = "prune"
    default_method: ClassVar[str] = "magnitude"


class UnstructuredPruneMethod(PruneMethod):
    """Zeroes individual weights (masks kept through recovery training)."""

    needs_whole_weights: ClassVar[bool] = True

    sparsity: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="fraction of the targeted weights removed, [0, 1) (with allocate: the "
        "mean over them, each layer at its own)",
    )
    scope: Literal["global", "layer"] = Field(
        default="layer",
        description="global: one threshold over all targeted layers; layer: each layer alone",
    )
    pattern: Annotated[str, Field(pattern=r"^[1-9][0-9]?:[1-9][0-9]?$")] | None = Field(
        default=None,
        description="semi-structured N:M sparsity, e.g. '2:4': N weights kept in every M "
        "consecutive inputs of each output row (the layout sparse tensor cores run); sparsity "
        "must be 1 - N/M; one-shot, per layer",
    )
    schedule: Literal["oneshot", "gradual"] = Field(
        default="oneshot",
        description="oneshot: prune before training; gradual: cubic schedule from "
        "initial_sparsity to sparsity between start_step and end_step of recovery training",
    )
    initial_sparsity: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="gradual: sparsity at start_step, [0, 1)"
    )
    start_step: int = Field(default=0, ge=0, description="gradual: first pruning step")
    end_step: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="gradual: step where the final sparsity is reached (default: 2/3 of training)",
    )
    update_every: int = Field(default=10, ge=1, description="gradual: steps between mask updates")

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``pattern`` as (kept, group), or None."""
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @model_validator(mode="after")
    def _schedule(self) -> UnstructuredPruneMethod:
        problems = []
        if self.n_m is not None:
            n, m = self.n_m
            if n >= m:
                problems.append(
                    (
                        "pattern",
                        self.pattern,
                        f"keeps {n} of every {m} weights: nothing would be removed",
                        "use N < M, e.g. compress.prune.pattern=2:4",
                    )
                )
            elif abs(self.sparsity - (1 - n / m)) > 1e-9:
                problems.append(
                    (
                        "sparsity",
                        self.sparsity,
                        f"pattern {self.pattern} keeps {n} of every {m} weights, a sparsity "
                        f"of {1 - n / m:g}",
                        f"set compress.prune.sparsity={1 - n / m:g}",
                    )
                )
            for key, value, fine in (
                ("schedule", self.schedule, "oneshot"),
                ("scope", self.scope, "layer"),
            ):
                if value != fine:
                    problems.append(
                        (
                            key,
                            value,
                            "an N:M pattern is chosen once, in each layer's rows",
                            f"set compress.prune.{key}={fine}, or remove compress.prune.pattern",
                        )
                    )
        if self.schedule == "gradual" and self.initial_sparsity > self.sparsity:
            problems.append(
                (
                    "initial_sparsity",
                    self.initial_sparsity,
                    f"is above the final sparsity {self.sparsity}",
                    "set compress.prune.initial_sparsity <= compress.prune.sparsity",
                )
            )
        if self.end_step is not None and self.end_step <= self.start_step:
            problems.append(
                (
                    "end_step",
                    self.end_step,
                    f"must be after start_step {self.start_step}",
                    "raise compress.prune.end_step",
                )
            )
        if problems:
            raise cross_field_error(problems)
        return self


class AllocateSparsityConfig(ConfigModel):
    """Per-layer sparsities under a mean-sparsity budget (``compress.prune.sparsity``), from a
    measured sensitivity profile (``orchestrator.compress.sensitivity``)."""

    sparsities: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.0, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875],
        min_length=1,
        description="the sparsities a Linear may get, each in [0, 1)",
    )
    calib_batches: int = _calib_batches_field()
    refine: int = _refine_field()


class AllocatesSparsity(UnstructuredPruneMethod):
    """An unstructured method whose sparsity may be allocated per layer."""

    allocate: AllocateSparsityConfig | None = Field(
        default=None,
        description="per-layer sparsity: each Linear gets one of allocate.sparsities, chosen to "
        "lose the least (the measured KL divergence of the model's outputs on calibration data "
        "when only that layer is pruned) with compress.prune.sparsity as the mean over the "
        "pruned weights",
    )

    layers: dict[str, Annotated[float, Field(ge=0.0, lt=1.0)]] = _layers_field(
        "sparsity, each in [0, 1)", "take compress.prune.sparsity"
    )

    @model_validator(mode="after")
    def _allocation_fits(self) -> AllocatesSparsity:
        problems = layers_problems(self.layers, self.allocate)
        per_layer = "allocate" if self.allocate is not None else "layers" if self.layers else None
        if per_layer is None:
            return self
        if self.allocate is not None:
            problems += candidate_problems(
                "allocate.sparsities",
                self.allocate.sparsities,
                "sparsity",
                self.sparsity,
                "sparsity",
            )
        for key, value, fine, why in (
            ("schedule", self.schedule, "oneshot", "each layer's sparsity is set once"),
            ("scope", self.scope, "layer", "global scope is itself one threshold for all layers"),
            ("pattern", self.pattern, None, "an N:M pattern fixes every layer's sparsity"),
        ):
            if value != fine:
                problems.append(
                    (
                        key,
                        value,
                        f"cannot be combined with compress.prune.{per_layer}: {why}",
                        f"remove compress.prune.{per_layer}, or set compress.prune.{key}={fine}"
                        if fine is not None
                        else "remove one of them",
                    )
                )
        if problems:
            raise cross_field_error(problems)
        return self


class MagnitudePruneConfig(AllocatesSparsity):
    """Unstructured pruning of the smallest |W| (saves bytes, not time: no sparse kernel)."""

    method: Literal["magnitude"] = "magnitude"


class WandaPruneConfig(AllocatesSparsity):
    """Unstructured pruning by |W| x ||X|| on calibration inputs (Wanda, Sun et al. 2023)."""

    method: Literal["wanda"] = "wanda"


class SparseGptPruneConfig(UnstructuredPruneMethod):
    """One-shot unstructured pruning with second-order weight updates (SparseGPT, Frantar &
    Alistarh 2023): block by block on calibration inputs, each layer's least salient weights
    (w^2 / [H^-1]_jj^2) are zeroed and the remaining ones updated to keep its outputs."""

    method: Literal["sparsegpt"] = "sparsegpt"
    damp: float = Field(
        default=0.01,
        gt=0.0,
        le=1.0,
        description="dampening added to the Hessian's diagonal, as a fraction of its mean, (0, 1]",
    )

    @model_validator(mode="after")
    def _oneshot_per_layer(self) -> SparseGptPruneConfig:
        problems = []
        if self.schedule != "oneshot":
            problems.append(
                (
                    "schedule",
                    self.schedule,
                    "sparsegpt prunes once, before training, with weight updates computed on "
                    "calibration data; a gradual schedule would prune by magnitude afterwards",
                    "set compress.prune.schedule=oneshot, or use method magnitude / wanda for "
                    "a gradual schedule",
                )
            )
        if self.scope != "layer":
            problems.append(
                (
                    "scope",
                    self.scope,
                    "sparsegpt reaches the sparsity in each layer (each block of 128 columns)",
                    "set compress.prune.scope=layer",
                )
            )
        if problems:
            raise cross_field_error(problems)
        return self


class StructuredPruneConfig(PruneMethod):
    """Physically removes FFN neurons and attention heads: smaller and faster layers."""

    method: Literal["structured"] = "structured"
    sparsity: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="fraction of the FFN neurons and of the heads removed per block, [0, 1)",
    )
    heads: bool = Field(default=True, description="also prune attention heads")
    ffn: bool = Field(default=True, description="prune FFN neurons")

    @model_validator(mode="after")
    def _something(self) -> StructuredPruneConfig:
        if not (self.heads or self.ffn):
            raise cross_field_error(
                [
                    (
                        "ffn",
                        False,
                        "structured pruning with heads and ffn both off removes nothing",
                        "set compress.prune.ffn=true or heads=true",
                    )
                ]
            )
        return self


# ---------------------------------------------------------------------------------------------
# factorize


class AllocateRankConfig(ConfigModel):
    """Per-layer ranks under a parameter budget, from a measured sensitivity profile
    (``orchestrator.compress.sensitivity``)."""

    rank_ratios: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.125, 0.25, 0.375, 0.5],
        min_length=1,
        description="the ranks a Linear may get, as fractions of min(in, out), each in (0, 1); "
        "a layer may also stay dense",
    )
    param_ratio: float = Field(
        gt=0.0,
        le=1.0,
        description="budget: the selected Linears' weights after factorization, as a fraction "
        "of their dense count, (0, 1]",
    )
    calib_batches: int = _calib_batches_field()
    refine: int = _refine_field()

    @model_validator(mode="after")
    def _once_each(self) -> AllocateRankConfig:
        problems = candidate_problems("rank_ratios", self.rank_ratios, "", None, "rank ratio")
        if problems:
            raise cross_field_error(problems)
        return self


class FactorizeMethod(SelectsModules):
    """Low-rank factorization of Linear layers into two thinner Linears (W ~ U V)."""

    stage: ClassVar[str] = "factorize"
    default_method: ClassVar[str] = "svd"
    # At most one of these may be given on the command line over a job that sets another.
    exclusive: ClassVar[tuple[str, ...]] = ("rank", "rank_ratio", "energy", "allocate")

    rank: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="fixed rank per layer, >= 1 (exclusive with rank_ratio, energy, allocate)",
    )
    rank_ratio: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        default=None, description="rank as a fraction of min(in, out), (0, 1]"
    )
    energy: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        default=None, description="smallest rank keeping this fraction of sum(sigma^2), (0, 1]"
    )
    allocate: AllocateRankConfig | None = Field(
        default=None,
        description="per-layer rank: each Linear gets one of allocate.rank_ratios or stays "
        "dense, chosen to lose the least (the measured KL divergence of the model's outputs on "
        "calibration data when only that layer is factorized) under allocate.param_ratio",
    )

    layers: dict[str, Annotated[float, Field(gt=0.0, le=1.0)]] = _layers_field(
        "rank, as a fraction of min(in, out) in (0, 1] (1: the layer stays dense)",
        "follow rank, rank_ratio or energy",
    )

    @model_validator(mode="after")
    def _one_rank_rule(self) -> FactorizeMethod:
        problems = layers_problems(self.layers, self.allocate)
        if problems:
            raise cross_field_error(problems)
        given = [k for k in self.exclusive if getattr(self, k) is not None]
        if len(given) != 1:
            raise cross_field_error(
                [
                    (
                        given[1] if len(given) > 1 else "rank",
                        _plain(getattr(self, given[1])) if len(given) > 1 else None,
                        "exactly one of compress.factorize.rank, rank_ratio, energy, allocate "
                        "must be set" + (f" (got {', '.join(given)})" if given else ""),
                        "keep one, e.g. compress.factorize.rank_ratio=0.25",
                    )
                ]
            )
        return self


class SvdConfig(FactorizeMethod):
    """Truncated SVD of each weight: minimises the weight error ||W - W_r||."""

    method: Literal["svd"] = "svd"


class AsvdConfig(FactorizeMethod):
    """Activation-aware SVD: SVD of W whitened by the calibration inputs' Gram matrix, which
    minimises the layer's output error on that data."""

    method: Literal["asvd"] = "asvd"


# ---------------------------------------------------------------------------------------------
# quantize


class QuantizeMethod(SelectsModules):
    """Weights (and optionally activations) at reduced precision."""

    stage: ClassVar[str] = "quantize"
    default_method: ClassVar[str] = "fake"

    embeddings: bool = Field(
        default=True,
        description="also quantize Embedding tables (per row, stored packed; only the rows "
        "looked up are dequantized)",
    )
    embedding_bits: Annotated[int, Field(ge=2, le=8)] | None = Field(
        default=None,
        description="bit width of the Embedding tables, 2-8; default: the method's bit width",
    )
    activation_scaling: bool = Field(
        default=False,
        description="before rounding, scale each Linear's input channels and fold the inverse "
        "into the layer that produces them (pre-norm decoder blocks: Llama, Mistral, Qwen2): "
        "AWQ-style (from mean |x|) for weight-only rounding, SmoothQuant-style (from max |x| "
        "and max |w|) when inputs are quantized too (dynamic_int8, fake with activations); "
        "the strength is searched per group on the calibration batches",
    )
    scaling_alpha: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        default=None,
        description="with activation_scaling: a fixed strength in [0, 1] for every group "
        "instead of the searched one",
    )

    @model_validator(mode="after")
    def _alpha_needs_scaling(self) -> QuantizeMethod:
        if self.scaling_alpha is not None and not self.activation_scaling:
            raise cross_field_error(
                [
                    (
                        "scaling_alpha",
                        self.scaling_alpha,
                        "is set but activation_scaling is false, so nothing is scaled",
                        "set activation_scaling: true, or remove scaling_alpha",
                    )
                ]
            )
        return self


class AllocateBitsConfig(ConfigModel):
    """Per-layer bit widths under an average-bits budget, from a measured sensitivity profile
    (``orchestrator.compress.sensitivity``)."""

    bits: list[Annotated[int, Field(ge=2, le=8)]] = Field(
        default_factory=lambda: [2, 3, 4, 8],
        min_length=1,
        description="the bit widths a Linear may get, each 2-8",
    )
    avg_bits: float = Field(
        gt=0,
        description="budget: the mean bit width of the Linear weights, weighted by their "
        "sizes (scales not counted), between the smallest and largest of bits",
    )
    calib_batches: int = _calib_batches_field()
    refine: int = _refine_field()

    @model_validator(mode="after")
    def _budget_reachable(self) -> AllocateBitsConfig:
        problems = candidate_problems("bits", self.bits, "avg_bits", self.avg_bits, "bits")
        if problems:
            raise cross_field_error(problems)
        return self


class LowBitQuantizeMethod(QuantizeMethod):
    """Any bit width, packed in the artifact."""

    bits: int = Field(
        default=8,
        ge=2,
        le=8,
        description="bit width of weights, 2-8 (with allocate: of the embeddings only, unless "
        "embedding_bits is set)",
    )
    granularity: Literal["tensor", "channel", "group"] = Field(
        default="channel", description="one scale per tensor, per output channel, or per group"
    )
    group_size: int = Field(default=64, ge=8, description="group granularity: inputs per scale")
    symmetric: bool = Field(default=True, description="symmetric (zero point 0) or asymmetric")
    allocate: AllocateBitsConfig | None = Field(
        default=None,
        description="mixed precision: each Linear gets one of allocate.bits, chosen to lose the "
        "least (the measured KL divergence of the model's outputs on calibration data when only "
        "that layer is quantized) under the budget allocate.avg_bits",
    )
    layers: dict[str, Annotated[int, Field(ge=2, le=8)]] = _layers_field(
        "bit width of Linear weights, each 2-8", "take bits"
    )

    @model_validator(mode="after")
    def _one_per_layer_rule(self) -> LowBitQuantizeMethod:
        problems = layers_problems(self.layers, self.allocate)
        if problems:
            raise cross_field_error(problems)
        return self


class FakeQuantConfig(LowBitQuantizeMethod):
    """Quantization-aware training: fake-quant with a straight-through estimator during
    recovery; the artifact stores packed low-bit weights, dequantized at load."""

    method: Literal["fake"] = "fake"
    activations: bool = Field(
        default=False, description="also fake-quantize Linear inputs (8-bit, per tensor)"
    )


class WeightOnlyConfig(LowBitQuantizeMethod):
    """Packed low-bit weights, dequantized at load (bytes saved, no faster kernel)."""

    method: Literal["weight_only"] = "weight_only"


class GptqConfig(LowBitQuantizeMethod):
    """GPTQ (Frantar et al. 2022): packed low-bit weights whose rounding errors are compensated
    by updating the weights not rounded yet, block by block on calibration inputs (the
    Hessian of each layer's output error); stored and loaded as weight_only."""

    method: Literal["gptq"] = "gptq"
    granularity: Literal["tensor", "channel", "group"] = Field(
        default="group", description="one scale per tensor, per output channel, or per group"
    )
    act_order: bool = Field(
        default=True,
        description="round the inputs with the largest Hessian diagonal first, each group on "
        "the grid of its weights before compensation (static groups); false: the columns in "
        "their natural order, as in the paper",
    )
    damp: float = Field(
        default=0.01,
        gt=0.0,
        le=1.0,
        description="dampening added to the Hessian's diagonal, as a fraction of its mean, (0, 1]",
    )


class DynamicInt8Config(QuantizeMethod):
    """Real int8 CPU kernels for Linear layers (activations quantized per batch on the fly)
    and int8 embedding tables; always 8-bit symmetric."""

    method: Literal["dynamic_int8"] = "dynamic_int8"
    granularity: Literal["tensor", "channel"] = Field(
        default="channel", description="one weight scale per tensor or per output channel"
    )


# ---------------------------------------------------------------------------------------------
# The stage unions and the section


def _methods(stage_base: type[TechniqueConfig]) -> dict[str, type[TechniqueConfig]]:
    """Every concrete config below ``stage_base``, by its method tag, in definition order."""
    out: dict[str, type[TechniqueConfig]] = {}
    pending = list(stage_base.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending[:0] = cls.__subclasses__()
        tag = cls.model_fields["method"].annotation
        if get_origin(tag) is Literal and len(get_args(tag)) == 1:
            out[get_args(tag)[0]] = cls
    return out


def _technique_union(stage_base: type[TechniqueConfig]) -> Any:
    """The discriminated union of ``stage_base``'s methods; a section without ``method`` takes
    the stage's default."""
    methods = _methods(stage_base)

    def tag(value: Any) -> str | None:
        if isinstance(value, dict):
            return value.get("method", stage_base.default_method)
        return getattr(value, "method", None)

    members = tuple(Annotated[cls, Tag(name)] for name, cls in methods.items())
    return Annotated[Union[members], Discriminator(tag)]  # noqa: UP007 - built at run time


VocabConfig = _technique_union(VocabMethod)
DepthConfig = _technique_union(DepthMethod)
PruneConfig = _technique_union(PruneMethod)
FactorizeConfig = _technique_union(FactorizeMethod)
QuantizeConfig = _technique_union(QuantizeMethod)


class CompressConfig(ConfigModel):
    """vocab -> depth -> prune -> factorize -> quantize, each optional; absent means not
    applied. The fields' order is the order the stages are applied in."""

    vocab: VocabConfig | None = None
    depth: DepthConfig | None = None
    prune: PruneConfig | None = None
    factorize: FactorizeConfig | None = None
    quantize: QuantizeConfig | None = None
    calib_batches: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="training batches used for calibration (wanda, asvd, structured "
        "importance, SQNR), 1-1024",
    )

    @model_validator(mode="after")
    def _allocation_data(self) -> CompressConfig:
        problems = []
        for stage in ("prune", "factorize", "quantize"):
            allocate = getattr(getattr(self, stage), "allocate", None)
            if allocate is not None and allocate.calib_batches > self.calib_batches:
                problems.append(
                    (
                        f"{stage}.allocate.calib_batches",
                        allocate.calib_batches,
                        f"is more than the {self.calib_batches} calibration batches "
                        "(compress.calib_batches)",
                        f"set it to at most {self.calib_batches}, or raise compress.calib_batches",
                    )
                )
        if problems:
            raise cross_field_error(problems)
        return self

    def techniques(self) -> list[TechniqueConfig]:
        """The techniques this job applies, in stage order."""
        return [getattr(self, s) for s in STAGES if getattr(self, s) is not None]

    @property
    def enabled(self) -> bool:
        return bool(self.techniques())


# The stages, in the order they are applied: the fields of CompressConfig holding a technique.
STAGES: tuple[str, ...] = tuple(
    name for name in CompressConfig.model_fields if name not in ("calib_batches",)
)


def _stage_bases() -> list[type[TechniqueConfig]]:
    """The classes that open a stage: they set ``stage`` and ``default_method`` themselves."""
    out, pending = [], list(TechniqueConfig.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending += cls.__subclasses__()
        if "stage" in cls.__dict__ and "default_method" in cls.__dict__:
            out.append(cls)
    return out


# Each stage's methods by tag.
STAGE_METHODS: dict[str, dict[str, type[TechniqueConfig]]] = {
    base.stage: _methods(base) for base in _stage_bases()
}
_ADAPTERS = {s: TypeAdapter(CompressConfig.model_fields[s].annotation) for s in STAGES}


def technique_config(stage: str, raw: dict[str, Any]) -> TechniqueConfig:
    """Validate one stage's section from its JSON form (as a manifest records it)."""
    return _ADAPTERS[stage].validate_python(raw)
