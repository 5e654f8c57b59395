"""The job's ``search`` section in Ray Tune's vocabulary: param space, searcher, scheduler,
trial names, and the trial jobs built from sampled values."""

from __future__ import annotations

import math
import re
from typing import Any

from orchestrator.config.overrides import apply_overrides
from orchestrator.config.search import PER_LAYER, SearchConfig, layer_key, trial_overrides
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
    from orchestrator.config.compress import CompressConfig
    from orchestrator.config.space_check import combinations

    wanted = {k: PER_LAYER[k].rsplit(".", 2)[1] for k, d in search.space.items() if d.per_layer}
    out: dict[str, list[str]] = {}
    for sampled in combinations(search.space):
        raw = apply_overrides(job, trial_overrides(search.space, sampled))
        compress = CompressConfig.model_validate(raw.get("compress") or {})
        for key, stage in wanted.items():
            cfg = getattr(compress, stage)
            if key in out or cfg is None:
                continue
            cfg = cfg.model_copy(update={"layers": {}})
            modules = technique_for(cfg).select(model, cfg)
            out[key] = [n for n, m in modules if isinstance(m, nn.Linear)]
            if not out[key]:
                raise ConfigError(
                    Problem(
                        f"search.space.{key}.per_layer",
                        True,
                        f"compress.{stage} targets no Linear layer of the model",
                        f"widen compress.{stage}.include, or remove per_layer",
                    )
                )
        if len(out) == len(wanted):
            break
    return out


def searcher(search: SearchConfig, max_concurrent: int = 1) -> Any:
    """Optuna (TPE, GP or NSGA-II, one or several objectives) or Tune's own random/grid
    generator. Metrics and modes go to the searcher only: also setting them in ``TuneConfig``
    silently makes an Optuna study single-objective (checked on Ray 2.60)."""
    if search.algorithm != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores TuneConfig.max_concurrent_trials for this generator: it takes its own.
        return BasicVariantGenerator(random_state=search.seed, max_concurrent=max_concurrent)
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
    if len(metrics) == 1:
        return OptunaSearch(metric=metrics[0], mode=modes[0], sampler=sampler)
    return OptunaSearch(metric=metrics, mode=modes, sampler=sampler)


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
