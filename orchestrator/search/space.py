"""The job's ``search`` section in Ray Tune's vocabulary: param space, searcher, scheduler,
trial names, and the trial jobs built from sampled values."""

from __future__ import annotations

import math
import re
from typing import Any

from orchestrator.config.overrides import apply_overrides
from orchestrator.config.search import SearchConfig, layer_key, trial_overrides
from orchestrator.config.space_check import allocation_job, per_layer_stage, stage_configs
from orchestrator.errors import ConfigError, Problem


def param_space(search: SearchConfig, layers: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Flat ``{dotted key: tune distribution}``; labelled choices are sampled as their labels
    (Optuna's categorical values must be plain scalars), resolved in the trial. A per-layer key
    becomes one dimension per layer of ``layers[key]`` (``per_layer_targets``), named by
    ``layer_key``."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, dist in search.space.items():
        kind, value = dist.kind, getattr(dist, dist.kind)
        if kind == "uniform":
            domain = tune.uniform(*value)
        elif kind == "loguniform":
            domain = tune.loguniform(*value)
        elif kind == "int":
            domain = tune.randint(value[0], value[1] + 1)  # randint's upper end is exclusive
        elif kind == "choice" and search.algorithm == "grid":
            domain = tune.grid_search(list(value))
        elif kind == "choice":
            domain = tune.choice(list(value))
        else:
            domain = tune.grid_search(list(value))
        if not dist.per_layer:
            out[key] = domain
            continue
        names = (layers or {}).get(key)
        if not names:
            raise ValueError(f"{key} is searched per layer and no layers were given for it")
        for name in names:
            out[layer_key(key, name)] = domain
    return out


def per_layer_targets(
    job: dict[str, Any], search: SearchConfig, model: Any
) -> dict[str, list[str]]:
    """The layers each per-layer key of ``search`` has a dimension for: the Linear layers its
    technique targets in ``model`` (the dense model, whose layer names every trial starts
    from), under the first of the space's combinations that applies that technique."""
    from torch import nn

    from orchestrator.compress.technique import technique_for

    out: dict[str, list[str]] = {}
    for key, (cfg, _) in stage_configs(job, search).items():
        modules = technique_for(cfg).select(model, cfg)
        out[key] = [n for n, m in modules if isinstance(m, nn.Linear)]
        if not out[key]:
            raise ConfigError(
                Problem(
                    f"search.space.{key}.per_layer",
                    True,
                    f"compress.{per_layer_stage(key)} targets no Linear layer of the model",
                    f"widen compress.{per_layer_stage(key)}.include, or remove per_layer",
                )
            )
    return out


def flat_point(
    search: SearchConfig, values: dict[str, Any], layers: dict[str, list[str]]
) -> dict[str, Any]:
    """The searcher's point for ``values`` by space key: a per-layer key's one value given to
    each of its layers' dimensions (``layer_key``)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if search.space[key].per_layer:
            flat.update({layer_key(key, n): value for n in layers[key]})
        else:
            flat[key] = value
    return flat


def starting_points(search: SearchConfig, layers: dict[str, list[str]]) -> list[dict[str, Any]]:
    """``search.points`` as the searcher's whole points (``flat_point``)."""
    return [flat_point(search, point, layers) for point in search.points]


def allocation_points(
    job: dict[str, Any],
    search: SearchConfig,
    layers: dict[str, list[str]],
    bundle: Any,
    tokenizer: Any,
) -> list[dict[str, Any]]:
    """The searcher's starting points of each per-layer key with ``allocations``: for each
    budget, the per-layer allocation ``compress.<stage>.allocate`` makes over the key's
    choice values, of the stage alone on ``job``'s model (the trials' dense model, with their
    data and calibration). A point gives every dimension (Tune's Optuna searcher takes only
    whole ones): the key's layers their allocated values, the space's other keys the values
    of the combination the stage's config comes from (``stage_configs``: a range at its low
    end, another per-layer key one value for all its layers). One sensitivity profile per
    key (cached by content), one joint check per budget."""
    from orchestrator import finalize
    from orchestrator.config.loader import validate_job

    points: list[dict[str, Any]] = []
    configs = stage_configs(job, search)
    for key, dist in search.space.items():
        if not dist.per_layer or not dist.allocations:
            continue
        values = list(dist.choice)
        stage_cfg, sampled = configs[key]
        rest = flat_point(search, sampled, layers)
        for budget in dist.allocations:
            raw = allocation_job(job, key, values, stage_cfg, budget)
            spec = validate_job(raw, source=f"search.space.{key}.allocations")
            calib = finalize.calibration_batches(spec, bundle)
            _, report = finalize.build_compressed(spec, bundle, tokenizer, calib)
            choice = report.steps[-1].entry["allocation"]["choice"]
            # The choice's own values (an allocation's are floats); a layer the allocation
            # does not cover (one that cannot be quantized) keeps the combination's value.
            exact = {float(v): v for v in values}
            allocated = {
                layer_key(key, n): exact[float(choice[n])] for n in layers[key] if n in choice
            }
            points.append({**rest, **allocated})
    return points


def searcher(
    search: SearchConfig, max_concurrent: int = 1, points: list[dict[str, Any]] | None = None
) -> Any:
    """Optuna (TPE, GP or NSGA-II, one or several objectives) or Tune's own random/grid
    generator, trying ``points`` (whole configs: ``starting_points``, ``allocation_points``)
    first. Metrics and modes go to the searcher only: also setting them in ``TuneConfig``
    silently makes an Optuna study single-objective (checked on Ray 2.60)."""
    if search.algorithm != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores TuneConfig.max_concurrent_trials for this generator: it takes its own.
        return BasicVariantGenerator(
            random_state=search.seed,
            max_concurrent=max_concurrent,
            points_to_evaluate=points or None,
        )
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # TPE's and GP's start-up phase is random; on a small budget keep it to a third of the trials.
    startup = max(2, min(10, search.samples // 3))
    if search.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=search.seed)
    elif search.sampler == "gp":
        # Trials still running count as pending points of its batch acquisition function, so
        # parallel trials are not proposed on top of each other (optuna >= 4.9).
        sampler = optuna.samplers.GPSampler(seed=search.seed, n_startup_trials=startup)
    else:
        sampler = optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=startup)
    metrics = [o.metric for o in search.objectives]
    modes = [o.mode for o in search.objectives]
    first = {"points_to_evaluate": points} if points else {}
    if len(metrics) == 1:
        return OptunaSearch(metric=metrics[0], mode=modes[0], sampler=sampler, **first)
    return OptunaSearch(metric=metrics, mode=modes, sampler=sampler, **first)


# Tune's own counter restarts at 1 after a restore: schedulers use our step counter.
STEP_METRIC = "train/step"


def scheduler(search: SearchConfig, total_steps: int, eval_every: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if search.scheduler == "none":
        return FIFOScheduler()
    objective = search.objectives[0]
    return ASHAScheduler(
        time_attr=STEP_METRIC,
        metric=objective.metric,
        mode=objective.mode,
        max_t=max(total_steps, eval_every + 1),
        grace_period=max(1, eval_every),
        reduction_factor=2,
    )


def required_metrics(search: SearchConfig) -> list[str]:
    """Keys a result forwarded to Tune must hold (Tune rejects results without them)."""
    keys = [o.metric for o in search.objectives]
    if search.scheduler == "asha":
        keys.append(STEP_METRIC)
    return keys


def _short(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.3g}"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-") or "x"


def trial_name(index: int, sampled: dict[str, Any]) -> str:
    """``t003_sparsity0.42_quantize-int8``: the trial's ordinal and its recipe (names derive from
    the config, never from timestamps: resume finds trials by name); per-layer values by their
    mean (``bits-mean3.4``)."""
    parts = [f"t{index:03d}"]
    for key, value in sampled.items():
        if isinstance(value, dict):
            mean = sum(value.values()) / max(len(value), 1)
            parts.append(f"{key.rsplit('.', 1)[-1]}-mean{_short(mean)}")
            continue
        parts.append(
            f"{key.rsplit('.', 1)[-1]}{'' if isinstance(value, float | int) else '-'}"
            f"{_short(value)}"
        )
    return "_".join(parts)[:100]


def trial_job(
    base: dict[str, Any], search: SearchConfig, sampled: dict[str, Any], name: str, trials_dir: str
) -> dict[str, Any]:
    """The raw job of one trial: the base job with the sampled overrides, named after the trial,
    writing under ``trials/``, without the search section (a trial is one training run)."""
    raw = apply_overrides(base, trial_overrides(search.space, sampled))
    raw.pop("search", None)
    raw["name"] = name
    raw["output"] = {**raw.get("output", {}), "dir": trials_dir}
    return raw


def num_trials(search: SearchConfig) -> int:
    """Trials the search will run: a grid's size times its repeats, else ``num_samples``."""
    grid = [len(d.candidates()) for d in search.space.values() if d.kind == "grid"]
    if search.algorithm == "grid":
        grid = [len(d.candidates()) for d in search.space.values()]
    return search.samples * math.prod(grid)


def concurrency(
    search: SearchConfig, cluster: dict[str, float], need_cpu: float, need_gpu: float
) -> int:
    """Trials that fit side by side: a Train run starts only when all its workers fit at once,
    so more concurrent trials than that would only wait (or starve each other)."""
    fits = [math.floor(cluster.get("CPU", 0) / need_cpu + 1e-9)] if need_cpu else []
    if need_gpu:
        fits.append(math.floor(cluster.get("GPU", 0) / need_gpu + 1e-9))
    n = max(1, min(fits) if fits else 1)
    if search.max_concurrent_trials:
        n = min(n, search.max_concurrent_trials)
    return n
