"""Per-rank memory of DeepSpeed ZeRO stages 0-3, measured, against the ZeRO paper's model.

What it measures
    For each ZeRO stage 0, 1, 2, 3 it builds the project's ``DeepSpeedStrategy`` exactly as a
    training job does (``TrainConfig(strategy="deepspeed", zero_stage=s, precision="bf16",
    num_workers=2, batch_size=4)``, ``torch.optim.AdamW`` as client optimizer, ``prepare(model,
    total_steps=10)``) on the packaged MiniLM (``ModelConfig(name="minilm-l6")``, 22.7 M
    parameters) in 2 gloo worker processes on CPU. Each rank runs one full training step
    (forward, backward, optimizer step on random token ids, so Adam state exists) and then the
    forward and backward of a second step. There, with gradients reduced and partitioned and the
    optimizer step not yet taken, it walks the tensors DeepSpeed actually keeps: module
    parameters (and ZeRO-3 ``ds_tensor`` partitions), their ``.grad``, the ZeRO wrapper's buffers
    (``averaged_gradients``, ipg reduce buckets, gradient partitions, fp32 master partitions, ...)
    and the torch optimizer's state. Every distinct storage (by ``untyped_storage().data_ptr()``)
    is counted once, with its full ``nbytes`` (a view keeps its whole storage alive), into
    parameters, gradients, optimizer state (fp32 master + exp_avg + exp_avg_sq + step) or other.
    It also samples the same walk at entry and exit of every gradient-bucket reduction during
    that backward (the transient peak) and once more after the optimizer step (what persists
    between steps).

    The figures are compared with the ZeRO paper's model for mixed-precision Adam with P
    parameters on N = 2 ranks (bytes): stage 0: 2P + 2P + 12P; stage 1: 2P + 2P + 12P/N;
    stage 2: 2P + 2P/N + 12P/N; stage 3: 2P/N + 2P/N + 12P/N. The goal is a measured total
    within 15 % of the model; misses are reported as measured, with their cause.

    Nothing is adjusted: a storage is allocated bytes (``nbytes``). Large CPU buffers that are
    ``torch.empty`` are committed lazily by Linux, so for storages of 64 MiB and more the resident
    size (mincore(2) on the storage's pages) is printed beside it.

How to run (repository root, venv active; under a minute on 2 idle CPU cores)
    python benchmarks/zero_memory.py [--stages 0 1 2 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

WORLD = 2
BATCH, SEQ_LEN, NUM_LABELS = 4, 32, 2
TOLERANCE = 0.15
MB = 1e6  # decimal megabytes, as printed everywhere below
RESIDENT_MIN_BYTES = 64 << 20  # only big buffers are worth a residency check

CATEGORIES = ("params", "grads", "optim", "other")
BUCKET = "ipg reduce bucket buffer"  # source name of DeepSpeed's gradient staging bucket
# ZeRO-1/2 call self.reduce_ipg_grads; ZeRO-3 its name-mangled private equivalent.
REDUCE_METHODS = (
    "reduce_ipg_grads",
    "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads",
)

# (path pattern, category, source, specificity). Paths come from ``_snapshot``: "module.<name>"
# for model parameters, "optimizer.master/state.<key>" for the torch optimizer, "ds.<attr>" for
# DeepSpeed's optimizer wrapper and "engine.<attr>" for the engine. The first matching rule
# classifies a path. When several paths reach one storage, the most specific source names it
# (a module's .grad is often just a view into a DeepSpeed buffer with a more telling name).
RULES: list[tuple[re.Pattern[str], str, str, int]] = [
    (re.compile(p), cat, src, spec)
    for p, cat, src, spec in [
        (r"^module\..*\.grad$", "grads", "module param .grad", 0),
        (r"\.grad_accum$", "grads", "param .grad_accum", 0),
        (r"\.grad$", "grads", "fp32 .grad of master weights", 1),
        (r"ipg_buckets", "grads", BUCKET, 2),
        (
            r"averaged_gradients|grads_in_partition|all_grad_tensors|grad_partition",
            "grads",
            "reduced gradient partition",
            1,
        ),
        (r"^optimizer\.state\.(exp_avg_sq|exp_avg|step)$", "optim", "AdamW {0}", 1),
        (r"^optimizer\.master", "optim", "fp32 master weights", 1),
        (
            r"fp32_groups|fp32_partitioned|single_partition_of_fp32",
            "optim",
            "fp32 master weights",
            1,
        ),
        (r"^module\..*\.ds_tensor$", "params", "bf16 param partition (ds_tensor)", 1),
        (r"^module\.", "params", "bf16 module params", 1),
        (r"bit16_groups|fp16_groups|fp16_partitioned|lp_param", "params", "bf16 flat buffers", 0),
    ]
]


# --------------------------------------------------------------------------------------------
# Tensor walk and accounting (runs inside each worker)
# --------------------------------------------------------------------------------------------


@dataclass
class Storage:
    nbytes: int
    category: str
    source: str
    specificity: int
    resident: int | None = None


def _classify(path: str) -> tuple[str, str, int]:
    for pattern, category, source, specificity in RULES:
        m = pattern.search(path)
        if m:
            return category, source.format(*m.groups()), specificity
    # Unknown holders stay visible under their attribute path instead of disappearing.
    return "other", re.sub(r"\[[^\]]*\]", "[]", path), -1


def _walk(root: object, path: str, out: list[tuple[str, torch.Tensor]], seen: set[int]) -> None:
    """Every tensor reachable from ``root`` through DeepSpeed / torch.optim objects, containers
    and tensor attributes (``.grad``, ZeRO-3 ``.ds_tensor``). Modules are not entered: model
    parameters are walked explicitly, under their names."""
    stack: list[tuple[object, str, int]] = [(root, path, 0)]
    while stack:
        obj, p, depth = stack.pop()
        if id(obj) in seen or depth > 12:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            out.append((p, obj))
            # .grad of a non-leaf is never populated (and warns); leaves hold the real ones.
            if obj.is_leaf and obj.grad is not None:
                stack.append((obj.grad, p + ".grad", depth + 1))
            for attr in ("ds_tensor", "grad_accum"):
                sub = getattr(obj, attr, None)
                if isinstance(sub, torch.Tensor):
                    stack.append((sub, f"{p}.{attr}", depth + 1))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((v, f"{p}[{i}]", depth + 1) for i, v in enumerate(obj))
        elif isinstance(obj, dict):
            for k, v in list(obj.items()):
                if isinstance(k, torch.Tensor):
                    stack.append((k, f"{p}<key>", depth + 1))
                key = k if isinstance(k, (str, int)) else type(k).__name__
                stack.append((v, f"{p}[{key}]", depth + 1))
        elif isinstance(obj, torch.nn.Module):
            continue
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(
            obj, "__dict__"
        ):
            stack.extend((v, f"{p}.{k}", depth + 1) for k, v in list(vars(obj).items()))


def _resident(ptr: int, nbytes: int) -> int | None:
    """Resident bytes of ``[ptr, ptr + nbytes)`` by mincore(2): a large ``torch.empty`` on CPU
    is only address space until its pages are first written. None where mincore is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
    start = ptr - ptr % page
    pages = (ptr + nbytes - start + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vec) != 0:
        return None
    return min(nbytes, sum(b & 1 for b in bytes(vec)) * page)


