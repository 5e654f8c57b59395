"""Quantized modules: the training form (``QuantLinear`` / ``QuantEmbedding``: fake-quant with a
straight-through estimator, sharing the original Parameters) and the inference forms (real int8
CPU kernels, int8 embedding tables, or dequantized weights).

``QuantLinear`` / ``QuantEmbedding`` subclass nn.Linear / nn.Embedding and REUSE the original
``weight`` / ``bias`` Parameter objects, so optimizers, DDP, DeepSpeed, checkpoints and a pruner
holding the old module (it mutates the shared Parameter) are unaffected. Only activation
fake-quant adds a buffer (``act_range``, the EMA input min/max).

The int8 inference modules: ``torch.ao.nn.quantized.dynamic.Linear`` (``m.weight()`` is a qint8
tensor, ``m.bias()`` float32) and ``Int8Embedding`` (buffers ``weight_int8`` [vocab, dim] and
``scale`` [vocab, 1]).

Plain torch: no Ray, no DeepSpeed, no torchao (benchmarks/BENCHMARKS.md, "int8 kernels", has
the measurement behind choosing the torch.ao kernel).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.compress.qtensor import (
    SCALE_EPS,
    QTensor,
    check_spec,
    dequantize,
    fake_quantize,
    pack_codes,
    quantize_tensor,
    unpack_codes,
)

ACT_BITS = 8  # activation fake-quant: 8-bit, per tensor, asymmetric
ACT_MOMENTUM = 0.01  # EMA weight of the current batch's input min/max (torch observers' default)


class _ActFakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        qmax = 2**ACT_BITS - 1
        lo, hi = lo.float().clamp_max(0.0), hi.float().clamp_min(0.0)
        scale = ((hi - lo) / qmax).clamp_min(SCALE_EPS)
        zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
        q = torch.clamp(torch.round(x.float() / scale) + zp, 0, qmax)
        return ((q - zp) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None, None


class _ActObserver(nn.Module):
    """Mixin: 8-bit per-tensor asymmetric input fake-quant with an EMA of the input min/max in
    the persistent buffer ``act_range`` = [min, max] (+-inf until the first batch is seen).
    Training updates the EMA without a host sync; eval uses the running range."""

    act_range: torch.Tensor

    def _init_act_observer(self, device: torch.device | None) -> None:
        self.register_buffer("act_range", torch.tensor([math.inf, -math.inf], device=device))

    def _fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            cur = torch.stack([x.detach().min(), x.detach().max()]).float()
            seen = torch.isfinite(self.act_range)
            if self.training:
                ema = (1 - ACT_MOMENTUM) * self.act_range + ACT_MOMENTUM * cur
                self.act_range.copy_(torch.where(seen, ema, cur))
                rng = self.act_range
            else:
                rng = torch.where(seen, self.act_range, cur)
        return _ActFakeQuantSTE.apply(x, rng[0], rng[1])


@dataclass(frozen=True)
class WeightSpec:
    """How one module's weight is quantized: bit width, scale granularity, symmetry."""

    bits: int
    granularity: str
    group_size: int
    symmetric: bool

    def as_args(self) -> tuple[int, str, int, bool]:
        return self.bits, self.granularity, self.group_size, self.symmetric


class QuantLinear(nn.Linear, _ActObserver):
    """nn.Linear whose forward sees ``fake_quantize(weight)`` (and, with ``activations``, an
    8-bit fake-quantized input). Parameters stay ``weight`` / ``bias``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 8,
        granularity: str = "channel",
        group_size: int = 64,
        symmetric: bool = True,
        activations: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        check_spec((out_features, in_features), bits, granularity, group_size)
        self.spec = WeightSpec(bits, granularity, group_size, symmetric)
        self.activations = activations
        if activations:
            self._init_act_observer(device)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, spec: WeightSpec, activations: bool = False
    ) -> QuantLinear:
        """Wraps ``linear``, sharing its Parameter objects (no copy)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            bits=spec.bits,
            granularity=spec.granularity,
            group_size=spec.group_size,
            symmetric=spec.symmetric,
            activations=activations,
            device="meta",
        )
        new.weight = linear.weight
        new.bias = linear.bias
        if activations:
            new.act_range = torch.tensor([math.inf, -math.inf], device=linear.weight.device)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations:
            x = self._fake_quant_input(x)
        return F.linear(x, fake_quantize(self.weight, *self.spec.as_args()), self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{super().extra_repr()}, bits={s.bits}, granularity={s.granularity}"
            + (f", group_size={s.group_size}" if s.granularity == "group" else "")
            + f", symmetric={s.symmetric}, activations={self.activations}"
        )


