"""Activation-aware scaling before quantization: AWQ-style (Lin et al. 2024) for low-bit
weights, SmoothQuant-style (Xiao et al. 2023) when the activations are quantized too.

``W x = (W diag(s)) (diag(s)^-1 x)``: multiplying a Linear's input channel j by ``s_j`` and
dividing whatever produced that channel by ``s_j`` computes the same function in float, but
changes what rounding does to it.

* Weight-only rounding (``weight_only``, ``gptq``, ``fake``): a channel whose inputs are large
  carries more of the output, so its weights deserve a finer grid. ``s = mean|x|^alpha`` (AWQ)
  enlarges those weights before the group's scale is fixed, and shrinks their inputs by as much.
* Quantized activations (``dynamic_int8``, ``fake`` with ``activations``): a few channels with
  outliers stretch the per-tensor input grid for all the others. ``s = max|x|^alpha /
  max|w|^(1-alpha)`` (SmoothQuant) moves part of that range from the inputs into the weights.

The strength ``alpha`` is searched per group on calibration inputs: each candidate in 0, 0.1,
..., 1 (plus no scaling at all) is scored by the group's output error under the method's own
rounding, ``sum ||Q(W diag(s)) Q_x(x / s) - W x||^2`` over its Linears, and the lowest wins,
so a group is never scaled in a way that makes its sampled error worse. GPTQ then rounds the
scaled weights with its own error compensation.

The division is folded into the producer of the inputs, so the model keeps its modules and the
artifact its format: nothing is added at inference. That needs a producer that is linear per
channel and feeds nothing else, which holds in pre-norm decoder blocks (Llama, Mistral, Qwen2:
the names below):

* ``input_layernorm`` -> ``self_attn.q_proj / k_proj / v_proj`` (the RMSNorm's weight);
* ``post_attention_layernorm`` -> ``mlp.gate_proj / up_proj``;
* ``mlp.up_proj`` -> ``mlp.down_proj`` (the MLP multiplies ``up_proj``'s output channel by
  channel, so scaling its rows scales ``down_proj``'s input);
* ``self_attn.v_proj`` -> ``self_attn.o_proj`` when every query head has its own value head
  (with grouped-query attention one value channel feeds several ``o_proj`` inputs, which would
  need one shared scale; that group is skipped).

Post-norm encoders (BERT) have none: their LayerNorm output is also the residual stream, which
the division would change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.compress.common import first_param, forward_eval

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
SAMPLE_TOKENS = 512  # calibration tokens per group the candidates are scored on
Rounding = Callable[[str, torch.Tensor], torch.Tensor]  # (Linear name, weight) -> rounded


class _Stop(Exception):
    """Raised once every group's input of a batch is recorded."""


@dataclass
class Group:
    """Linears that read the same input, and the module that produces it."""

    producer: str  # an RMSNorm / LayerNorm (scale its weight and bias) or a Linear (its rows)
    consumers: list[str]


def decoder_groups(model: nn.Module) -> tuple[list[Group], list[tuple[str, str]]]:
    """The foldable groups of every pre-norm decoder block (see the module docstring), and the
    groups left out with the reason."""
    groups: list[Group] = []
    skipped: list[tuple[str, str]] = []
    for name, block in model.named_modules():
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        norms = (
            getattr(block, "input_layernorm", None),
            getattr(block, "post_attention_layernorm", None),
        )
        if attn is None or mlp is None or None in norms:
            continue
        p = f"{name}." if name else ""
        wanted = [
            Group(f"{p}input_layernorm", [f"{p}self_attn.{x}_proj" for x in "qkv"]),
            Group(f"{p}post_attention_layernorm", [f"{p}mlp.gate_proj", f"{p}mlp.up_proj"]),
            Group(f"{p}mlp.up_proj", [f"{p}mlp.down_proj"]),
        ]
        v, o = f"{p}self_attn.v_proj", f"{p}self_attn.o_proj"
        v_layer, o_layer = _linear(model, v), _linear(model, o)
        if (
            v_layer is not None
            and o_layer is not None
            and v_layer.out_features != o_layer.in_features
        ):
            skipped.append((o, "grouped-query attention: a value channel feeds several inputs"))
        else:
            wanted.append(Group(v, [o]))
        for g in wanted:
            reason = _unfoldable(model, g)
            if reason:
                skipped.append((g.consumers[0], reason))
            else:
                groups.append(g)
    return groups, skipped


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    return m if isinstance(m, nn.Linear) else None


