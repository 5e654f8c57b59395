"""Tensor quantization: round-to-nearest codes with scales (``QTensor``), the fake-quant
straight-through estimator, bit packing, and the serialized form stored in artifacts.

Conventions
-----------
* A weight is quantized per tensor, per ROW (dim 0: output channels of a Linear ``[out, in]``,
  rows of an Embedding table ``[vocab, dim]``) for ``channel``, or per contiguous group of
  ``group_size`` values along the LAST dimension for ``group``.
* Symmetric: signed integers in ``[-(2**(b-1)-1), 2**(b-1)-1]`` (int8 is [-127, 127]), stored as
  unsigned codes offset by ``2**(b-1)``; ``w ~ (code - 2**(b-1)) * scale``.
  Asymmetric: codes in ``[0, 2**b - 1]`` with an integer zero point (uint8);
  ``w ~ (code - zero_point) * scale``. The range always contains 0, so a pruned (zero) weight
  stays exactly zero after quantization.
* ``QTensor.scale`` (float32) and ``zero_point`` (uint8) have shape
  ``(1,) * ndim`` (tensor), ``(rows,) + (1,) * (ndim - 1)`` (channel) - both broadcast against
  the weight - or ``(*shape[:-1], shape[-1] // group_size, 1)`` (group), which broadcasts against
  the weight viewed as ``(*shape[:-1], n_groups, group_size)``.

Plain torch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SCALE_EPS = 1e-8  # smallest scale: an all-zero row/group quantizes to zeros, never NaN
FP16_REL_TOL = 1e-3  # scales are stored as float16 only if every dequantized value stays this close
GRANULARITIES = ("tensor", "channel", "group")


# --------------------------------------------------------------------------------------------
# Tensor quantization
# --------------------------------------------------------------------------------------------


@dataclass
class QTensor:
    """A quantized tensor: unsigned integer ``codes`` (uint8, original shape) plus scales."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    shape: tuple[int, ...]
    bits: int
    granularity: str
    group_size: int
    symmetric: bool


