"""Structured pruning: physically removes FFN neurons and attention heads from BERT-like,
GPT-2-like and Llama-like transformer blocks, so the pruned model is smaller and faster with
stock kernels.

Per block, ``round(sparsity * n)`` of the ``n`` FFN neurons and ``round(sparsity * units)`` of
the attention units are removed (at least one of each is always kept):

* FFN neuron ``j``: row ``j`` of the up projection (BERT ``intermediate.dense``, GPT-2
  ``mlp.c_fc`` column, Llama ``mlp.up_proj`` and ``mlp.gate_proj``) and column ``j`` of the down
  projection (BERT ``output.dense``, GPT-2 ``mlp.c_proj`` row, Llama ``mlp.down_proj``).
* Attention unit: a head, its ``head_dim`` output rows of Q, K and V (GPT-2: the matching
  columns of each third of the fused ``c_attn``) and its ``head_dim`` input columns of the
  attention output projection (BERT ``attention.output.dense``, GPT-2 ``attn.c_proj`` rows).
  With grouped-query attention (Llama: ``num_key_value_groups`` query heads share each key /
  value head) a unit is one key / value head with its query heads, so every query head left
  still reads the key and value it was trained with; the Llama attention reads its head counts
  from the projections' shapes.

Importance of a unit (a neuron or a head) feeding a down projection ``W`` (columns ``W_u``):

* with calibration batches: the RMS norm of the unit's contribution to the block's residual
  output, ``sqrt(E_t ||W_u (x_u,t - mean(x_u))||^2)``, over the non-padding calibration tokens,
  where ``x_u`` is the unit's input to the down projection (the FFN activation after the
  nonlinearity, or the head's attention output). For a neuron this is
  ``std(a_j) * ||W[:, j]||``; for a head it is ``sqrt(tr(W_h Cov(x_h) W_h^T))``, computed from a
  per-head covariance (no per-token products needed). It is, to first order, the output error
  that removing the unit leaves, because the unit's *mean* contribution ``W_u mean(x_u)`` is not
  lost: it is folded into the down projection's bias (bias compensation, as in FLAP). Units that
  fire at a near-constant level therefore cost nothing and go first.
* without calibration: weight norms only. Neuron: ``||W_up[j, :]|| * ||W_down[:, j]||``; head:
  ``||W_v[h]||_F * ||W_o[:, h]||_F`` (the value path is how a head writes to the residual
  stream; Q and K only shape its attention pattern).

The model's config is left untouched (sizes differ per block): ``structure_of`` records the kept
sizes (the manifest entry) and ``rebuild_structure_`` reshapes a fresh dense model to them before
a state dict saved after pruning is loaded. Plain torch + transformers: no Ray, no DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from orchestrator.compress.common import FilterFn, ModuleRow, first_param, select_modules
from orchestrator.compress.technique import Applied, Context, Technique, register
from orchestrator.config.compress import StructuredPruneConfig
from orchestrator.errors import ConfigError, Problem

__all__ = ["StructuredPrune", "prune_structured_", "rebuild_structure_", "structure_of"]

SUPPORTED = (
    "BERT-like encoders (BERT, RoBERTa, ELECTRA, MiniLM...: blocks with attention.self.{query,"
    "key,value}, attention.output.dense, intermediate.dense, output.dense) and GPT-2-like decoders "
    "(blocks with attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj as Conv1D) and Llama-like "
    "decoders (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj; grouped-query attention)"
)

Proj = nn.Linear | Conv1D


# ---------------------------------------------------------------------------------------------
# Projections: Linear keeps weight as [out, in], GPT-2's Conv1D as [in, out].


def _weight_oi(m: Proj) -> torch.Tensor:
    """The weight as [out, in] (a view, no copy)."""
    return m.weight.t() if isinstance(m, Conv1D) else m.weight


def _shape(m: Proj) -> list[int]:
    return list(m.weight.shape)


def _params(m: Proj) -> int:
    return sum(p.numel() for p in m.parameters())


def _new_param(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.detach().clone().contiguous(), requires_grad=old.requires_grad)


@torch.no_grad()
def _keep_outputs(m: Proj, idx: torch.Tensor) -> None:
    """Keep only the output features ``idx`` (in place: the module object stays the same)."""
    idx = idx.to(m.weight.device)
    if isinstance(m, Conv1D):
        m.weight = _new_param(m.weight, m.weight[:, idx])
        m.nf = len(idx)
    else:
        m.weight = _new_param(m.weight, m.weight[idx])
        m.out_features = len(idx)
    if m.bias is not None:
        m.bias = _new_param(m.bias, m.bias[idx])


@torch.no_grad()
def _keep_inputs(m: Proj, idx: torch.Tensor) -> None:
    """Keep only the input features ``idx`` (the bias is per output: unchanged)."""
    idx = idx.to(m.weight.device)
    if isinstance(m, Conv1D):
        m.weight = _new_param(m.weight, m.weight[idx])
        m.nx = len(idx)
    else:
        m.weight = _new_param(m.weight, m.weight[:, idx])
        m.in_features = len(idx)


# ---------------------------------------------------------------------------------------------
# Blocks


@dataclass
class _Block:
    """One transformer block's prunable parts, with qualified module names."""

    key: str  # "0", "1", ... in model order
    arch: str  # bert | gpt2 | llama
    attn: nn.Module  # holds the head-count attributes the forward reads
    qkv: list[tuple[str, Proj]]  # BERT, Llama: query, key, value; GPT-2: the fused c_attn
    o: tuple[str, Proj]  # attention output projection (input = concatenated heads)
    up: tuple[str, Proj]  # FFN up projection
    down: tuple[str, Proj]  # FFN down projection
    gate: tuple[str, Proj] | None = None  # Llama's gate projection, pruned with ``up``

    @property
    def head_dim(self) -> int:
        if self.arch == "bert":
            return int(self.attn.attention_head_size)
        return int(self.attn.head_dim)

    @property
    def heads(self) -> int:
        """Query heads."""
        if self.arch == "bert":
            return int(self.attn.num_attention_heads)
        if self.arch == "llama":
            return int(_weight_oi(self.qkv[0][1]).shape[0]) // self.head_dim
        return int(self.attn.num_heads)

    @property
    def group(self) -> int:
        """Query heads per key/value head (grouped-query attention); 1 without it. A unit of
        head pruning is a key/value head with its query heads: removing it keeps the grouping
        every remaining query head relies on."""
        return int(self.attn.num_key_value_groups) if self.arch == "llama" else 1

    @property
    def units(self) -> int:
        return self.heads // self.group

    @property
    def ffn(self) -> int:
        return int(_weight_oi(self.up[1]).shape[0])

    def head_modules(self) -> list[tuple[str, Proj]]:
        return [*self.qkv, self.o]

    def ffn_modules(self) -> list[tuple[str, Proj]]:
        return [*([self.gate] if self.gate else []), self.up, self.down]

    def head_rows(self, keep: list[int]) -> list[torch.Tensor]:
        """Per Q/K/V projection, its output features that belong to the units ``keep``."""
        d = self.head_dim
        one = torch.cat([torch.arange(u * d, (u + 1) * d) for u in keep])
        if self.arch == "bert":
            return [one, one, one]
        if self.arch == "llama":
            return [self.head_cols(keep), one, one]
        width = self.heads * d  # GPT-2 c_attn output: [q | k | v], each heads * d wide
        return [torch.cat([one + part * width for part in range(3)])]

    def head_cols(self, keep: list[int]) -> torch.Tensor:
        """Input features of the output projection (= query heads) of the units ``keep``."""
        w = self.head_dim * self.group
        return torch.cat([torch.arange(u * w, (u + 1) * w) for u in keep])

    def keep_units(self, keep: list[int]) -> None:
        for (_, m), rows in zip(self.qkv, self.head_rows(keep), strict=True):
            _keep_outputs(m, rows)
        _keep_inputs(self.o[1], self.head_cols(keep))
        self.set_heads(len(keep) * self.group)

    def keep_neurons(self, idx: torch.Tensor) -> None:
        for _, m in [*([self.gate] if self.gate else []), self.up]:
            _keep_outputs(m, idx)
        _keep_inputs(self.down[1], idx)

    def set_heads(self, n: int) -> None:
        """Update every attribute the attention forward reads (head_dim and scaling stay; a
        Llama attention reads its head count from the projections' shapes)."""
        if self.arch == "bert":
            self.attn.num_attention_heads = n
            self.attn.all_head_size = n * self.attn.attention_head_size
        elif self.arch == "gpt2":
            self.attn.num_heads = n
            self.attn.split_size = n * self.attn.head_dim