def _unfoldable(model: nn.Module, g: Group) -> str:
    """Why ``g`` cannot be scaled ("" when it can)."""
    try:
        producer = model.get_submodule(g.producer)
    except AttributeError:
        return f"{g.producer} is missing"
    width = _out_channels(producer)
    if width is None:
        return (
            f"{g.producer} is a {type(producer).__name__}, whose output does not scale with "
            "its weight as a Linear's or a plain norm's does"
        )
    for c in g.consumers:
        layer = _linear(model, c)
        if layer is None:
            return f"{c} is not a plain Linear (factorized or removed)"
        if layer.in_features != width:
            return f"{c} reads {layer.in_features} channels, {g.producer} makes {width}"
    return ""


def _out_channels(module: nn.Module) -> int | None:
    """How many channels ``module`` makes, if dividing its weight (and bias) divides its output
    alike: a Linear, or a norm whose output is ``weight * normalized (+ bias)``, which a probe
    checks (a ``(1 + weight)`` norm, as in Gemma, fails it)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if "norm" not in type(module).__name__.lower() or weight is None or weight.ndim != 1:
        return None
    params = [t for t in (weight, getattr(module, "bias", None)) if t is not None]
    probe = torch.randn(2, weight.numel(), generator=torch.Generator().manual_seed(0))
    probe = probe.to(weight)
    with torch.no_grad():
        before = module(probe)
        for t in params:
            t.mul_(2)
        after = module(probe)
        for t in params:
            t.div_(2)
    return weight.numel() if torch.allclose(after, 2 * before, rtol=1e-4, atol=1e-6) else None


@torch.no_grad()
def _collect(
    model: nn.Module, groups: list[Group], calib: list[dict[str, torch.Tensor]], tokens: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Per group (keyed by its first consumer): mean |x| and max |x| per channel over every
    calibration token (padding excluded), and a seeded sample of ``tokens`` input rows."""
    state: dict[str, Any] = {}
    per_batch = max(1, -(-tokens // max(1, len(calib))))
    gen = torch.Generator().manual_seed(0)
    # Every buffer is made before the first forward and filled in place: small tensors kept
    # from each forward, between that forward's freed activations, would keep the allocator
    # from reusing them (on SmolLM2 the peak while compressing was up to 1 GB higher).
    stats: dict[str, dict[str, Any]] = {}
    for g in groups:
        width = model.get_submodule(g.consumers[0]).in_features
        stats[g.consumers[0]] = {
            "sum": torch.zeros(width, dtype=torch.float64),
            "max": torch.zeros(width),
            "sample": torch.empty(tokens, width),
            "n": 0,
            "filled": 0,
        }

    def hook_for(key: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = state.get("mask")
            if x.dim() == 3 and mask is not None and x.shape[:2] == mask.shape:
                x = x[mask]
            x = x.reshape(-1, x.shape[-1]).float()
            s = stats[key]
            a = x.abs()
            s["sum"].add_(a.sum(0).double().cpu())
            s["n"] += a.shape[0]
            torch.maximum(s["max"], a.amax(0).cpu(), out=s["max"])
            take = min(per_batch, x.shape[0], tokens - s["filled"])
            if take > 0:
                pick = torch.randperm(x.shape[0], generator=gen)[:take].to(x.device)
                s["sample"][s["filled"] : s["filled"] + take].copy_(x[pick])
                s["filled"] += take
            state["seen"].add(key)
            if len(state["seen"]) == len(groups):
                raise _Stop  # every group has its input: the rest (the logits) is not needed

        return hook

    hooks = [
        model.get_submodule(g.consumers[0]).register_forward_pre_hook(hook_for(g.consumers[0]))
        for g in groups
    ]
    try:
        for batch in calib:
            mask = batch.get("attention_mask")
            state["mask"] = None if mask is None else mask.bool().to(first_param(model).device)
            state["seen"] = set()
            try:
                forward_eval(model, batch)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {
        k: {
            "mean": (s["sum"] / max(1, s["n"])).float(),
            "max": s["max"],
            "sample": s["sample"][: s["filled"]],
        }
        for k, s in stats.items()
    }


def dynamic_act_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """What int8 dynamic kernels do to an input: one asymmetric scale over the whole tensor,
    the range always holding 0, 7-bit codes (x86's fbgemm reduces the range to avoid
    overflow in its 16-bit accumulation)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = max(hi - lo, 1e-8) / 127
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 127) - zero) * scale


def _scales(
    stat: dict[str, torch.Tensor], weights: list[torch.Tensor], alpha: float, smooth: bool
) -> torch.Tensor:
    if smooth:  # SmoothQuant: balance the input's and the weights' ranges
        wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
        s = stat["max"].clamp(min=1e-5).pow(alpha) / wmax.pow(1 - alpha)
    else:  # AWQ: from the mean input magnitude, centred so the weights keep their size
        s = stat["mean"].clamp(min=1e-5).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
    return s.clamp(min=1e-4, max=1e4)


def _weights(model: nn.Module, g: Group) -> list[torch.Tensor]:
    """The group's consumer weights in float32 (the Parameters themselves for a float32 model
    on the CPU: no copy)."""
    return [model.get_submodule(c).weight.detach().float().cpu() for c in g.consumers]


@torch.no_grad()
def _search(
    weights: list[torch.Tensor],
    stat: dict[str, torch.Tensor],
    rounding: Rounding,
    act_quant: bool,
    alphas: tuple[float, ...],
    names: list[str],
) -> tuple[float | None, float, float]:
    """The best strength for one group: alpha (None: no scaling), its sampled output error
    and the error without scaling, both relative to the outputs' energy."""
    x = stat["sample"]
    refs = [x @ w.T for w in weights]
    energy = max(sum(float((ref**2).sum()) for ref in refs), 1e-30)

    def error(s: torch.Tensor | None) -> float:
        xs = x if s is None else x / s
        if act_quant:
            xs = dynamic_act_fake_quant(xs)
        total = 0.0
        for name, w, ref in zip(names, weights, refs, strict=True):
            q = rounding(name, w if s is None else w * s)
            total += float(((xs @ q.T - ref) ** 2).sum())
        return total / energy

    base = error(None)
    best: tuple[float | None, float] = (None, base)
    for alpha in alphas:
        e = error(_scales(stat, weights, alpha, smooth=act_quant))
        if e < best[1]:
            best = (alpha, e)
    return best[0], best[1], base


@torch.no_grad()
def _fold(model: nn.Module, g: Group, s: torch.Tensor) -> None:
    producer = model.get_submodule(g.producer)
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s.to(producer.weight).unsqueeze(1))
    else:
        producer.weight.div_(s.to(producer.weight))
    bias = getattr(producer, "bias", None)
    if bias is not None:
        bias.div_(s.to(bias))
    for c in g.consumers:
        layer = model.get_submodule(c)
        layer.weight.mul_(s.to(layer.weight).unsqueeze(0))


def scale_activations_(
    model: nn.Module,
    calib: list[dict[str, torch.Tensor]],
    rounding: Rounding,
    *,
    act_quant: bool,
    selected: set[str],
    alpha: float | None = None,
    agree: Callable[[Any], Any] = lambda v: v,
    tokens: int = SAMPLE_TOKENS,
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
    """Scale every foldable group whose Linears are all in ``selected`` (the ones about to be
    quantized), in place; ``rounding(name, weight)`` is how that Linear's weight will be
    rounded, ``act_quant`` whether its input will be too. ``alpha`` fixes the strength instead
    of searching it. Returns per consumer Linear the details for its report row (alpha, the
    sampled output error with and without scaling, relative to the output's energy), and the
    groups left out with the reason."""
    groups, skipped = decoder_groups(model)
    kept = []
    for g in groups:
        missing = [c for c in g.consumers if c not in selected]
        if missing:
            skipped.append((g.consumers[0], f"{missing[0]} is not quantized"))
        else:
            kept.append(g)
    if not kept:
        return {}, skipped
    stats = _collect(model, kept, calib, tokens)
    alphas = ALPHAS if alpha is None else (alpha,)
    found: dict[str, tuple[float | None, float, float]] = {}
    for g in kept:
        stat = stats[g.consumers[0]]
        found[g.producer] = _search(
            _weights(model, g), stat, rounding, act_quant, alphas, g.consumers
        )
    # Every worker folds the same scales (a deterministic function of the statistics and
    # alpha): the alphas are the first worker's.
    choice = agree({k: v[0] for k, v in found.items()})
    details: dict[str, dict[str, Any]] = {}
    for g in kept:
        a = choice[g.producer]
        if a is not None:
            _fold(model, g, _scales(stats[g.consumers[0]], _weights(model, g), a, smooth=act_quant))
        _, err, base = found[g.producer]
        for c in g.consumers:
            details[c] = {
                "scaling_alpha": a,
                "scaled_by": g.producer,
                "scaling_error": err,
                "unscaled_error": base,
            }
    return details, skipped
