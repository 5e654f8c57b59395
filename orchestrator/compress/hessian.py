"""One-shot compression with second-order error compensation: GPTQ (Frantar et al. 2022) for
quantized weights and SparseGPT (Frantar & Alistarh 2023) for pruned ones.

Both minimise a layer's output error ||W X - W' X||^2 on calibration inputs X, whose Hessian is
H = 2 X X^T: they fix (round, or zero) the weight's columns one at a time and spread each
column's error over the columns not fixed yet, weighted by the inverse Hessian (Optimal Brain
Surgeon). Plain round-to-nearest or magnitude pruning fix every weight alone and leave the
error where it falls.

``sequential_`` runs a solver over a model block by block, as the papers do: the inputs of the
first transformer block are captured once (a forward that stops there); then each block's
targeted Linears get their Hessians from the block's inputs, are solved, and the block is run
again so the next block sees the outputs of the already-compressed ones. Memory is one block's
activations for the calibration batches plus one Hessian at a time, whatever the depth.
Targeted Linears outside the blocks (rare: heads are excluded by default) are solved last from
a whole-model pass. Plain torch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from orchestrator.compress.common import collect_input_stats, first_param, forward_eval
from orchestrator.compress.qtensor import QTensor, dequantize, quantize_tensor

Solver = Callable[[str, nn.Linear, torch.Tensor], None]  # (name, layer, H): updates in place


class _Stop(Exception):
    """Raised by the hook that captured the first block's inputs: the rest is not needed."""