def check_spec(shape: tuple[int, ...], bits: int, granularity: str, group_size: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if len(shape) == 0:
        raise ValueError("cannot quantize a 0-d tensor")
    if granularity == "group" and (group_size < 1 or shape[-1] % group_size):
        raise ValueError(f"group_size {group_size} does not divide the last dimension {shape[-1]}")


def grouped(w: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """The view of ``w`` the scales broadcast against (see the module docstring)."""
    if granularity == "group":
        return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    return w


def _reduce_dims(ndim: int, granularity: str) -> tuple[int, ...]:
    if granularity == "tensor":
        return tuple(range(ndim))
    if granularity == "channel":
        return tuple(range(1, ndim))
    return (ndim - 1,)  # group: the last dim of the grouped view


def _amin_amax(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    if not dims:  # 1-D tensor per channel: each element is its own row
        return x, x
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


@torch.no_grad()
def quantize_tensor(
    w: torch.Tensor,
    bits: int,
    granularity: str = "channel",
    group_size: int = 64,
    symmetric: bool = True,
) -> QTensor:
    """Round-to-nearest quantization of ``w`` (any float dtype) to ``bits``-bit codes."""
    shape = tuple(w.shape)
    check_spec(shape, bits, granularity, group_size)
    x = grouped(w.detach().float(), granularity, group_size)
    lo, hi = _amin_amax(x, _reduce_dims(x.dim(), granularity))
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        offset = 2 ** (bits - 1)
        scale = (torch.maximum(hi.abs(), lo.abs()) / qmax).clamp_min(SCALE_EPS)
        q = torch.clamp(torch.round(x / scale), -qmax, qmax) + offset
        zero_point = None
    else:
        qmax = 2**bits - 1
        lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
        scale = ((hi - lo) / qmax).clamp_min(SCALE_EPS)
        zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
        q = torch.clamp(torch.round(x / scale) + zp, 0, qmax)
        zero_point = zp.to(torch.uint8)
    return QTensor(
        codes=q.to(torch.uint8).reshape(shape),
        scale=scale.contiguous(),
        zero_point=zero_point,
        shape=shape,
        bits=bits,
        granularity=granularity,
        group_size=group_size,
        symmetric=symmetric,
    )


def dequantize(q: QTensor) -> torch.Tensor:
    """The float32 tensor (original shape) the codes stand for."""
    codes = grouped(q.codes, q.granularity, q.group_size).float()
    if q.symmetric:
        centered = codes - 2 ** (q.bits - 1)
    else:
        centered = codes - q.zero_point.float()
    return (centered * q.scale.float()).reshape(q.shape)


class _FakeQuantSTE(torch.autograd.Function):
    """dequantize(quantize(w)) forward; identity backward (straight-through estimator)."""

    @staticmethod
    def forward(
        ctx: Any, w: torch.Tensor, bits: int, granularity: str, group_size: int, symmetric: bool
    ) -> torch.Tensor:
        q = quantize_tensor(w, bits, granularity, group_size, symmetric)
        return dequantize(q).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None, None, None, None


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    granularity: str = "channel",
    group_size: int = 64,
    symmetric: bool = True,
) -> torch.Tensor:
    """``dequantize(quantize_tensor(w, ...))`` in ``w``'s dtype; the gradient passes unchanged
    (straight-through estimator), also for values clipped by the range."""
    return _FakeQuantSTE.apply(w, bits, granularity, group_size, symmetric)


# --------------------------------------------------------------------------------------------
# Bit packing and serialization
# --------------------------------------------------------------------------------------------


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes into ``ceil(numel * bits / 8)`` bytes (uint8, 1-D).

    Layout: a little-endian bit stream; value ``i`` occupies stream bits
    ``[i * bits, (i + 1) * bits)``, least significant bit first (so for 4 bits, byte ``j`` is
    ``v[2j] | v[2j+1] << 4``)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    n = flat.numel()
    if n and int(flat.max()) >= 2**bits:
        raise ValueError(f"a code {int(flat.max())} does not fit in {bits} bits")
    nbytes = (n * bits + 7) // 8
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole values per byte
        per = 8 // bits
        padded = torch.zeros(nbytes * per, dtype=torch.int32, device=flat.device)
        padded[:n] = flat
        shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * bits
        return (padded.reshape(-1, per) << shifts).sum(1).to(torch.uint8)
    # 3, 5, 6, 7 bits: through the bit stream
    k = torch.arange(bits, dtype=torch.int32, device=flat.device)
    stream = ((flat.to(torch.int32).unsqueeze(1) >> k) & 1).reshape(-1)
    padded = torch.zeros(nbytes * 8, dtype=torch.int32, device=flat.device)
    padded[: stream.numel()] = stream
    weights = torch.arange(8, dtype=torch.int32, device=flat.device)
    return (padded.reshape(-1, 8) << weights).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Exact inverse of ``pack_codes``: ``numel`` codes as a 1-D uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    packed = packed.reshape(-1).to(torch.uint8)
    if packed.numel() < (numel * bits + 7) // 8:
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} {bits}-bit codes")
    if bits == 8:
        return packed[:numel].clone()
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits
        vals = (p.unsqueeze(1) >> shifts) & (2**bits - 1)
        return vals.reshape(-1)[:numel].to(torch.uint8)
    k8 = torch.arange(8, dtype=torch.int32, device=p.device)
    stream = ((p.unsqueeze(1) >> k8) & 1).reshape(-1)[: numel * bits]
    k = torch.arange(bits, dtype=torch.int32, device=p.device)
    return (stream.reshape(numel, bits) << k).sum(1).to(torch.uint8)


def _fp16_scale_ok(q: QTensor) -> bool:
    s16 = q.scale.to(torch.float16)
    if not torch.isfinite(s16).all():
        return False
    ref = dequantize(q)
    alt = dequantize(
        QTensor(
            q.codes,
            s16.float(),
            q.zero_point,
            q.shape,
            q.bits,
            q.granularity,
            q.group_size,
            q.symmetric,
        )
    )
    return bool(((alt - ref).abs() <= FP16_REL_TOL * ref.abs()).all())


def encode(q: QTensor) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors to serialize (``codes``: packed uint8; ``scale``: float16 when every dequantized
    value stays within 1e-3 relative of the float32 result, else float32; ``zero_point``:
    asymmetric only, packed at the codes' width) and a JSON-able meta dict. ``decode`` inverts
    it: exactly with float32 scales, to float16 rounding of the scales (<= 1e-3 relative per
    value) otherwise. Artifacts written before zero points were packed (``zero_point_dtype:
    uint8``) still decode."""
    scale = q.scale.float()
    if _fp16_scale_ok(q):
        scale = scale.to(torch.float16)
    tensors = {"codes": pack_codes(q.codes, q.bits), "scale": scale.contiguous()}
    if q.zero_point is not None:
        # Zero points are codes too (0 .. 2^bits - 1): packed at the same width.
        tensors["zero_point"] = pack_codes(q.zero_point.to(torch.uint8).flatten(), q.bits)
    meta = {
        "format": "qtensor/1",
        "shape": list(q.shape),
        "bits": q.bits,
        "granularity": q.granularity,
        "group_size": q.group_size,
        "symmetric": q.symmetric,
        "codes_dtype": "uint8",
        "scale_dtype": str(scale.dtype).removeprefix("torch."),
        "scale_shape": list(q.scale.shape),
        "zero_point_dtype": "packed" if q.zero_point is not None else None,
        "dtype": "float32",  # what decode returns
    }
    return tensors, meta


def decode(tensors: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    """The float32 weights of an ``encode`` output."""
    shape = tuple(int(s) for s in meta["shape"])
    numel = math.prod(shape)
    codes = unpack_codes(tensors["codes"], int(meta["bits"]), numel).reshape(shape)
    zp = tensors.get("zero_point")
    if zp is not None and meta.get("zero_point_dtype") == "packed":
        count = math.prod(int(s) for s in meta["scale_shape"])
        zp = unpack_codes(zp, int(meta["bits"]), count).reshape(meta["scale_shape"])
    q = QTensor(
        codes=codes,
        scale=tensors["scale"].float().reshape(meta["scale_shape"]),
        zero_point=None if zp is None else zp.to(torch.uint8),
        shape=shape,
        bits=int(meta["bits"]),
        granularity=str(meta["granularity"]),
        group_size=int(meta["group_size"]),
        symmetric=bool(meta["symmetric"]),
    )
    return dequantize(q)


def encoded_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