class ActQuantLinear(nn.Linear, _ActObserver):
    """Inference form of a ``QuantLinear`` trained with ``activations``: weights already
    dequantized, the input still fake-quantized with the trained ``act_range``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_act_observer(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._fake_quant_input(x), self.weight, self.bias)


class QuantEmbedding(nn.Embedding):
    """nn.Embedding whose lookups read ``fake_quantize(weight)`` per row."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *args: Any,
        bits: int = 8,
        symmetric: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        check_spec((num_embeddings, embedding_dim), bits, "channel", 1)
        self.spec = WeightSpec(bits, "channel", 1, symmetric)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, spec: WeightSpec) -> QuantEmbedding:
        """Wraps ``emb`` (per-row scales), sharing its weight Parameter."""
        new = cls(
            emb.num_embeddings,
            emb.embedding_dim,
            padding_idx=emb.padding_idx,
            max_norm=emb.max_norm,
            norm_type=emb.norm_type,
            scale_grad_by_freq=emb.scale_grad_by_freq,
            sparse=emb.sparse,
            bits=spec.bits,
            symmetric=spec.symmetric,
            device="meta",
        )
        new.weight = emb.weight
        new.train(emb.training)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w = fake_quantize(self.weight, *self.spec.as_args())
        return F.embedding(
            input,
            w,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.spec.bits}, symmetric={self.spec.symmetric}"