def _child(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _is_bert_block(m: nn.Module) -> bool:
    self_attn = _child(m, "attention.self")
    if self_attn is None or not all(
        hasattr(self_attn, a)
        for a in ("num_attention_heads", "attention_head_size", "all_head_size")
    ):
        return False
    parts = (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
    return all(isinstance(_child(m, p), nn.Linear) for p in parts)


def _is_gpt2_block(m: nn.Module) -> bool:
    attn = _child(m, "attn")
    if (
        attn is None
        or getattr(attn, "is_cross_attention", False)
        or not all(hasattr(attn, a) for a in ("num_heads", "head_dim", "split_size"))
    ):
        return False
    return all(
        isinstance(_child(m, p), Conv1D)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )


def _is_llama_block(m: nn.Module) -> bool:
    attn = _child(m, "self_attn")
    if attn is None or not all(hasattr(attn, a) for a in ("head_dim", "num_key_value_groups")):
        return False
    parts = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    return all(isinstance(_child(m, p), nn.Linear) for p in parts)


def _blocks(model: nn.Module) -> list[_Block]:
    out: list[_Block] = []
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        if _is_bert_block(m):
            arch, attn = "bert", _child(m, "attention.self")
            qkv = [f"attention.self.{p}" for p in ("query", "key", "value")]
            o, up, down = "attention.output.dense", "intermediate.dense", "output.dense"
        elif _is_gpt2_block(m):
            arch, attn = "gpt2", _child(m, "attn")
            qkv, o, up, down = ["attn.c_attn"], "attn.c_proj", "mlp.c_fc", "mlp.c_proj"
        elif _is_llama_block(m):
            arch, attn = "llama", _child(m, "self_attn")
            qkv = [f"self_attn.{p}_proj" for p in ("q", "k", "v")]
            o, up, down = "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"
        else:
            continue
        out.append(
            _Block(
                key=str(len(out)),
                arch=arch,
                attn=attn,
                qkv=[(pre + p, _child(m, p)) for p in qkv],
                o=(pre + o, _child(m, o)),
                up=(pre + up, _child(m, up)),
                down=(pre + down, _child(m, down)),
                gate=(pre + "mlp.gate_proj", _child(m, "mlp.gate_proj"))
                if arch == "llama"
                else None,
            )
        )
    if len({b.arch for b in out}) > 1:
        return []
    return out


def _unsupported(model: nn.Module) -> ConfigError:
    return ConfigError(
        Problem(
            "compress.prune.method",
            "structured",
            f"{type(model).__name__} has no transformer blocks structured pruning knows; "
            f"supported: {SUPPORTED}",
            "use method=magnitude or wanda for this model",
        )
    )


def _supported_blocks(model: nn.Module) -> list[_Block]:
    blocks = _blocks(model)
    if not blocks:
        raise _unsupported(model)
    return blocks


# ---------------------------------------------------------------------------------------------
# Importance


class _Stats:
    """Per-channel sums of one down projection's input over the non-padding calibration tokens:
    count, sum and (per head, or per channel when ``group == 1``) the second-moment matrix."""

    def __init__(self, group: int) -> None:
        self.group = group
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.group == 1:
            gram = (x * x).sum(0).reshape(-1, 1, 1)
        else:
            g = x.reshape(x.shape[0], -1, self.group).transpose(0, 1)  # [units, N, group]
            gram = torch.bmm(g.transpose(1, 2), g)  # [units, group, group]
        gram, s = gram.double(), x.sum(0).double()
        self.n += x.shape[0]
        self.sum = s if self.sum is None else self.sum + s
        self.gram = gram if self.gram is None else self.gram + gram

    def mean(self) -> torch.Tensor:
        assert self.sum is not None
        return self.sum / self.n

    def cov(self) -> torch.Tensor:
        """Per-unit covariance [units, group, group]."""
        assert self.gram is not None
        mu = self.mean().reshape(-1, self.group)
        return self.gram / self.n - torch.einsum("ui,uj->uij", mu, mu)


@torch.no_grad()
def _calibrate(
    model: nn.Module, targets: dict[str, tuple[Proj, int]], calib: list[dict[str, torch.Tensor]]
) -> dict[str, _Stats]:
    """One forward pass over ``calib`` collecting the inputs of the down projections."""
    stats = {name: _Stats(group) for name, (_, group) in targets.items()}
    mask_holder: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Callable:
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = mask_holder.get("mask")
            if x.dim() == 3 and mask is not None and x.shape[:2] == mask.shape:
                x = x[mask.bool()]
            if x.numel():
                stats[name].add(x)

        return hook

    hooks = [m.register_forward_pre_hook(make_hook(n)) for n, (m, _) in targets.items()]
    was_training = model.training
    model.eval()
    device = first_param(model).device
    try:
        for batch in calib:
            mask = batch.get("attention_mask")
            ids = batch["input_ids"].to(device)
            if mask is None:
                mask = torch.ones_like(ids)
            mask_holder["mask"] = mask.to(device)
            model(input_ids=ids, attention_mask=mask_holder["mask"])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats


def _unit_scores(
    w_down: torch.Tensor, st: _Stats | None, group: int, w_in: torch.Tensor
) -> torch.Tensor:
    """Importance per unit (``group`` consecutive input channels of ``w_down``, [out, in]).
    ``w_in``: the rows ([units*group, in]) of the projection that feeds the unit (weight-only
    fallback: the value projection for heads, the up projection for neurons)."""
    w = w_down.detach().double()
    units = w.shape[1] // group
    w_u = w.reshape(w.shape[0], units, group)  # [out, units, group]
    if st is not None and st.n > 0:
        cov = st.cov()  # [units, group, group]
        # tr(W_u Cov_u W_u^T) = sum_{i,j} (W_u^T W_u)_{ij} Cov_u{ij}
        wtw = torch.einsum("oui,ouj->uij", w_u, w_u)
        return (wtw * cov).sum((1, 2)).clamp_min(0).sqrt()
    out_norm = w_u.pow(2).sum((0, 2)).sqrt()
    in_norm = w_in.detach().double().reshape(units, -1).pow(2).sum(1).sqrt()
    return out_norm * in_norm


def _keep_top(scores: torch.Tensor, remove: int) -> list[int]:
    """Indices of the units kept (highest scores), in their original order."""
    n = scores.numel()
    keep = torch.topk(scores, n - remove).indices
    return sorted(keep.tolist())


def _n_remove(sparsity: float, n: int) -> int:
    return max(0, min(round(sparsity * n), n - 1))


@torch.no_grad()
def _compensate_bias(down: Proj, st: _Stats | None, removed_cols: torch.Tensor) -> None:
    """Fold the removed channels' mean contribution into the down projection's bias."""
    if st is None or st.n == 0 or len(removed_cols) == 0 or down.bias is None:
        return
    w = _weight_oi(down).double()
    mu = st.mean().to(w.device)
    shift = w[:, removed_cols.to(w.device)] @ mu[removed_cols.to(w.device)]
    down.bias.add_(shift.to(down.bias.dtype))


# ---------------------------------------------------------------------------------------------
# Public API


def _row(
    name: str, m: Proj, shape: list[int], params: int, details: dict[str, Any], reason: str = ""
) -> ModuleRow:
    after = _shape(m)
    return ModuleRow(
        name=name,
        technique="prune",
        kind=type(m).__name__,
        shape_before=shape,
        shape_after=after,
        params_before=params,
        params_after=_params(m),
        skipped=bool(reason),
        reason=reason,
        details=details,
    )


def prune_structured_(
    model: nn.Module,
    cfg: StructuredPruneConfig,
    *,
    calib: list[dict[str, torch.Tensor]] | None = None,
    filter_fn: FilterFn | None = None,
) -> list[ModuleRow]:
    """Physically remove ``round(cfg.sparsity * n)`` FFN neurons (``cfg.ffn``) and attention
    heads (``cfg.heads``) from every selected block of ``model``, in place; at least one head
    and one neuron always stay. A block's heads are pruned when all of its Q/K/V/output
    projections pass ``cfg.include`` / ``cfg.exclude`` / ``filter_fn``; its FFN when both FFN
    projections do. ``calib`` batches (``input_ids``, ``attention_mask``) make the importance
    activation-aware and fold the removed units' mean output into the bias; without them weight
    norms decide. Returns one row per projection of a selected group (``skipped`` when nothing
    was removed from it). Unsupported architectures raise ConfigError."""
    blocks = _supported_blocks(model)
    selected = {
        n
        for n, _ in select_modules(
            model,
            cfg.include,
            cfg.exclude,
            (nn.Module,),
            "compress.prune",
            check_exclude="exclude" in cfg.model_fields_set,
            filter_fn=filter_fn,
        )
    }

    # What to prune where, decided on the dense model before anything changes.
    plan: list[tuple[_Block, bool, bool]] = []
    for b in blocks:
        do_heads = cfg.heads and all(n in selected for n, _ in b.head_modules())
        do_ffn = cfg.ffn and all(n in selected for n, _ in b.ffn_modules())
        if do_heads or do_ffn:
            plan.append((b, do_heads, do_ffn))

    stats: dict[str, _Stats] = {}
    if calib and cfg.sparsity > 0:
        targets: dict[str, tuple[Proj, int]] = {}
        for b, do_heads, do_ffn in plan:
            if do_heads and _n_remove(cfg.sparsity, b.units):
                targets[b.o[0]] = (b.o[1], b.head_dim * b.group)
            if do_ffn and _n_remove(cfg.sparsity, b.ffn):
                targets[b.down[0]] = (b.down[1], 1)
        if targets:
            stats = _calibrate(model, targets, calib)

    rows: list[ModuleRow] = []
    for b, do_heads, do_ffn in plan:
        if do_heads:
            rows += _prune_heads(b, cfg.sparsity, stats.get(b.o[0]))
        if do_ffn:
            rows += _prune_ffn(b, cfg.sparsity, stats.get(b.down[0]))
    return rows


def _prune_heads(b: _Block, sparsity: float, st: _Stats | None) -> list[ModuleRow]:
    """Remove ``round(sparsity * units)`` attention units: heads, or with grouped-query
    attention whole key/value heads with their query heads."""
    n, d, g = b.units, b.head_dim, b.group
    heads = b.heads
    before = [(name, m, _shape(m), _params(m)) for name, m in b.head_modules()]
    remove = _n_remove(sparsity, n)
    if remove:
        if b.arch == "gpt2":
            w_v = _weight_oi(b.qkv[0][1])[2 * n * d : 3 * n * d]
        else:
            w_v = _weight_oi(b.qkv[2][1])
        scores = _unit_scores(_weight_oi(b.o[1]), st, d * g, w_v)
        keep = _keep_top(scores, remove)
        dropped = [u for u in range(n) if u not in keep]
        _compensate_bias(b.o[1], st, b.head_cols(dropped))
        b.keep_units(keep)
    details = {"heads_before": heads, "heads_after": b.heads}
    if g > 1:
        details.update(kv_heads_before=n, kv_heads_after=b.units)
    reason = "" if remove else f"sparsity {sparsity} removes no head of {n}"
    return [_row(name, m, shape, params, details, reason) for name, m, shape, params in before]


def _prune_ffn(b: _Block, sparsity: float, st: _Stats | None) -> list[ModuleRow]:
    n = b.ffn
    before = [(name, m, _shape(m), _params(m)) for name, m in b.ffn_modules()]
    remove = _n_remove(sparsity, n)
    if remove:
        scores = _unit_scores(_weight_oi(b.down[1]), st, 1, _weight_oi(b.up[1]))
        keep = _keep_top(scores, remove)
        kept = set(keep)
        _compensate_bias(
            b.down[1], st, torch.tensor([j for j in range(n) if j not in kept], dtype=torch.long)
        )
        b.keep_neurons(torch.tensor(keep, dtype=torch.long))
    details = {"neurons_before": n, "neurons_after": b.ffn}
    reason = "" if remove else f"sparsity {sparsity} removes no neuron of {n}"
    return [_row(name, m, shape, params, details, reason) for name, m, shape, params in before]


def structure_of(model: nn.Module) -> dict[str, Any]:
    """JSON-able per-block sizes: ``{"arch": "bert", "blocks": {"0": {"heads": 6, "ffn": 768},
    ...}}`` (blocks in model order). Raises ConfigError for unsupported architectures."""
    blocks = _supported_blocks(model)
    return {
        "arch": blocks[0].arch,
        "blocks": {b.key: {"heads": b.heads, "ffn": b.ffn} for b in blocks},
    }


def rebuild_structure_(model: nn.Module, structure: dict[str, Any]) -> None:
    """Shrink the blocks of a freshly built (dense) ``model`` to the sizes ``structure`` records
    (from ``structure_of`` of a pruned model of the same config), keeping the first heads and
    neurons: the weights are stand-ins, meant to be overwritten by ``load_state_dict``."""
    blocks = _supported_blocks(model)
    recorded = structure.get("blocks", {})
    arch = structure.get("arch")

    def mismatch(message: str) -> ConfigError:
        return ConfigError(
            Problem(
                "compress.prune",
                {"arch": arch, "blocks": len(recorded)},
                message,
                "rebuild from the same model config the pruned checkpoint was made from",
            )
        )

    if arch != blocks[0].arch or set(recorded) != {b.key for b in blocks}:
        raise mismatch(
            f"the recorded structure does not fit this model ({blocks[0].arch} "
            f"with {len(blocks)} blocks)"
        )
    for b in blocks:
        want = recorded[b.key]
        heads, ffn = int(want["heads"]), int(want["ffn"])
        if not (1 <= heads <= b.heads and 1 <= ffn <= b.ffn):
            raise mismatch(
                f"block {b.key} records {heads} heads / {ffn} FFN neurons; the model "
                f"has {b.heads} / {b.ffn}"
            )
        if heads % b.group:
            raise mismatch(
                f"block {b.key} records {heads} heads, not a multiple of its {b.group} query "
                "heads per key/value head"
            )
        if heads < b.heads:
            b.keep_units(list(range(heads // b.group)))
        if ffn < b.ffn:
            b.keep_neurons(torch.arange(ffn))


@register
class StructuredPrune(Technique):
    config_type = StructuredPruneConfig
    module_types = (nn.Module,)  # blocks are selected through their projections' names

    def apply_(self, model: nn.Module, cfg: StructuredPruneConfig, ctx: Context) -> Applied:
        rows = prune_structured_(model, cfg, calib=ctx.calib, filter_fn=ctx.filter_fn)
        # Recorded now: a later technique (factorization) replaces the projections it reads.
        return Applied(rows, entry=structure_of(model))

    def rebuild_(self, model: nn.Module, cfg: StructuredPruneConfig, entry: dict[str, Any]) -> None:
        rebuild_structure_(model, entry)

    def note(self, cfg: StructuredPruneConfig) -> str:
        return (
            "structured pruning: layers are physically smaller, so both bytes and latency drop "
            "for real"
        )