def _snapshot(engine: Any) -> tuple[dict[int, Storage], list[str]]:
    """Distinct storages this rank holds, classified; plus any classification conflicts."""
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    # Order matters only for readable sources: conflicts are resolved by category below.
    for name, param in engine.module.named_parameters():
        _walk(param, f"module.{name}", found, seen)
    torch_opt = engine.basic_optimizer  # the client torch.optim.AdamW that DeepSpeed steps
    for group in torch_opt.param_groups:
        _walk(group["params"], "optimizer.master", found, seen)
    for state in torch_opt.state.values():
        for key, value in state.items():
            _walk(value, f"optimizer.state.{key}", found, seen)
    _walk(engine.optimizer, "ds", found, seen)
    skip = {"_modules", "_parameters", "_buffers", "optimizer", "basic_optimizer"}
    for key, value in vars(engine).items():
        if key not in skip:
            _walk(value, f"engine.{key}", found, seen)

    storages: dict[int, Storage] = {}
    conflicts: list[str] = []
    for path, tensor in found:
        if tensor.device.type == "meta":  # shape-only metadata (ZeRO-1/2 keep these), no bytes
            continue
        st = tensor.untyped_storage()
        ptr, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0 or ptr == 0:  # ZeRO-3 releases gathered params to empty storages
            continue
        category, source, specificity = _classify(path)
        have = storages.get(ptr)
        if have is None:
            resident = _resident(ptr, nbytes) if nbytes >= RESIDENT_MIN_BYTES else None
            storages[ptr] = Storage(nbytes, category, source, specificity, resident)
        elif have.category == "other" and category != "other":
            have.category, have.source, have.specificity = category, source, specificity
        elif category == have.category and specificity > have.specificity:
            have.source, have.specificity = source, specificity
        elif category not in ("other", have.category):
            conflicts.append(f"{path}: {category} vs {have.category} ({have.source})")
    return storages, conflicts


