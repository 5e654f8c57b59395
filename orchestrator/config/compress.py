"""The job's ``compress`` section: three optional sub-sections applied in a fixed order
(prune -> factorize -> quantize), so every knob is a dotted key that overrides and the search
space address alike (``compress.prune.sparsity``). One config type per technique."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.config.base import cross_field_error

# Classification heads stay dense by default: they are tiny and sensitive.
DEFAULT_EXCLUDE = ["*classifier*", "*score*", "*pooler*"]


class _Technique(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    include: list[str] = Field(
        default_factory=lambda: ["*"],
        description="module-name glob patterns to compress (fnmatch); each must match a module",
    )
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="module-name glob patterns kept untouched (default: classifier heads)",
    )


class PruneConfig(_Technique):
    """Remove weights: unstructured (magnitude, Wanda) or structured (FFN neurons, heads)."""

    method: Literal["magnitude", "wanda", "structured"] = Field(
        default="magnitude",
        description="magnitude (|W|), wanda (|W| x ||X|| on calibration data), or structured "
        "(physically removes FFN neurons and attention heads)",
    )
    sparsity: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="fraction removed, [0, 1): of the targeted weights (unstructured) or of the "
        "FFN neurons and heads (structured)",
    )
    scope: Literal["global", "layer"] = Field(
        default="layer",
        description="global: one threshold over all targeted layers; layer: each layer alone",
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
    heads: bool = Field(default=True, description="structured: also prune attention heads")
    ffn: bool = Field(default=True, description="structured: prune FFN neurons")

    @model_validator(mode="after")
    def _checks(self) -> PruneConfig:
        problems = []
        if self.schedule == "gradual" and self.method == "structured":
            problems.append(
                (
                    "schedule",
                    "gradual",
                    "structured pruning is one-shot (shapes "
                    "change, so it cannot happen mid-training)",
                    "set compress.prune.schedule=oneshot",
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
        if self.method == "structured" and not (self.heads or self.ffn):
            problems.append(
                (
                    "ffn",
                    False,
                    "structured pruning with heads and ffn both off removes nothing",
                    "set compress.prune.ffn=true or heads=true",
                )
            )
        if problems:
            raise cross_field_error(problems)
        return self


class FactorizeConfig(_Technique):
    """Low-rank factorization of Linear layers into two thinner Linears (W ~ U V)."""

    method: Literal["svd", "asvd"] = Field(
        default="svd",
        description="svd (truncated SVD of W) or asvd (activation-aware: SVD of W whitened by "
        "the calibration inputs' Gram matrix, minimising the layer's output error)",
    )
    rank: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="fixed rank per layer, >= 1 (exclusive with rank_ratio, energy)"
    )
    rank_ratio: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        default=None, description="rank as a fraction of min(in, out), (0, 1]"
    )
    energy: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        default=None, description="smallest rank keeping this fraction of sum(sigma^2), (0, 1]"
    )

    @model_validator(mode="after")
    def _one_rank_rule(self) -> FactorizeConfig:
        given = [k for k in ("rank", "rank_ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise cross_field_error(
                [
                    (
                        given[1] if len(given) > 1 else "rank",
                        getattr(self, given[1]) if len(given) > 1 else None,
                        "exactly one of compress.factorize.rank, rank_ratio, energy must be set"
                        + (f" (got {', '.join(given)})" if given else ""),
                        "keep one, e.g. compress.factorize.rank_ratio=0.25",
                    )
                ]
            )
        return self


class QuantizeConfig(_Technique):
    """Weights (and optionally activations) at reduced precision."""

    method: Literal["fake", "dynamic_int8", "weight_only"] = Field(
        default="fake",
        description="fake: quantization-aware training with fake-quant (STE), exported packed; "
        "dynamic_int8: real int8 CPU kernels for Linear layers (8 bits only); weight_only: "
        "packed low-bit weights dequantized at load",
    )
    bits: int = Field(default=8, ge=2, le=8, description="bit width of weights, 2-8")
    granularity: Literal["tensor", "channel", "group"] = Field(
        default="channel", description="one scale per tensor, per output channel, or per group"
    )
    group_size: int = Field(default=64, ge=8, description="group granularity: inputs per scale")
    symmetric: bool = Field(default=True, description="symmetric (zero point 0) or asymmetric")
    activations: bool = Field(
        default=False, description="fake: also fake-quantize Linear inputs (8-bit, per tensor)"
    )
    embeddings: bool = Field(
        default=True, description="also quantize Embedding tables (weight-only, per row)"
    )

    @model_validator(mode="after")
    def _checks(self) -> QuantizeConfig:
        problems = []
        if self.method == "dynamic_int8" and self.bits != 8:
            problems.append(
                (
                    "bits",
                    self.bits,
                    "dynamic_int8 uses 8-bit kernels",
                    "set compress.quantize.bits=8, or method=weight_only / fake for fewer bits",
                )
            )
        if self.method == "dynamic_int8" and self.granularity == "group":
            problems.append(
                (
                    "granularity",
                    "group",
                    "int8 kernels take per-tensor or per-channel scales",
                    "set compress.quantize.granularity=channel",
                )
            )
        if self.activations and self.method != "fake":
            problems.append(
                (
                    "activations",
                    True,
                    "activation fake-quant is for method=fake",
                    "set compress.quantize.activations=false",
                )
            )
        if problems:
            raise cross_field_error(problems)
        return self


class CompressConfig(BaseModel):
    """prune -> factorize -> quantize, each optional; absent means not applied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prune: PruneConfig | None = None
    factorize: FactorizeConfig | None = None
    quantize: QuantizeConfig | None = None
    calib_batches: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="training batches used for calibration (wanda, asvd, SQNR), 1-1024",
    )

    @property
    def enabled(self) -> bool:
        return any(s is not None for s in (self.prune, self.factorize, self.quantize))