class Int8Embedding(nn.Module):
    """Inference embedding table stored as int8 (``weight_int8``, [-127, 127]) with a float32
    per-row ``scale`` ([vocab, 1]); only the looked-up rows are dequantized."""

    def __init__(
        self, weight_int8: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.padding_idx = padding_idx
        self.register_buffer("weight_int8", weight_int8.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().reshape(-1, 1).contiguous())

    @classmethod
    def from_qtensor(cls, q: QTensor, padding_idx: int | None = None) -> Int8Embedding:
        if not (q.bits == 8 and q.symmetric and q.granularity == "channel" and len(q.shape) == 2):
            raise ValueError("Int8Embedding needs 8-bit symmetric per-row codes of a 2-D table")
        return cls((q.codes.to(torch.int16) - 128).to(torch.int8), q.scale, padding_idx)

    def qtensor(self) -> QTensor:
        return QTensor(
            codes=(self.weight_int8.to(torch.int16) + 128).to(torch.uint8),
            scale=self.scale,
            zero_point=None,
            shape=tuple(self.weight_int8.shape),
            bits=8,
            granularity="channel",
            group_size=1,
            symmetric=True,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, self.weight_int8).float() * F.embedding(input, self.scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


class PackedEmbedding(nn.Module):
    """Inference embedding table kept packed: ``bits``-bit codes (``packed``: uint8, one
    byte-aligned row per token), a float scale per row and, asymmetric, a zero point per row.
    A lookup unpacks and dequantizes only the rows it reads, so the whole table never exists in
    float, in memory or on disk."""

    def __init__(self, q: QTensor, padding_idx: int | None = None) -> None:
        super().__init__()
        if q.granularity != "channel" or len(q.shape) != 2:
            raise ValueError("PackedEmbedding needs per-row codes of a 2-D table")
        self.num_embeddings, self.embedding_dim = q.shape
        if (self.embedding_dim * q.bits) % 8:
            raise ValueError(f"{self.embedding_dim} x {q.bits} bits is not whole bytes per row")
        self.bits, self.symmetric, self.padding_idx = q.bits, q.symmetric, padding_idx
        row_bytes = self.embedding_dim * q.bits // 8
        packed = pack_codes(q.codes, q.bits).reshape(self.num_embeddings, row_bytes)
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scale", q.scale.float().reshape(-1, 1).contiguous())
        zero = q.zero_point if q.zero_point is not None else torch.zeros(0, dtype=torch.uint8)
        self.register_buffer("zero_point", zero.reshape(-1, 1) if zero.numel() else zero)

    def qtensor(self) -> QTensor:
        n, d = self.num_embeddings, self.embedding_dim
        codes = unpack_codes(self.packed.reshape(-1), self.bits, n * d).reshape(n, d)
        return QTensor(
            codes=codes,
            scale=self.scale,
            zero_point=self.zero_point if self.zero_point.numel() else None,
            shape=(n, d),
            bits=self.bits,
            granularity="channel",
            group_size=1,
            symmetric=self.symmetric,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        flat = input.reshape(-1)
        rows = self.packed[flat]  # [tokens, row_bytes]: only the rows looked up
        codes = unpack_codes(rows.reshape(-1), self.bits, flat.numel() * self.embedding_dim)
        codes = codes.reshape(flat.numel(), self.embedding_dim).float()
        if self.symmetric:
            centered = codes - 2 ** (self.bits - 1)
        else:
            centered = codes - self.zero_point[flat].float()
        return (centered * self.scale[flat]).reshape(*input.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.bits}-bit packed per-row"


def quantized_bits(module: nn.Module) -> int | None:
    """The stored bit width of a quantized module's weight, without quantizing anything."""
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return module.spec.bits
    if isinstance(module, PackedEmbedding):
        return module.bits
    if isinstance(module, (Int8Embedding, dynamic_linear_type())):
        return 8
    return None


def quantized_weight(module: nn.Module) -> QTensor | None:
    """The QTensor of a quantized module's current weight (QuantLinear, QuantEmbedding,
    Int8Embedding, int8 dynamic Linear); None for anything else."""
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return quantize_tensor(module.weight.detach(), *module.spec.as_args())
    if isinstance(module, (Int8Embedding, PackedEmbedding)):
        return module.qtensor()
    if isinstance(module, dynamic_linear_type()):
        return qtensor_from_torch_qint8(module.weight())
    return None


def dynamic_linear_type() -> type[nn.Module]:
    import torch.ao.nn.quantized.dynamic as nnqd

    return nnqd.Linear


def qtensor_from_torch_qint8(qw: torch.Tensor) -> QTensor:
    ints = qw.int_repr()
    shape = tuple(ints.shape)
    if qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale = qw.q_per_channel_scales().float().reshape(-1, *([1] * (len(shape) - 1)))
        gran = "channel"
    else:
        scale = torch.full((1,) * len(shape), qw.q_scale(), dtype=torch.float32)
        gran = "tensor"
    return QTensor(
        codes=(ints.to(torch.int16) + 128).to(torch.uint8),
        scale=scale,
        zero_point=None,
        shape=shape,
        bits=8,
        granularity=gran,
        group_size=1,
        symmetric=True,
    )


def to_dynamic_int8_linear(module: QuantLinear) -> nn.Module:
    """A real int8 CPU kernel computing with exactly the int8 weights training saw.

    Backend: ``torch.ao.nn.quantized.dynamic.Linear``, the module
    ``torch.ao.quantization.quantize_dynamic`` produces (fbgemm/x86 int8 GEMM, activations
    quantized per batch on the fly), built directly from our codes so the weights are bit-exact.
    Chosen over torchao's int8 path, which was slower than fp32 on the CPUs measured
    (benchmarks/BENCHMARKS.md, "int8 kernels"). torch.ao quantization is deprecated in torch
    2.13 but present; its warnings are silenced here only."""
    nnqd_linear = dynamic_linear_type()
    q = quantize_tensor(module.weight.detach().cpu(), 8, module.spec.granularity, 1, True)
    ints = (q.codes.to(torch.int16) - 128).to(torch.int8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if q.granularity == "channel":
            qw = torch._make_per_channel_quantized_tensor(
                ints, q.scale.reshape(-1).double(), torch.zeros(ints.shape[0], dtype=torch.long), 0
            )
        else:
            qw = torch._make_per_tensor_quantized_tensor(ints, float(q.scale.reshape(-1)[0]), 0)
        new = nnqd_linear(
            module.in_features,
            module.out_features,
            bias_=module.bias is not None,
            dtype=torch.qint8,
        )
        bias = None if module.bias is None else module.bias.detach().float().cpu()
        new.set_weight_bias(qw, bias)
    return new


def dequantized_linear(module: QuantLinear) -> nn.Linear:
    w = dequantize(quantized_weight(module)).to(module.weight.dtype)
    cls = ActQuantLinear if module.activations else nn.Linear
    new = cls(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        device=module.weight.device,
        dtype=module.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(w)
        if module.bias is not None:
            new.bias.copy_(module.bias)
        if module.activations:
            new.act_range.copy_(module.act_range)
    new.train(module.training)
    return new


def dequantized_embedding(module: QuantEmbedding) -> nn.Embedding:
    w = dequantize(quantized_weight(module)).to(module.weight.dtype)
    new = nn.Embedding(
        module.num_embeddings,
        module.embedding_dim,
        padding_idx=module.padding_idx,
        max_norm=module.max_norm,
        norm_type=module.norm_type,
        scale_grad_by_freq=module.scale_grad_by_freq,
        sparse=module.sparse,
        _weight=w.clone(),
    )
    new.train(module.training)
    return new