def _totals(storages: dict[int, Storage]) -> dict[str, int]:
    out = dict.fromkeys(CATEGORIES, 0)
    for s in storages.values():
        out[s.category] += s.nbytes
    return out


def _sources(storages: dict[int, Storage]) -> list[tuple[str, str, int, int | None]]:
    """(category, source, bytes, resident bytes or None) summed per source."""
    agg: dict[tuple[str, str], list[Any]] = {}
    for s in storages.values():
        entry = agg.setdefault((s.category, s.source), [0, None])
        entry[0] += s.nbytes
        if s.resident is not None:
            entry[1] = (entry[1] or 0) + s.resident
    return sorted((c, src, b, r) for (c, src), (b, r) in agg.items())


@dataclass
class Peak:
    """Largest gradient footprint seen at entry/exit of a bucket reduction during backward."""

    grads: int = 0
    storages: dict[int, Storage] = field(default_factory=dict)

    def sample(self, engine: Any) -> None:
        storages, _ = _snapshot(engine)
        grads = _totals(storages)["grads"]
        if grads > self.grads:
            self.grads, self.storages = grads, storages


def _sample_reductions(engine: Any, peak: Peak) -> None:
    """Wrap the wrapper's gradient-bucket reduction so ``peak`` sees the transient buffers
    (full-size grads and the ipg bucket) that are gone again when backward returns."""
    opt = engine.optimizer
    # Both reduction methods are looked up on the instance at call time, so an instance
    # attribute intercepts them.
    for name in REDUCE_METHODS:
        original = getattr(opt, name, None)
        if original is None:
            continue

        def wrapped(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            peak.sample(engine)
            result = _original(*args, **kwargs)
            peak.sample(engine)
            return result

        setattr(opt, name, wrapped)


def _layout_facts(engine: Any, rank: int) -> dict[str, Any]:
    """Facts about DeepSpeed's layout that explain deviations from the paper's model."""
    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    facts: dict[str, Any] = {"wrapper": type(opt).__name__}
    zero_cfg = engine._config.zero_config
    facts["reduce_bucket_size"] = int(zero_cfg.reduce_bucket_size)
    facts["contiguous_gradients"] = bool(zero_cfg.contiguous_gradients)
    if hasattr(opt, "partition_size") and hasattr(opt, "round_robin_bit16_offsets"):
        # ZeRO-1/2: a rank owns [rank * size, (rank + 1) * size) of each flat group. A parameter
        # that straddles that boundary is, for gradient purposes, handled whole by both ranks.
        facts["partition_numel"] = [int(s) for s in opt.partition_size]
        facts["groups_padding"] = [int(p) for p in opt.groups_padding]
        straddling = []
        for g, params in enumerate(opt.round_robin_bit16_groups):
            size = int(opt.partition_size[g])
            lo, hi = rank * size, (rank + 1) * size
            for p, off in zip(params, opt.round_robin_bit16_offsets[g], strict=True):
                end = off + p.numel()
                if off < hi and end > lo and (off < lo or end > hi):
                    owned = min(end, hi) - max(off, lo)
                    straddling.append((names.get(id(p), "?"), int(p.numel()), int(owned)))
        facts["straddling"] = straddling
    if facts["wrapper"] == "DeepSpeedZeroOptimizer_Stage3":
        persistent = [p for p in engine.module.parameters() if getattr(p, "ds_persist", False)]
        facts["persistent"] = (len(persistent), sum(p.numel() for p in persistent))
        facts["persistence_threshold"] = int(zero_cfg.param_persistence_threshold)
    steps = {float(s["step"]) for s in engine.basic_optimizer.state.values() if "step" in s}
    facts["adam_steps"] = sorted(steps)
    return facts


def _batch(rank: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)  # different data per rank, as in training
    return {
        "input_ids": torch.randint(1000, vocab, (BATCH, SEQ_LEN), generator=g),
        "labels": torch.randint(0, NUM_LABELS, (BATCH,), generator=g),
    }


def _train_step(strategy: Any, batch: dict[str, torch.Tensor], step: bool) -> None:
    with strategy.accumulate(boundary=True), strategy.autocast():
        loss = strategy.model(**batch).loss
    strategy.backward(loss)
    if step:
        strategy.step()


def _measure_stage(rank: int, stage: int) -> dict[str, Any]:
    from orchestrator import strategies
    from orchestrator.config.schema import ModelConfig, TrainConfig
    from orchestrator.models import build_model, build_tokenizer

    spec_model = ModelConfig(name="minilm-l6")
    tokenizer = build_tokenizer(spec_model)
    model = build_model(spec_model, NUM_LABELS, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    spec = TrainConfig(
        strategy="deepspeed",
        zero_stage=stage,
        precision="bf16",
        num_workers=WORLD,
        batch_size=BATCH,
    )
    strategy = strategies.build(spec, torch.device("cpu"))
    strategy.prepare(model, total_steps=10)
    engine = strategy.engine
    batch = _batch(rank, len(tokenizer))

    _train_step(strategy, batch, step=True)  # one real step: Adam state now exists
    peak = Peak()
    _sample_reductions(engine, peak)
    _train_step(strategy, batch, step=False)  # gradients of step 2, reduced, not yet applied
    held, conflicts = _snapshot(engine)
    facts = _layout_facts(engine, rank)
    strategy.step()
    between, _ = _snapshot(engine)
    result = {
        "stage": stage,
        "rank": rank,
        "P": n_params,
        "facts": facts,
        "conflicts": conflicts,
        "held": _totals(held),
        "held_sources": _sources(held),
        "peak_grads": peak.grads,
        "peak_sources": _sources(peak.storages),
        "between": _totals(between),
    }
    del strategy, engine, model
    gc.collect()
    return result


def worker(rank: int, world: int, stages: list[int]) -> list[dict[str, Any]]:
    """Run in each gloo process by ``run_workers``: measure every stage in turn."""
    import logging
    import warnings

    from deepspeed.utils import logger as ds_logger
    from transformers.utils import logging as hf_logging

    assert world == WORLD
    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines would bury the table
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    return [_measure_stage(rank, s) for s in stages]


# --------------------------------------------------------------------------------------------
# Paper model and report (runs in the parent)
# --------------------------------------------------------------------------------------------


def paper_model(n_params: int, world: int, stage: int) -> dict[str, float]:
    """ZeRO paper, mixed-precision Adam: 2P bf16 params, 2P bf16 grads, 12P optimizer state
    (fp32 master + exp_avg + exp_avg_sq), each divided by N from stage 3, 2 and 1 on."""
    p = float(n_params)
    return {
        "params": 2 * p / (world if stage >= 3 else 1),
        "grads": 2 * p / (world if stage >= 2 else 1),
        "optim": 12 * p / (world if stage >= 1 else 1),
    }


def _mb(n: float) -> str:
    return f"{n / MB:8.1f}"


def _print_table(results: list[dict[str, Any]]) -> dict[int, bool]:
    head = (
        f"{'stage':>5} {'rank':>4} | {'params':>8} {'grads':>8} {'optim':>8} {'other':>8} "
        f"{'total':>8} | {'params':>8} {'grads':>8} {'optim':>8} {'total':>8} | "
        f"{'ratio':>6}  goal"
    )
    print(f"{'':11}|{'measured per rank, MB':^46}|{'paper model per rank, MB':^37}|")
    print(head)
    print("-" * len(head))
    ok: dict[int, bool] = {}
    for r in results:
        model = paper_model(r["P"], WORLD, r["stage"])
        held = r["held"]
        total, model_total = sum(held.values()), sum(model.values())
        ratio = total / model_total
        hit = abs(ratio - 1) <= TOLERANCE
        ok[r["stage"]] = ok.get(r["stage"], True) and hit
        print(
            f"{r['stage']:>5} {r['rank']:>4} | {_mb(held['params'])} {_mb(held['grads'])} "
            f"{_mb(held['optim'])} {_mb(held['other'])} {_mb(total)} | "
            f"{_mb(model['params'])} {_mb(model['grads'])} {_mb(model['optim'])} "
            f"{_mb(model_total)} | {ratio:6.2f}  {'ok' if hit else 'MISS'}"
        )
    return ok


def _print_sources(results: list[dict[str, Any]]) -> None:
    print("\nWhere the bytes are (measured point; resident size for buffers >= 64 MiB):")
    for r in results:
        print(f"  stage {r['stage']} rank {r['rank']} ({r['facts']['wrapper']}):")
        for category, source, nbytes, resident in r["held_sources"]:
            res = "" if resident is None else f"  (resident {resident / MB:.1f} MB)"
            print(f"    {category:<6} {source:<34} {nbytes / MB:9.2f} MB{res}")
        for c in r["conflicts"]:
            print(f"    ! storage claimed by two categories: {c}")


def _print_transients(results: list[dict[str, Any]]) -> None:
    print("\nGradients: held at the measured point / peak sampled inside backward; and the")
    print("total that persists between steps (after optimizer.step), MB:")
    for r in results:
        peak = r["peak_grads"]
        peak_txt = f"{peak / MB:8.1f}" if peak else "     n/a"  # no ZeRO bucket reduction
        bucket = sum(b for _, s, b, _ in r["peak_sources"] if s == BUCKET)
        resident = sum(x or 0 for _, s, _, x in r["peak_sources"] if s == BUCKET)
        extra = f"  (ipg bucket {bucket / MB:.1f}, resident {resident / MB:.1f})" if bucket else ""
        print(
            f"  stage {r['stage']} rank {r['rank']}: grads held {r['held']['grads'] / MB:8.1f}"
            f"  peak {peak_txt}{extra};  between steps total "
            f"{sum(r['between'].values()) / MB:8.1f}"
        )


def _notes(results: list[dict[str, Any]]) -> list[str]:
    """Deviations from the paper's model, stated from what was measured on each stage."""
    notes: list[str] = []
    by_stage: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_stage.setdefault(r["stage"], []).append(r)
    for stage, rs in sorted(by_stage.items()):
        f0 = rs[0]["facts"]
        p = rs[0]["P"]
        if stage == 0:
            between = sum(rs[0]["between"].values())
            if f0["wrapper"] == "FP16_UnfusedOptimizer":
                notes.append(
                    "stage 0: DeepSpeed wraps AdamW in FP16_UnfusedOptimizer (bf16 with "
                    "grad_accum_dtype unset means bf16 gradient accumulation, so the engine takes "
                    "its DDP_BFLOAT16 path; BF16_Optimizer, which would partition the fp32 state, "
                    "is only chosen for ZeRO-1 with grad_accum_dtype=fp32 or for pipelines). It "
                    "keeps a full fp32 master copy and full Adam state on every rank and bf16 "
                    ".grad on the module: the paper's 16P baseline. Its "
                    "initialize_optimizer_states() runs one AdamW step on zero gradients at init, "
                    f"so after one real step Adam's step counter reads {f0['adam_steps']} (and "
                    "weight decay was applied once more to the fp32 master)."
                )
            else:
                notes.append(f"stage 0: DeepSpeed wraps AdamW in {f0['wrapper']}.")
            notes.append(
                "stage 0: gradients exist only from backward to the optimizer step; between "
                f"steps a rank holds {between / MB:.1f} MB ({between / p:.1f} bytes/parameter). "
                "The gradient all-reduce runs in the engine (flattened copies per bucket), not "
                "through a ZeRO bucket, so no peak is sampled."
            )
        elif stage in (1, 2):
            for r in rs:
                f = r["facts"]
                owned = sum(f["partition_numel"]) * 2
                strad = (
                    "; ".join(
                        f"{n} ({numel:,} elements, {own:,} owned)"
                        for n, numel, own in f["straddling"]
                    )
                    or "none"
                )
                notes.append(
                    f"stage {stage} rank {r['rank']}: owns {sum(f['partition_numel']):,} elements "
                    f"(its partitions of {len(f['partition_numel'])} flat groups: bf16 gradient "
                    f"share {owned / MB:.2f} MB; alignment padding {f['groups_padding']} "
                    f"elements) but holds {r['held']['grads'] / MB:.2f} MB "
                    "of gradient storage: DeepSpeed copies the gradients of every parameter "
                    "that touches its partition, whole, into one contiguous buffer "
                    "(grads_in_partition), and averaged_gradients keeps views of it alive. "
                    f"Parameters crossing this rank's partition boundary: {strad}."
                )
            if stage == 1:
                notes.append(
                    "stage 1: after backward DeepSpeed (contiguous_gradients="
                    f"{f0['contiguous_gradients']}) keeps only the partition's reduced gradients, "
                    "as stage 2 does; the paper's 2P of full gradients exists only inside "
                    "backward (autograd's .grad, then copied into the ipg bucket; see the peak "
                    "column), so held gradients come out at or below the model."
                )
            notes.append(
                f"stage {stage}: during backward the gradients are staged in an ipg bucket of "
                f"reduce_bucket_size = {f0['reduce_bucket_size']:,} elements "
                f"({f0['reduce_bucket_size'] * 2 / MB:.0f} MB bf16, allocated with torch.empty "
                "and freed at the end of backward); build_ds_config sizes reduce_bucket_size to a "
                "tenth of the model (DeepSpeed's default, 5e8, is far above this model's "
                f"{p:,} parameters)."
            )
        elif stage == 3:
            n_pers, numel_pers = f0["persistent"]
            notes.append(
                f"stage 3: the ipg reduce bucket ({f0['reduce_bucket_size']:,} bf16 elements = "
                f"{f0['reduce_bucket_size'] * 2 / MB:.0f} MB) is allocated once at init and kept "
                "for the life of the engine, so it is part of the held gradient buffers; on "
                "Linux CPU only its touched pages are resident (see the sources list), on a GPU "
                "the whole buffer is committed. build_ds_config sizes it to a tenth of the model "
                "(DeepSpeed's default of 5e8 elements made this stage 6.5x the paper's model)."
            )
            for r in rs:
                held = r["held"]
                bucket = sum(b for _, s, b, _ in r["held_sources"] if s == BUCKET)
                model_total = sum(paper_model(p, WORLD, 3).values())
                rest = sum(held.values()) - bucket
                notes.append(
                    f"stage 3 rank {r['rank']}: without that bucket the held total would be "
                    f"{rest / MB:.1f} MB, ratio {rest / model_total:.2f} (derived only to "
                    "locate the miss; the table's figure is the measured one)."
                )
            notes.append(
                f"stage 3: {n_pers} small parameters ({numel_pers:,} elements, below "
                f"param_persistence_threshold = {f0['persistence_threshold']:,}) stay gathered "
                "in full on every rank besides their ds_tensor partition; gradients are kept in "
                "a flat bf16 partition buffer (grad_partitions_flat_buffer) of exactly P/N "
                "elements."
            )
    return notes


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stages",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3],
        choices=[0, 1, 2, 3],
        help="ZeRO stages to measure (default: all)",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)

    import deepspeed

    from orchestrator.testing import run_workers

    t0 = time.monotonic()
    per_rank = run_workers(worker, WORLD, args.stages, timeout=1800)
    results = sorted(
        (r for rank_results in per_rank for r in rank_results),
        key=lambda r: (r["stage"], r["rank"]),
    )
    p = results[0]["P"]
    print(
        f"\nZeRO memory per rank: packaged MiniLM (P = {p:,} parameters), {WORLD} gloo ranks "
        f"on CPU, bf16, torch.optim.AdamW, torch {torch.__version__}, deepspeed "
        f"{deepspeed.__version__}"
    )
    print(
        "Measured after one full training step plus the forward/backward of a second one "
        "(gradients reduced,\noptimizer step not yet taken); distinct storages, full nbytes. "
        "MB = 1e6 bytes.\n"
    )
    ok = _print_table(results)
    _print_sources(results)
    _print_transients(results)
    print("\nDeviations from the paper's model:")
    for note in _notes(results):
        print(f"  - {note}")
    print(f"\nGoal: measured total within {TOLERANCE:.0%} of the model on both ranks:")
    for stage, hit in sorted(ok.items()):
        print(f"  stage {stage}: {'met' if hit else 'MISSED'}")
    print(f"\n({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