def _damped_inverse_cholesky(h: torch.Tensor, w: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, after zeroing the columns
    of ``w`` whose input never varies (a dead input: H's diagonal is 0 there). ``w`` is changed
    in place."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp * torch.mean(torch.diag(h))
    for _ in range(4):  # more damping if H is still not positive definite
        try:
            lower = torch.linalg.cholesky(h)
            break
        except torch.linalg.LinAlgError:
            h[diag, diag] += damp * torch.mean(torch.diag(h))
    else:
        raise RuntimeError("the calibration Hessian is not positive definite even after damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    granularity: str,
    group_size: int,
    symmetric: bool,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    max_passes: int = 4,
) -> torch.Tensor:
    """The GPTQ-quantized weight, as the artifact stores it: dequantized values on the grid
    ``qtensor.quantize_tensor`` derives from them (scale and zero point from each group's range).
    Weights that are exactly zero (pruned by an earlier step) stay zero.

    ``act_order``: columns are fixed in decreasing order of their Hessian diagonal (the inputs
    with the most energy first, while the most columns are left to absorb their error), each
    rounded to its group's grid taken from the weights before compensation ("static groups":
    groups stay contiguous in the stored layout), its range clipped where that rounds the group
    with less error (``clipped_grid``). Without it, columns go in their natural order
    and each group's grid is taken from the weights as the columns reach it, as in the paper.

    Compensation can shrink a group's largest weight, and the grid derived again from the result
    would be finer than the one rounded to: later passes round to that derived grid, until the
    two agree (or ``max_passes``), and the result is rounded once more to the derived grid, so
    what the layer holds is exactly what ships."""
    w = weight.detach().float().clone()
    cols = w.shape[1]
    keep = w != 0 if bool((w == 0).any()) else None
    h = hessian.float()
    args = (bits, granularity, group_size, symmetric)
    order = torch.arange(cols)
    grid = None
    if act_order:
        order = torch.argsort(torch.diag(h), descending=True)
        grid = clipped_grid(w, torch.diag(h), *args)  # static groups, before compensation
        w, h = w[:, order], h[order][:, order]
        keep = None if keep is None else keep[:, order]
    back = torch.argsort(order)
    hinv = _damped_inverse_cholesky(h, w, damp)
    if granularity == "group":
        block_size = max(group_size, block_size - block_size % group_size)
    group_of = order // group_size if granularity == "group" else None
    q = _gptq_pass(w, hinv, keep, args, grid, block_size, group_of)[:, back]
    for _ in range(max_passes - 1):
        stored = quantize_tensor(q, *args)
        if torch.allclose(dequantize(stored), q, rtol=1e-5, atol=1e-8):
            break
        q = _gptq_pass(w, hinv, keep, args, stored, block_size, group_of)[:, back]
    return dequantize(quantize_tensor(q, *args)).to(weight.dtype)


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def clipped_grid(
    weight: torch.Tensor,
    importance: torch.Tensor,
    bits: int,
    granularity: str,
    group_size: int,
    symmetric: bool,
) -> QTensor:
    """The rounding grid of ``weight`` with each group's range shrunk by the ratio of
    ``CLIP_RATIOS`` that rounds the group with the least error, each input weighted by its
    ``importance`` (the Hessian diagonal: its inputs' energy); only group granularity is
    clipped. Clipping the few outliers of a group buys a finer step for all the rest."""
    args = (bits, granularity, group_size, symmetric)
    if granularity != "group":
        return quantize_tensor(weight, *args)
    rows, cols = weight.shape
    x = weight.float().reshape(rows, cols // group_size, group_size)
    d = importance.float().reshape(1, cols // group_size, group_size)
    best = best_err = None
    for ratio in CLIP_RATIOS:
        q = quantize_tensor(weight.float() * ratio, bits, "group", group_size, symmetric)
        # Only the grid is kept: the unclipped weights are rounded to it.
        grid = QTensor(None, q.scale, q.zero_point, x.shape, bits, "group", group_size, symmetric)
        err = (d * (x - _round_to(x, grid)).pow(2)).sum(-1)
        if best is None:
            best, best_err = grid, err
            continue
        better = (err < best_err).unsqueeze(-1)
        best.scale = torch.where(better, grid.scale, best.scale)
        if not symmetric:
            best.zero_point = torch.where(better, grid.zero_point, best.zero_point)
        best_err = torch.minimum(err, best_err)
    best.shape = tuple(weight.shape)
    return best


def _round_to(x: torch.Tensor, grid: QTensor) -> torch.Tensor:
    """``x`` (rows x groups x group size) rounded to ``grid``'s scales and zero points."""
    scale = grid.scale.float()
    if grid.symmetric:
        qmax = 2 ** (grid.bits - 1) - 1
        return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
    zero = grid.zero_point.float()
    return (torch.clamp(torch.round(x / scale) + zero, 0, 2**grid.bits - 1) - zero) * scale


def _gptq_pass(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    keep: torch.Tensor | None,
    args: tuple[int, str, int, bool],
    grid: QTensor | None,
    block_size: int,
    group_of: torch.Tensor | None,
) -> torch.Tensor:
    """One GPTQ sweep over the columns (in the order they are given); ``grid``: round to its
    scales and zero points (column ``j`` in group ``group_of[j]``) instead of deriving them
    from the weights as the columns reach each group."""
    bits, granularity, group_size, symmetric = args
    w = weight.clone()
    rows, cols = w.shape
    qmax_sym = 2 ** (bits - 1) - 1
    qmax_asym = 2**bits - 1
    current: dict[str, torch.Tensor | None] = {"scale": None, "zero": None}

    def derive(x: torch.Tensor) -> None:
        q = quantize_tensor(x, bits, "channel", 1, symmetric)
        current["scale"] = q.scale.view(-1)
        current["zero"] = None if q.zero_point is None else q.zero_point.float().view(-1)

    def from_grid(index: int) -> None:
        scale, zero = grid.scale, grid.zero_point
        if granularity == "group":
            pick = (slice(None), index, 0)
        elif granularity == "channel":
            pick = (slice(None), 0)
        else:
            pick = (0, 0)
        current["scale"] = scale[pick].float().expand(rows)
        current["zero"] = None if zero is None else zero[pick].float().expand(rows)

    if grid is not None and granularity != "group":
        from_grid(0)
    elif granularity == "tensor":
        q = quantize_tensor(w, bits, "tensor", 1, symmetric)
        current["scale"] = q.scale.view(()).expand(rows)
        current["zero"] = (
            None if q.zero_point is None else q.zero_point.float().view(()).expand(rows)
        )
    elif granularity == "channel":
        derive(w)

    def rnd(x: torch.Tensor) -> torch.Tensor:
        scale, zero = current["scale"], current["zero"]
        if symmetric:
            return torch.clamp(torch.round(x / scale), -qmax_sym, qmax_sym) * scale
        return (torch.clamp(torch.round(x / scale) + zero, 0, qmax_asym) - zero) * scale

    out = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if granularity == "group" and grid is not None:
                from_grid(int(group_of[col]))
            elif granularity == "group" and col % group_size == 0:
                derive(w1[:, i : i + group_size])
            x = w1[:, i]
            q = rnd(x)
            if keep is not None:
                q = torch.where(keep[:, col], q, torch.zeros_like(q))
            out[:, col] = q
            e = (x - q) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return out


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    n_m: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The SparseGPT-pruned weight: in each block of columns the weights with the smallest
    w^2 / [H^-1]_jj^2 (the OBS saliency) are zeroed, ``sparsity`` of them per block, and the
    rest updated to compensate. ``n_m`` (N kept of every M inputs): the saliency is compared
    within each group of M columns instead, on the weights as updated so far."""
    w = weight.detach().float().clone()
    cols = w.shape[1]
    hinv = _damped_inverse_cholesky(hessian.float(), w, damp)
    if n_m is not None:
        block_size -= block_size % n_m[1]  # groups never straddle two blocks
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        diag = torch.diag(h1).pow(2).unsqueeze(0)
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        if n_m is None:
            saliency = w1.pow(2) / diag
            k = int(saliency.numel() * sparsity)
            if k > 0:
                pruned.view(-1)[torch.topk(saliency.flatten(), k, largest=False).indices] = True
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                group = w1[:, i : i + m].pow(2) / diag[:, i : i + m]
                drop = torch.topk(group, m - n, dim=1, largest=False).indices
                pruned[:, i : i + m].scatter_(1, drop, True)
            x = w1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(x), x)
            e = (x - q) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """The layer's mean squared output error on the calibration inputs, relative to its output:
    tr(D H D^T) / tr(W H W^T) with D = W - approx (H = 2 X^T X / n)."""
    d = (weight.float() - approx.float()).double()
    w = weight.float().double()
    h = hessian.double()
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


def _blocks(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList] | None:
    """The model's stack of transformer blocks: the largest ModuleList whose children hold
    targeted layers (``model.layers`` of a Llama, ``encoder.layer`` of a BERT)."""
    best = None
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not any(n.startswith(f"{prefix}.") for n in names):
            continue
        if best is None or len(module) > len(best[1]):
            best = (prefix, module)
    return best


def _hessians(layers: dict[str, nn.Linear], run: Callable[[dict], None]) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n for each of ``layers`` (fp64 accumulated) over the inputs ``run`` feeds
    them; ``run`` puts each batch's padding mask in the dict it is given, and masked positions
    are skipped."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    keep: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str) -> Callable:
        def fn(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = keep["mask"]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]
            x = x.reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        run(keep)
    finally:
        for h in handles:
            h.remove()
    return {n: (2.0 * sums[n] / max(counts[n], 1)).float() for n in sums}


@torch.no_grad()
def sequential_(
    model: nn.Module,
    modules: list[tuple[str, nn.Linear]],
    calib: list[dict[str, torch.Tensor]],
    solve: Solver,
) -> None:
    """Run ``solve(name, layer, H)`` on every layer of ``modules``, block by block (see the
    module docstring), in place."""
    targets = dict(modules)
    found = _blocks(model, list(targets))
    done: set[str] = set()
    if found is not None:
        prefix, blocks = found
        captured: list[tuple[tuple, dict[str, Any], torch.Tensor | None]] = []
        state: dict[str, torch.Tensor | None] = {}

        def catch(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            captured.append((args, kwargs, state.get("mask")))
            raise _Stop

        handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        # No key-value cache: the captured arguments are replayed block after block.
        config = getattr(model, "config", None)
        extra = {"use_cache": False} if getattr(config, "use_cache", False) else {}
        try:
            for batch in calib:
                mask = batch.get("attention_mask")
                state["mask"] = None if mask is None else mask.bool().to(first_param(model).device)
                try:
                    forward_eval(model, {**batch, **extra})
                except _Stop:
                    pass
        finally:
            handle.remove()
        was_training = model.training
        model.eval()
        try:
            for index, block in enumerate(blocks):
                here = f"{prefix}.{index}."
                layers = {n: m for n, m in targets.items() if n.startswith(here)}

                def run(keep: dict, block: nn.Module = block) -> None:
                    for args, kwargs, mask in captured:
                        keep["mask"] = mask
                        block(*args, **kwargs)

                if layers:
                    for name, h in _hessians(layers, run).items():
                        solve(name, layers[name], h)
                    done.update(layers)
                for i, (args, kwargs, mask) in enumerate(captured):
                    out = block(*args, **kwargs)
                    hidden = out[0] if isinstance(out, tuple) else out
                    if args:
                        captured[i] = ((hidden, *args[1:]), kwargs, mask)
                    else:
                        captured[i] = (args, {**kwargs, "hidden_states": hidden}, mask)
        finally:
            model.train(was_training)
    rest = [(n, m) for n, m in modules if n not in done]
    if rest:
        grams = collect_input_stats(model, rest, calib, gram=True)
        counts = sum(
            int(b["attention_mask"].sum()) if "attention_mask" in b else len(b["labels"])
            for b in calib
        )
        for name, module in rest:
            solve(name, module, (2.0 * grams[name] / max(counts, 1)).float())
