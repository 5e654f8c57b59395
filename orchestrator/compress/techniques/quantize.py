"""Quantization techniques: ``fake`` (quantization-aware training), ``weight_only`` (packed
low-bit weights), ``gptq`` (packed low-bit weights rounded with second-order error compensation,
``compress.hessian``) and ``dynamic_int8`` (real int8 CPU kernels).

All three train the same way: every selected nn.Linear (and nn.Embedding with ``embeddings``)
becomes a ``QuantLinear`` / ``QuantEmbedding`` whose forward sees the weights it will ship with
(straight-through estimator). They differ in the inference form (``to_inference_``): int8
kernels and int8 embedding tables for ``dynamic_int8``, dequantized float weights otherwise. In
the artifact a quantized weight is stored as packed codes plus scales (``qtensor.encode``), with
a bitmap of the non-zeros when it is also sparse; the manifest entry lists the quantized modules
so that a fresh model is wrapped the same way before its weights load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from orchestrator.compress.common import (
    FilterFn,
    ModuleRow,
    bitmap,
    per_layer,
    select_modules,
    set_module,
    sqnr_db,
    unbitmap,
)
from orchestrator.compress.qmodules import (
    ActQuantLinear,
    Int8Embedding,
    PackedEmbedding,
    QuantEmbedding,
    QuantLinear,
    WeightSpec,
    dequantized_embedding,
    dequantized_linear,
    quantized_bits,
    quantized_weight,
    to_dynamic_int8_linear,
)
from orchestrator.compress.qtensor import (
    decode,
    dequantize,
    encode,
    encoded_nbytes,
    fake_quantize,
    pack_codes,
    unpack_codes,
)
from orchestrator.compress.technique import Applied, Context, Technique, register
from orchestrator.config.compress import (
    DynamicInt8Config,
    FakeQuantConfig,
    GptqConfig,
    QuantizeMethod,
    WeightOnlyConfig,
)
from orchestrator.errors import ConfigError, Problem

QuantizeConfig = QuantizeMethod


def linear_spec(cfg: QuantizeConfig, bits: int | None = None) -> WeightSpec:
    """dynamic_int8 trains what the int8 kernels compute: 8-bit symmetric, per channel (or per
    tensor if asked). fake / weight_only use the config as given, at ``bits`` when the layer
    was allocated a width of its own."""
    if isinstance(cfg, DynamicInt8Config):
        return WeightSpec(8, cfg.granularity, 1, True)
    return WeightSpec(bits or cfg.bits, cfg.granularity, cfg.group_size, cfg.symmetric)


def embedding_spec(cfg: QuantizeConfig) -> WeightSpec:
    """Embedding tables: per row, at ``embedding_bits`` when given, else the method's bits
    (8, symmetric, for dynamic_int8)."""
    if isinstance(cfg, DynamicInt8Config):
        return WeightSpec(cfg.embedding_bits or 8, "channel", 1, True)
    return WeightSpec(cfg.embedding_bits or cfg.bits, "channel", 1, cfg.symmetric)


def _activations(cfg: QuantizeConfig) -> bool:
    return bool(getattr(cfg, "activations", False))


def _int8_kernels(cfg: QuantizeConfig) -> bool:
    return isinstance(cfg, DynamicInt8Config)


def _skip_reason(
    model: nn.Module, name: str, module: nn.Module, cfg: QuantizeConfig, tied: dict[str, str]
) -> str:
    """Why ``module`` cannot be quantized ("" when it can); ``tied``: ``tied_heads(model)``."""
    if isinstance(module, (QuantLinear, QuantEmbedding, ActQuantLinear)):
        return "already quantized"
    table = tied.get(name)
    if table is not None and cfg.embeddings:
        return f"shares its weight with {table}: quantized with the embeddings, on their grid"
    parent = name.rpartition(".")[0]
    if isinstance(model.get_submodule(parent) if parent else model, nn.MultiheadAttention):
        return (
            "inside nn.MultiheadAttention, which reads the weight directly instead of "
            "calling the Linear's forward"
        )
    if isinstance(module, nn.Linear):
        spec = linear_spec(cfg)
        if spec.granularity == "group" and module.in_features % spec.group_size:
            return f"group_size {spec.group_size} does not divide in_features {module.in_features}"
    return ""


def _row(
    name: str,
    module: nn.Module,
    spec: WeightSpec | None,
    *,
    skipped: bool = False,
    reason: str = "",
    extra: dict | None = None,
) -> ModuleRow:
    w = module.weight
    details: dict[str, Any] = {}
    if spec is not None:
        details = {"bits": spec.bits, "granularity": spec.granularity, "symmetric": spec.symmetric}
        if spec.granularity == "group":
            details["group_size"] = spec.group_size
    details.update(extra or {})
    kind = "Embedding" if isinstance(module, nn.Embedding) else "Linear"
    n = sum(p.numel() for p in module.parameters())
    return ModuleRow(
        name=name,
        technique="quantize",
        kind=kind,
        shape_before=list(w.shape),
        shape_after=list(w.shape),
        params_before=n,
        params_after=n,
        skipped=skipped,
        reason=reason,
        details=details,
    )


def quantizable(
    model: nn.Module, cfg: QuantizeConfig, filter_fn: FilterFn | None = None
) -> list[tuple[str, nn.Module, str]]:
    """The selected modules with the reason each cannot be quantized ("" when it can)."""
    modules = select_modules(
        model, cfg.include, cfg.exclude, _types(cfg), "compress.quantize", filter_fn=filter_fn
    )
    tied = tied_heads(model)  # once: every module's reason consults it
    return [(n, m, _skip_reason(model, n, m, cfg, tied)) for n, m in modules]


def apply_quantize_(
    model: nn.Module,
    cfg: QuantizeConfig,
    *,
    filter_fn: FilterFn | None = None,
    layer_bits: dict[str, int] | None = None,
) -> list[ModuleRow]:
    """Training form, in place: every selected nn.Linear (and nn.Embedding when
    ``cfg.embeddings``) becomes a QuantLinear / QuantEmbedding sharing its Parameters, a Linear
    named in ``layer_bits`` at its own bit width. Layers that cannot be quantized (or already
    are) are skipped and reported. Idempotent."""
    rows = []
    for name, module, reason in quantizable(model, cfg, filter_fn):
        is_emb = isinstance(module, nn.Embedding)
        spec = embedding_spec(cfg) if is_emb else linear_spec(cfg, (layer_bits or {}).get(name))
        if reason:
            rows.append(_row(name, module, spec, skipped=True, reason=reason))
            continue
        new = (
            QuantEmbedding.from_embedding(module, spec)
            if is_emb
            else QuantLinear.from_linear(module, spec, _activations(cfg))
        )
        with torch.no_grad():
            w = module.weight.detach()
            sq = sqnr_db(w, fake_quantize(w, *spec.as_args()))
        set_module(model, name, new)
        rows.append(_row(name, module, spec, extra={"sqnr_db": sq, "method": cfg.method}))
    for head, table in tied_heads(model).items():
        quantized_table = isinstance(model.get_submodule(table), QuantEmbedding)
        if quantized_table and not isinstance(model.get_submodule(head), QuantLinear):
            rows.append(_wrap_tied_head(model, head, table, cfg))
    return rows


def tied_heads(model: nn.Module) -> dict[str, str]:
    """Linear layers whose weight is an embedding table's (a language model's output head tied
    to its input embeddings): ``{head name: table name}``."""
    tables = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return {
        n: tables[id(m.weight)]
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and id(m.weight) in tables
    }


def _wrap_tied_head(model: nn.Module, head: str, table: str, cfg: QuantizeConfig) -> ModuleRow:
    """The head of a quantized tied table computes with the table's rounded rows: one row of
    the table is one output channel of the head, so the head takes the table's per-row grid
    (training sees what the artifact, which stores the tensor once, will hold)."""
    module = model.get_submodule(head)
    spec = embedding_spec(cfg)
    set_module(model, head, QuantLinear.from_linear(module, spec, False))
    return _row(head, module, spec, extra={"tied_to": table, "method": cfg.method})


@torch.no_grad()
def to_inference_(model: nn.Module, cfg: QuantizeConfig) -> list[ModuleRow]:
    """Inference form, in place, of a model in training form (if it holds no QuantLinear /
    QuantEmbedding yet, ``apply_quantize_`` is run first, e.g. on a plain model loaded from a
    checkpoint).

    * dynamic_int8: QuantLinear -> ``torch.ao.nn.quantized.dynamic.Linear`` (real int8 CPU
      kernel; a model not on CPU keeps a dequantized nn.Linear and the row says so).
    * fake / weight_only: QuantLinear -> nn.Linear (``ActQuantLinear`` if it was trained with
      activation fake-quant) holding the dequantized weights: inference computes exactly what
      training saw; no speed-up is claimed.
    * Embeddings, every method: 8-bit symmetric tables -> ``Int8Embedding``, other widths ->
      ``PackedEmbedding`` (kept packed; a lookup dequantizes only its rows), both computing
      exactly the rows training saw.
    Rows carry ``details.backend`` and ``details.packed_bytes`` (codes + scales as ``encode``
    would store them)."""
    quant_types = (QuantLinear, QuantEmbedding)
    if not any(isinstance(m, quant_types) for m in model.modules()):
        apply_quantize_(model, cfg)
    int8 = _int8_kernels(cfg)
    rows = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, quant_types):
            continue
        q = quantized_weight(module)
        packed = encoded_nbytes(encode(q)[0])
        extra = {
            "packed_bytes": packed,
            "sqnr_db": sqnr_db(module.weight, dequantize(q)),
            "method": cfg.method,
        }
        skipped, reason = False, ""
        if isinstance(module, QuantLinear):
            if int8 and module.weight.device.type == "cpu":
                new, backend = to_dynamic_int8_linear(module), "torch.ao dynamic int8"
            else:
                new, backend = dequantized_linear(module), "dequantized"
                if int8:
                    skipped = True
                    reason = "int8 dynamic kernels are CPU-only; kept as a dequantized Linear"
        elif q.bits == 8 and q.symmetric:
            new = Int8Embedding.from_qtensor(q, module.padding_idx).to(module.weight.device)
            backend = "int8 per-row embedding"
        elif (module.embedding_dim * q.bits) % 8 == 0:
            new = PackedEmbedding(q, module.padding_idx).to(module.weight.device)
            backend = f"{q.bits}-bit packed per-row embedding"
        else:
            new, backend = dequantized_embedding(module), "dequantized"
        extra["backend"] = backend
        rows.append(_row(name, module, module.spec, skipped=skipped, reason=reason, extra=extra))
        set_module(model, name, new)
    return rows


def _types(cfg: QuantizeConfig) -> tuple[type[nn.Module], ...]:
    return (nn.Linear, nn.Embedding) if cfg.embeddings else (nn.Linear,)


def _allocate(model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> dict[str, Any]:
    """Each quantizable Linear's bit width under ``cfg.allocate``'s budget, from its measured
    sensitivity on the first calibration batches (``compress.sensitivity``): the manifest's
    record (``sensitivity.allocation_record``; ``choice``: the width of each layer)."""
    from orchestrator.compress.sensitivity import (
        allocate_bits,
        allocation_record,
        bit_costs,
        calibration_for,
        checked,
        profile,
    )

    allocate = cfg.allocate
    layers = [
        (n, m)
        for n, m, reason in quantizable(model, cfg, ctx.filter_fn)
        if isinstance(m, nn.Linear) and not reason
    ]
    calib = calibration_for(ctx.calib, "compress.quantize.allocate", allocate.model_dump())
    batches = calib[: allocate.calib_batches]

    def variants(_name: str, layer: nn.Linear) -> Callable[[float], torch.Tensor]:
        return lambda b: fake_quantize(layer.weight.data, *linear_spec(cfg, int(b)).as_args())

    prof = profile(
        model,
        layers,
        "bits",
        sorted(allocate.bits),
        variants,
        batches,
        cache_dir=ctx.cache_dir,
        recipe=f"{cfg.method}:{cfg.granularity}:{cfg.group_size}:{cfg.symmetric}",
        workers=ctx.workers,
    )
    choice = allocate_bits(prof, allocate.avg_bits)
    choice, check = checked(
        model,
        layers,
        prof,
        choice,
        *bit_costs(prof, allocate.avg_bits),
        variants,
        calib,
        allocate.refine,
    )
    choice = ctx.agree({n: int(b) for n, b in choice.items()})
    return allocation_record(prof, choice, allocate.avg_bits, check)


def _scale_activations(
    model: nn.Module, cfg: QuantizeConfig, ctx: Context
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Activation-aware scaling of the Linears about to be quantized (``compress.scaling``),
    scored against the rounding each will get; the details per Linear for its report row, and
    the manifest's record (each scaled group's strength, the groups left out and why). The
    scales live in the weights themselves, so rebuilding needs nothing from it."""
    from orchestrator.compress.scaling import scale_activations_

    key = "compress.quantize.activation_scaling"
    if not ctx.calib:
        raise ConfigError(
            Problem(
                key,
                True,
                "measures the inputs on calibration batches, and none were given",
                "run it through orchestrator compress / train / search, which pass the job's "
                "calibration batches",
            )
        )
    selected = {
        n
        for n, m, reason in quantizable(model, cfg, ctx.filter_fn)
        if isinstance(m, nn.Linear) and not reason
    }
    args = linear_spec(cfg).as_args()
    details, skipped = scale_activations_(
        model,
        ctx.calib,
        lambda _name, w: fake_quantize(w, *args),
        act_quant=_int8_kernels(cfg) or _activations(cfg),
        selected=selected,
        alpha=cfg.scaling_alpha,
        agree=ctx.agree,
    )
    if not details and not skipped:  # no group found at all: nothing was done
        raise ConfigError(
            Problem(
                key,
                True,
                f"needs pre-norm decoder blocks (Llama-style: input_layernorm, self_attn, "
                f"post_attention_layernorm, mlp), and this {type(model).__name__} has none",
                "set activation_scaling: false for this model",
            )
        )
    alphas = {d["scaled_by"]: d["scaling_alpha"] for d in details.values()}
    return details, {"alphas": alphas, "skipped": dict(skipped)}


