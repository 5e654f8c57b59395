"""Ray Train: one ``TorchTrainer`` run of ``train.num_workers`` workers for a job.

The driver validates everything it can before Ray starts (bad input exits 2 with nothing
written), resolves paths to absolute ones (Train workers change their working directory),
then runs ``train_fn_per_worker`` on every worker and writes the run directory
(docs/contracts.md, "Run directory").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from orchestrator import data as data_lib
from orchestrator import loop, models
from orchestrator.config.loader import dump_job
from orchestrator.config.schema import JobSpec
from orchestrator.errors import ConfigError, Problem, RunError
from orchestrator.files import copy_dir_atomic, write_atomic
from orchestrator.storage import (
    RunFolder,
    StorageError,
    copy_within,
    is_uri,
    join,
    kind,
    resolve,
    unreachable,
)

HEALTH_CHECK_ENV, HEALTH_CHECK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # train.start_timeout_s
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def train_fn_per_worker(config: dict[str, Any]) -> dict[str, float]:
    """Runs on every Ray Train worker: rebuild the job from its dict and run the loop."""
    import ray.train
    import ray.train.torch

    _quiet_train_reports()
    spec = JobSpec.model_validate(config["job"])
    context = ray.train.get_context()

    def report(metrics: dict[str, float], folder: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as restore:
        ctx = loop.WorkerContext(
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
            report=report,
            restore_dir=Path(restore) if restore else None,
            # The device Ray Train assigned this worker (its GPU, fractional or one of several
            # per worker; the CPU without GPUs), not one derived from the local rank.
            device=ray.train.torch.get_device(),
            local_world_size=context.get_local_world_size(),
        )
        return loop.run(spec, ctx)


def _quiet_train_reports() -> None:
    """Ray Train 2.60 logs every ``report`` with its whole metrics dict at INFO, per rank,
    through a logger named after its source file (``getLogger(__file__)``), which escapes
    ``LoggingConfig``; the loop prints its own progress lines, so raise that logger alone."""
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(
            os.path.join("ray", "train", "v2", "_internal", "execution", "context.py")
        ):
            logging.getLogger(name).setLevel(logging.WARNING)


def resolve_paths(spec: JobSpec) -> JobSpec:
    """Absolute local paths, so workers (other working directories, other nodes) find them."""

    def absolute(p: str | None) -> str | None:
        if p is None or is_uri(p):
            return p  # a storage URI names the same place on every node already
        return str(Path(p).expanduser().resolve())

    return spec.model_copy(
        update={
            "model": spec.model.model_copy(
                update={
                    "path": absolute(spec.model.path),
                    "tokenizer_path": absolute(spec.model.tokenizer_path),
                }
            ),
            "data": spec.data.model_copy(
                update={
                    "path": absolute(spec.data.path),
                    "cache_dir": absolute(spec.data.cache_dir),
                }
            ),
            "output": spec.output.model_copy(update={"dir": absolute(spec.output.dir)}),
        }
    )


def run_dir(spec: JobSpec) -> RunFolder:
    """``<output.dir>/<name>``: a folder, or a place in storage when ``output.dir`` is a URI."""
    return RunFolder(join(spec.output.dir, spec.name))


def check_task(spec: JobSpec) -> None:
    """Keys that do not fit the job's task (``models.task_of``: a decoder is trained as a
    causal language model, anything else as a classifier), refused before anything runs."""
    if models.task_of(spec.model) != models.CAUSAL_LM:
        problems = _search_task_problems(spec, language_model=False)
        quantize = spec.compress.quantize
        # A named classifier is known to have no pre-norm decoder blocks; a folder's model is
        # checked when it is compressed.
        if quantize is not None and quantize.activation_scaling and spec.model.name is not None:
            problems.append(
                Problem(
                    "compress.quantize.activation_scaling",
                    True,
                    f"{spec.model.name} has no Llama-style decoder blocks, whose norms and "
                    "projections the scales are folded into",
                    "remove compress.quantize.activation_scaling",
                )
            )
        if problems:
            raise ConfigError(problems)
        return
    model = spec.model.name or spec.model.path
    problems = _search_task_problems(spec, language_model=True)
    # Against the default, not the keys set: a search's baseline and trials re-validate the
    # whole job dumped with its defaults.
    if spec.data.label_column != type(spec.data).model_fields["label_column"].default:
        problems.append(
            Problem(
                "data.label_column",
                spec.data.label_column,
                f"{model} is a language model: it learns the text itself and reads no labels",
                "remove data.label_column (data.text_column names the text)",
            )
        )
    if spec.compress.vocab is not None:
        problems.append(
            Problem(
                "compress.vocab",
                spec.compress.vocab.method,
                "a language model predicts every token of its vocabulary: trimming it would "
                "remove outputs it is scored on",
                "remove compress.vocab",
            )
        )
    if spec.measure.backend == "onnxruntime":
        problems.append(
            Problem(
                "measure.backend",
                "onnxruntime",
                "the ONNX export covers classifiers; a language model is timed in torch",
                "use measure.backend=torch",
            )
        )
    folder = models.model_dir(spec.model)
    context = None
    if folder is not None:
        config = json.loads((folder / "config.json").read_text())
        context = config.get("max_position_embeddings")
    elif spec.model.name in models.TINY_SHAPES:
        context = models.TINY_CONTEXT
    if context is not None and spec.data.max_length > context:
        problems.append(
            Problem(
                "data.max_length",
                spec.data.max_length,
                f"blocks of {spec.data.max_length} tokens are longer than {model}'s context "
                f"({context} positions)",
                f"set data.max_length to at most {context}",
            )
        )
    if problems:
        raise ConfigError(problems)


def _search_task_problems(spec: JobSpec, language_model: bool) -> list[Problem]:
    """A search's objectives, selection and constraints must score the job's kind of model: a
    classifier's accuracy, or a language model's perplexity."""
    from orchestrator.config.search import CLASSIFIER_ONLY, LANGUAGE_MODEL_ONLY

    search = spec.search
    if search is None:
        return []
    model = spec.model.name or spec.model.path
    kind = "a language model" if language_model else "a classifier"
    foreign = CLASSIFIER_ONLY if language_model else LANGUAGE_MODEL_ONLY
    example = "eval/perplexity_ratio" if language_model else "eval/accuracy"
    problems = []
    named = [(f"search.objectives[{i}].metric", o.metric) for i, o in enumerate(search.objectives)]
    if search.select is not None:
        named.append(("search.select.metric", search.select.metric))
    default = "" if "objectives" in search.model_fields_set else " (the default objective)"
    for key, metric in named:
        if metric in foreign:
            problems.append(
                Problem(
                    key,
                    metric,
                    f"{model} is {kind}, which does not report {metric}{default}",
                    f"set search.objectives with a metric {kind} reports, e.g. "
                    f"[{{metric: {example}, mode: {'min' if language_model else 'max'}}}]",
                )
            )
            default = ""
    c = search.constraints
    wrong = (
        ("max_accuracy_drop", c.max_accuracy_drop)
        if language_model
        else ("max_perplexity_increase", c.max_perplexity_increase)
    )
    if wrong[1] is not None:
        right = "max_perplexity_increase" if language_model else "max_accuracy_drop"
        problems.append(
            Problem(
                f"search.constraints.{wrong[0]}",
                wrong[1],
                f"{model} is {kind}: {wrong[0]} bounds the other kind of model",
                f"use search.constraints.{right}",
            )
        )
    if language_model and not problems and not search.scores_perplexity:
        problems.append(
            Problem(
                "search.objectives",
                ", ".join(o.metric for o in search.objectives),
                f"{model} is a language model and the search scores none of its perplexity",
                "add {metric: eval/perplexity_ratio, mode: min} to search.objectives, or set "
                "search.constraints.max_perplexity_increase (e.g. 0.15)",
            )
        )
    return problems


def preflight(spec: JobSpec) -> tuple[Any, data_lib.DataBundle]:
    """Load tokenizer and data on the driver: a missing file or column fails here with exit 2,
    before any Ray process starts, and the workers then read the warm tokenization cache."""
    tokenizer = models.build_tokenizer(spec.model)
    models.model_dir(spec.model)
    check_task(spec)
    if spec.measure.backend == "onnxruntime":
        from orchestrator.compress.onnx_export import require_runtime

        require_runtime("measure.backend", "onnxruntime")
        if tokenizer is None:
            raise ConfigError(
                Problem(
                    "measure.backend",
                    "onnxruntime",
                    "the ONNX export takes token models (input_ids, attention_mask); this model "
                    "reads pixels",
                    "use measure.backend=torch",
                )
            )
    bundle = data_lib.build(spec.data, tokenizer, models.task_of(spec.model))
    t = spec.train
    if bundle.batches_per_epoch(t.batch_size, t.num_workers) < t.grad_accum_steps:
        raise ConfigError(
            Problem(
                "train.batch_size",
                t.batch_size,
                f"one optimizer step takes {t.batch_size} x {t.grad_accum_steps} "
                f"(grad_accum_steps) x {t.num_workers} (num_workers) examples, more than the "
                f"{bundle.sizes['train']} training examples",
                "lower train.batch_size, train.grad_accum_steps or train.num_workers, or use more "
                "data (data.limit)",
            )
        )
    model = models.build_model(spec.model, bundle.num_labels, tokenizer)
    if spec.compress.enabled:
        from orchestrator.compress import check_patterns

        check_patterns(model, spec.compress)
    # A checkpoint holds the fp32 weights and AdamW's two moments: 12 bytes per parameter.
    check_output_dir(spec, 12 * sum(p.numel() for p in model.parameters()))
    return tokenizer, bundle


def check_output_dir(spec: JobSpec, need_bytes: int) -> None:
    """``output.dir`` must be a writable folder (or creatable in one) with room for at least one
    checkpoint: checked before Ray starts, so a read-only or full disk fails in a second naming
    the path, not minutes later inside a worker. Nothing is created here."""
    fix = "point output.dir at a writable folder with free space"
    if is_uri(spec.output.dir):
        try:
            what = kind(spec.output.dir)
        except StorageError as e:
            raise unreachable("output.dir", spec.output.dir, e) from None
        if what == "file":
            raise ConfigError(
                Problem("output.dir", spec.output.dir, "is a file, not a folder", fix)
            )
        if not spec.output.dir.startswith("file://"):
            return  # object stores: writes are checked when they happen
        existing = Path(resolve(spec.output.dir)[1])
    else:
        existing = Path(spec.output.dir)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            Problem("output.dir", spec.output.dir, f"{existing} is a file, not a folder", fix)
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            Problem(
                "output.dir",
                spec.output.dir,
                f"{existing} is not writable (read-only file system or no permission)",
                fix,
            )
        )
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise ConfigError(
            Problem(
                "output.dir",
                spec.output.dir,
                f"the disk holding {existing} has {free / 2**20:.1f} MiB free; one checkpoint "
                f"of this model takes about {need_bytes / 2**20:.0f} MiB",
                f"free space there, or {fix}",
            )
        )


def full_disk(error: BaseException, folder: Path | RunFolder) -> RunError | None:
    """A run that failed because a disk filled up (Ray wraps the worker's OSError in its own
    error types, so the message is searched) as one clear error naming the run directory."""
    text = str(error)
    if "No space left on device" not in text and "Disk quota exceeded" not in text:
        return None
    return RunError(
        f"the disk is full: a write under {folder} (or the workers' temporary folder) failed "
        "with 'No space left on device'. Free space there or point output.dir at a larger "
        "disk, then run the same command again to resume from the last checkpoint"
    )


def claim_run_dir(spec: JobSpec) -> bool:
    """Create the run directory with the resolved job. Returns True when an earlier run of the
    identical job is there (it resumes); a different job under the same name is an error."""
    folder = run_dir(spec)
    text = dump_job(spec)
    try:
        folder.pull("job.yaml")
    except StorageError as e:
        raise unreachable("output.dir", spec.output.dir, e) from None
    saved = folder.local / "job.yaml"
    if saved.is_file():
        if saved.read_text() == text:
            return True
        raise ConfigError(
            Problem(
                "name",
                spec.name,
                f"{folder} already holds a run of a different job",
                f"choose another name (name={spec.name}-2), or delete {folder} to start over",
            )
        )
    try:
        folder.write_text("job.yaml", text)
    except OSError as e:
        raise ConfigError(
            Problem(
                "output.dir",
                spec.output.dir,
                f"cannot create {folder}: {e.strerror or e}",
                "point output.dir at a writable folder",
            )
        ) from None
    return False


def connect_ray(spec: JobSpec, address: str | None = None) -> None:
    """Join a cluster (``--address``, ``resources.address`` or ``RAY_ADDRESS``) or start an
    embedded local Ray. An address where nothing answers fails in seconds (Ray itself would
    retry for minutes), and so does a cluster that refuses this client's token."""
    import ray

    if ray.is_initialized():
        return
    key, address = next(
        (
            (k, a)
            for k, a in (
                ("--address", address),
                ("resources.address", spec.resources.address),
                ("RAY_ADDRESS", os.environ.get("RAY_ADDRESS")),
            )
            if a
        ),
        ("", None),
    )
    if address and address != "local":
        _check_reachable(key, address)
    try:
        if address:
            context = ray.init(address=address, log_to_driver=True)
        else:
            _warn_other_instances()
            embedded_defaults()
            context = ray.init(
                address="local",
                num_cpus=spec.resources.num_cpus or os.cpu_count(),
                log_to_driver=True,
            )
    except ray.exceptions.AuthenticationError as e:
        raise ConfigError(
            Problem(
                key,
                address,
                f"the Ray cluster there refused this client's token ({str(e).splitlines()[0]})",
                "give the client the cluster's token: copy it (`ray get-auth-token` on the head) "
                "to ~/.ray/auth_token, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH",
            )
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        hint = ""
        if address and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = (
                ". If the cluster uses token authentication (Ray's default), export "
                "RAY_AUTH_MODE=token and give this client the cluster's token "
                "(~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
            )
        raise RunError(
            f"could not connect to Ray at {address or 'a new local instance'}: {e}{hint}"
        ) from e
    dashboard = getattr(context, "dashboard_url", None)
    if dashboard:
        url = dashboard if "://" in dashboard else f"http://{dashboard}"
        print(f"[orchestrator] Ray dashboard: {url}", flush=True)


def embedded_defaults() -> None:
    """Settings for a Ray this process starts on its own machine, set before it starts: its
    processes (the search's trial processes among them) inherit them, and Ray passes them from
    the process that calls ``fit()`` to the Train controller. A user's own value wins.

    No preemption watcher: it watches for a cloud taking a node back, which a local instance
    has no way to see, and it is one more process per Train run (its cost is measured in
    benchmarks/BENCHMARKS.md, "One helper fewer"). On a cluster Ray's default (on) stays."""
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


def _check_reachable(key: str, address: str, timeout_s: float = 5.0) -> None:
    """Open a TCP connection to the address's GCS (or Ray client) port before ``ray.init``,
    which retries an unreachable address for minutes before giving up."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    fix = (
        "start Ray there (`ray start --head`, or `bash cluster/local_head.sh start`), correct the "
        "address, or leave RAY_ADDRESS / --address / resources.address unset for an embedded "
        "local Ray"
    )
    target = address.split("://", 1)[1] if "://" in address else address
    try:
        hostport = canonicalize_bootstrap_address(target) if target == "auto" else target
        if hostport is None:
            raise ConnectionError("no running Ray cluster was found on this machine")
        host, _, port = hostport.rpartition(":")
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except ValueError:
        raise ConfigError(
            Problem(key, address, "is not a Ray address", "use host:port, e.g. 10.0.0.5:6379")
        ) from None
    except (OSError, ConnectionError) as e:
        raise ConfigError(Problem(key, address, f"nothing answers there ({e})", fix)) from None


def _warn_other_instances() -> None:
    """Ray Train frees the worker reservation of a run stopped from outside (a trial that early
    stopping ends) through a helper that finds "the" Ray instance of this machine; with a second
    instance running it finds two, gives up, and later runs wait for CPUs that never free up."""
    try:
        from ray._private.services import find_gcs_addresses  # Ray's own lookup, as the helper

        others = sorted(find_gcs_addresses())
    except Exception:  # a private helper: never let it stop a run
        return
    if others:
        print(
            f"[orchestrator] warning: Ray already runs on this machine ({', '.join(others)}); "
            "starting a second, embedded one. Early-stopped trials can then leave their workers' "
            f"CPUs reserved. To share the running one: RAY_ADDRESS={others[0]}",
            flush=True,
        )


def cluster_capacity() -> dict[str, float]:
    """The most of each resource the cluster can offer: what its nodes have now or, on an
    autoscaling cluster (``ray up``, KubeRay), what its node types add up to at their maximum
    counts (the autoscaler publishes that; Ray Train checks its worker groups the same way)."""
    import ray

    total = dict(ray.cluster_resources())
    try:
        from ray._private.state import state  # where Ray Train reads it (worker_group.py)

        ceiling = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # a private helper: without it the nodes present are the limit
        ceiling = {}
    for key, value in ceiling.items():
        total[key] = max(total.get(key, 0.0), float(value))
    return total


def check_capacity(spec: JobSpec) -> None:
    """A run whose workers can never be placed would wait forever: say so before scheduling."""
    total = cluster_capacity()
    need_cpu = spec.train.num_workers * spec.resources.cpus_per_worker
    need_gpu = spec.train.num_workers * spec.resources.gpus_per_worker
    problems = []
    if need_cpu > total.get("CPU", 0):
        problems.append(
            Problem(
                "train.num_workers",
                spec.train.num_workers,
                f"needs {need_cpu:g} CPUs (x resources.cpus_per_worker="
                f"{spec.resources.cpus_per_worker:g}) but the cluster has at most "
                f"{total.get('CPU', 0):g}",
                "lower train.num_workers or resources.cpus_per_worker, or add nodes",
            )
        )
    if need_gpu > total.get("GPU", 0):
        problems.append(
            Problem(
                "resources.gpus_per_worker",
                spec.resources.gpus_per_worker,
                f"needs {need_gpu:g} GPUs but the cluster has at most {total.get('GPU', 0):g}",
                "set resources.gpus_per_worker=0 to train on CPUs, or add GPU nodes",
            )
        )
    if problems:
        raise ConfigError(problems)


def train(spec: JobSpec, address: str | None = None) -> dict[str, float]:
    """``orchestrator train``: one Ray Train run; returns the final metrics."""
    spec = resolve_paths(spec)
    _, bundle = preflight(spec)
    connect_ray(spec, address)
    check_capacity(spec)
    resumed = claim_run_dir(spec)
    folder = run_dir(spec)
    print(
        f"[orchestrator] {'resuming' if resumed else 'starting'} run {folder} | "
        f"{spec.train.num_workers} x {spec.train.strategy}"
        f"{f' ZeRO-{spec.train.zero_stage}' if spec.train.strategy == 'deepspeed' else ''} "
        f"{spec.train.precision} | data {bundle.sizes} | labels {bundle.label_names}",
        flush=True,
    )
    try:
        result = build_trainer(spec, folder).fit()
    except Exception as e:  # Ray wraps worker errors in several types
        raise full_disk(e, folder) or RunError(f"training failed: {train_failure(e, spec)}") from e
    return collect_result(result, folder)


def train_failure(error: BaseException, spec: JobSpec) -> str:
    """Why a Train run failed, in words where the cause is the cluster's, else Ray's text."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    cause = error.controller_failure if isinstance(error, ControllerError) else None
    if isinstance(cause, WorkerGroupStartupTimeoutError):
        t, res = spec.train, spec.resources
        timeout = os.environ.get(START_TIMEOUT_ENV, "60")
        tries = t.max_start_failures + 1
        return (
            f"the cluster did not have the resources for {t.num_workers} workers x "
            f"{res.cpus_per_worker:g} CPU / {res.gpus_per_worker:g} GPU within the start "
            f"timeout ({timeout} s), {tries} time{'s' if tries != 1 else ''} "
            f"(train.max_start_failures="
            f"{t.max_start_failures}): a node lost and not back, or a cluster too small. Fix: "
            "bring the node back or add nodes, lower train.num_workers, or set "
            "train.max_start_failures=-1 to wait for nodes"
        )
    return str(error)


def build_trainer(spec: JobSpec, folder: RunFolder, callbacks: list | None = None) -> Any:
    """The ``TorchTrainer`` for one run of ``spec`` whose Train storage is ``folder``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    # Ray Train's controller polls its workers every 2 s by default, so it notices a finished
    # run up to that late, every run (benchmarks/BENCHMARKS.md, per-trial overhead). Ray passes
    # this variable from the process that calls fit() to the controller. A user's own setting
    # wins.
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_S)
    if spec.train.start_timeout_s is not None:  # passed on to the controller the same way
        os.environ[START_TIMEOUT_ENV] = f"{spec.train.start_timeout_s:g}"
    res = spec.resources
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"job": spec.model_dump(mode="json")},
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.train.num_workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            # A fixed name under the run directory: starting the same job again resumes it.
            name="train",
            # A URI too: Ray Train then writes the checkpoints straight to that storage.
            storage_path=folder.location,
            # Worker losses, and separately (Ray's own budget, unlimited) losses to a
            # preempted node; a worker group that cannot get its resources in time counts
            # against max_start_failures.
            failure_config=ray.train.FailureConfig(
                max_failures=spec.train.max_failures,
                controller_failure_limit=spec.train.max_start_failures,
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
            # Ray Train logs every report with its whole metrics dict, per rank, at INFO; the
            # loop prints its own progress lines. Ray's system log files still get everything.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def collect_result(result: Any, folder: RunFolder) -> dict[str, float]:
    """Copy the final checkpoint's model (and compression report) into ``folder`` and write
    ``metrics.json`` last (its presence says the run's model is complete); returns the final
    metrics. In storage the copy goes from the checkpoint to the run folder directly. A copy
    that fails (a full disk, say) is a ``RunError`` naming the folder, for ``train`` and for a
    search's trials alike."""
    try:
        return _collect_result(result, folder)
    except OSError as e:
        raise full_disk(e, folder) or RunError(
            f"the run finished, but its model could not be copied from its checkpoint into "
            f"{folder}: {e}; run the same command again"
        ) from e


def _collect_result(result: Any, folder: RunFolder) -> dict[str, float]:
    if result.checkpoint is None or not result.metrics:
        raise RunError("training finished without a final checkpoint; see the worker logs above")
    metrics = {
        k: float(v)
        for k, v in result.metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)  # not the FINAL_REPORT flag
    }
    ckpt = result.checkpoint
    if folder.remote:
        copy_within(ckpt.filesystem, f"{ckpt.path}/model", folder.uri("model"))
        report = f"{ckpt.path}/compress_report.json"
        if ckpt.filesystem.get_file_info(report).is_file:
            copy_within(ckpt.filesystem, report, folder.uri("compress_report.json"))
    else:
        with ckpt.as_directory() as local:
            copy_dir_atomic(Path(local) / "model", folder.local / "model")
            report = Path(local) / "compress_report.json"
            if report.is_file():
                write_atomic(folder.local / "compress_report.json", report.read_text())
    metrics_out = {"checkpoint": ckpt.path, **metrics}
    folder.write_text("metrics.json", json.dumps(metrics_out, indent=2, sort_keys=True))
    return metrics