class _Quantize(Technique):
    """What the three quantization methods share: training form, rebuild, storage."""

    def types(self, cfg: QuantizeConfig) -> tuple[type[nn.Module], ...]:
        return _types(cfg)

    def apply_(self, model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> Applied:
        entry: dict[str, Any] = {}
        scaled: dict[str, dict[str, Any]] = {}
        if cfg.activation_scaling:
            scaled, entry["activation_scaling"] = _scale_activations(model, cfg, ctx)
        layer_bits = None
        allocate = getattr(cfg, "allocate", None)
        if allocate is not None:
            entry["allocation"] = allocation = _allocate(model, cfg, ctx)
            layer_bits = allocation["choice"]
        elif getattr(cfg, "layers", None):
            linears = [
                n for n, m, _ in quantizable(model, cfg, ctx.filter_fn) if isinstance(m, nn.Linear)
            ]
            entry["layers"] = layer_bits = per_layer(
                linears, cfg.layers, "compress.quantize.layers"
            )
        details = self.prepare_(model, cfg, ctx, layer_bits or {})
        rows = apply_quantize_(model, cfg, filter_fn=ctx.filter_fn, layer_bits=layer_bits)
        for row in rows:
            row.details.update(scaled.get(row.name, {}))
            row.details.update(details.get(row.name, {}))
        kinds = {r.name: type(model.get_submodule(r.name)).__name__ for r in rows if not r.skipped}
        tied = {r.name: r.details["tied_to"] for r in rows if "tied_to" in r.details}
        if tied:
            entry["tied"] = tied
        return Applied(rows, entry={"modules": kinds, **entry})

    def prepare_(
        self, model: nn.Module, cfg: QuantizeConfig, ctx: Context, layer_bits: dict[str, int]
    ) -> dict[str, dict[str, Any]]:
        """Change the plain weights before they are wrapped (GPTQ); returns report details
        per module. Nothing by default: the weights are rounded as they are."""
        return {}

    def rebuild_(self, model: nn.Module, cfg: QuantizeConfig, entry: dict[str, Any]) -> None:
        allocation = entry.get("allocation", {})
        # ``layer_bits``: how artifacts written before sparsity and rank allocation name it;
        # ``layers``: the widths ``compress.quantize.layers`` set.
        layer_bits = entry.get("layers") or allocation.get(
            "choice", allocation.get("layer_bits", {})
        )
        tied = entry.get("tied", {})
        for name, kind in entry["modules"].items():
            old = model.get_submodule(name)
            if kind == "QuantEmbedding":
                new = QuantEmbedding.from_embedding(old, embedding_spec(cfg))
            elif kind == "QuantLinear" and name in tied:
                new = QuantLinear.from_linear(old, embedding_spec(cfg), False)
            elif kind == "QuantLinear":
                spec = linear_spec(cfg, layer_bits.get(name))
                new = QuantLinear.from_linear(old, spec, _activations(cfg))
            else:
                raise ValueError(f"unknown quantized module kind {kind!r} for {name}")
            set_module(model, name, new)

    def to_inference_(self, model: nn.Module, cfg: QuantizeConfig) -> list[ModuleRow]:
        return to_inference_(model, cfg)

    def encodings(
        self, module: nn.Module, pname: str, tensor: torch.Tensor
    ) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Packed codes + scales; with zeros in the weight (pruned before), also a bitmap of
        the non-zeros plus the codes of the non-zeros only."""
        q = quantized_weight(module) if pname == "weight" else None
        if q is None:
            return []
        qt, meta = encode(q)
        out = [(dict(qt), {"format": "quant", "quant": meta})]
        mask = tensor != 0
        nnz = int(mask.sum())
        if tensor.ndim >= 2 and nnz < tensor.numel():
            sq = {k: v for k, v in qt.items() if k != "codes"}
            sq.update(
                bitmap=bitmap(mask),
                nzcodes=pack_codes(q.codes.flatten()[mask.flatten()].contiguous(), q.bits),
            )
            out.append(
                (sq, {"format": "sparse_quant", "quant": meta, "nnz": nnz, "shape": list(q.shape)})
            )
        return out

    def decode(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        if meta["format"] == "quant":
            return decode(tensors, meta["quant"])
        if meta["format"] != "sparse_quant":
            return super().decode(tensors, meta)
        q, shape = meta["quant"], meta["shape"]
        numel = int(torch.tensor(shape).prod())
        mask = unbitmap(tensors["bitmap"], numel)
        codes = torch.zeros(numel, dtype=torch.uint8)
        codes[mask] = unpack_codes(tensors["nzcodes"], q["bits"], int(meta["nnz"]))
        dense = {k: v for k, v in tensors.items() if k not in ("bitmap", "nzcodes")}
        dense["codes"] = pack_codes(codes, q["bits"])
        return decode(dense, q) * mask.view(shape).float()

    def stored_bits(self, module: nn.Module) -> int | None:
        return quantized_bits(module)


@register
class FakeQuant(_Quantize):
    config_type = FakeQuantConfig

    def note(self, cfg: FakeQuantConfig) -> str:
        return (
            f"{cfg.bits}-bit weights (trained with fake-quant) are stored packed (real bytes) "
            "but dequantized to fp32 at load: no speed-up from quantization"
        )


@register
class WeightOnlyQuant(_Quantize):
    config_type = WeightOnlyConfig

    def note(self, cfg: WeightOnlyConfig) -> str:
        return (
            f"{cfg.bits}-bit weights are stored packed (real bytes) but dequantized to fp32 at "
            "load: no speed-up from quantization"
        )


@register
class Gptq(_Quantize):
    config_type = GptqConfig
    needs_calibration = True

    def prepare_(
        self, model: nn.Module, cfg: GptqConfig, ctx: Context, layer_bits: dict[str, int]
    ) -> dict[str, dict[str, Any]]:
        """GPTQ over the quantizable Linears, block by block: each weight becomes its rounded
        values (on the grid the wrapper derives from them again, so rounding them once more
        changes nothing). The details record each layer's relative output error on the
        calibration inputs, GPTQ's and plain round-to-nearest's."""
        from orchestrator.compress.hessian import gptq, output_error, sequential_

        layers = [
            (n, m)
            for n, m, reason in quantizable(model, cfg, ctx.filter_fn)
            if isinstance(m, nn.Linear) and not reason
        ]
        details: dict[str, dict[str, Any]] = {}

        def solve(name: str, layer: nn.Linear, hessian: torch.Tensor) -> None:
            args = linear_spec(cfg, layer_bits.get(name)).as_args()
            w = layer.weight.detach().float()
            new = gptq(w, hessian, *args, damp=cfg.damp, act_order=cfg.act_order)
            details[name] = {
                "output_error": output_error(w, fake_quantize(new, *args), hessian),
                "rtn_output_error": output_error(w, fake_quantize(w, *args), hessian),
            }
            layer.weight.data.copy_(new.to(layer.weight.dtype))

        sequential_(model, layers, ctx.calib, solve)
        return details

    def note(self, cfg: GptqConfig) -> str:
        return (
            f"{cfg.bits}-bit GPTQ weights are stored packed (real bytes) but dequantized to fp32 "
            "at load: no speed-up from quantization"
        )


@register
class DynamicInt8(_Quantize):
    config_type = DynamicInt8Config

    def note(self, cfg: DynamicInt8Config) -> str:
        return (
            "dynamic int8: Linear layers run on int8 CPU kernels (real speed-up); weights"
            + (" and embeddings" if cfg.embeddings else "")
            + " are stored as int8"
        )
