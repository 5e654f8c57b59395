"""The job spec: one typed, frozen config tree (pydantic v2, unknown keys rejected).

Every field's description says its unit and range. Cross-field checks live in the lowest model
that owns the fields and report the exact dotted key through ``cross_field_error``.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from orchestrator.config.base import ConfigModel, cross_field_error
from orchestrator.config.compress import CompressConfig
from orchestrator.config.search import SearchConfig, confirm_seeds_problem
from orchestrator.storage import check_uri, is_uri


def _storage_location(value: str | None) -> str | None:
    """A plain path as is; a storage URI only in a form this tool can open."""
    why = check_uri(value) if value is not None and is_uri(value) else None
    if why:
        raise ValueError(
            f"is not a usable storage URI: {why}. Use e.g. s3://bucket/folder, "
            "file:///shared/folder or a plain path"
        )
    return value


# Short names of models that ship with the project's dependencies (no download ever happens).
PACKAGED_MODELS = ("minilm-l6", "smollm2-135m")
# Small from-config architectures, for fast tests and debug jobs.
CONFIG_MODELS = ("tiny-bert", "tiny-gpt2", "tiny-llama", "mlp")
# Short names of decoders trained as causal language models (the rest are classifiers).
CAUSAL_LM_MODELS = ("smollm2-135m", "tiny-llama")
# Pretrained language models: their own outputs are a teacher worth distilling from.
PRETRAINED_DECODERS = ("smollm2-135m",)


class ModelConfig(ConfigModel):
    """Which network to fine-tune and compress: a packaged one, a local folder, or a tiny config."""

    # One of these is set; giving the other on the command line replaces it.
    exclusive: ClassVar[tuple[str, ...]] = ("name", "path")

    name: str | None = Field(
        default=None,
        description=f"short name: packaged pretrained {PACKAGED_MODELS} or from-config "
        f"{CONFIG_MODELS}; {CAUSAL_LM_MODELS} are decoders trained as causal language models "
        "(the task follows from the model), the rest classifiers; exclusive with model.path",
    )
    path: str | None = Field(
        default=None,
        description="folder in Hugging Face format (config.json, weights, tokenizer): a local "
        "path, or a storage URI (s3://, gs://, file://) fetched once per node into the cache; "
        "or a local .gguf file of a decoder (converted once into the cache). A model whose "
        "config.json names a *ForCausalLM architecture (and every .gguf) is trained as a causal "
        "language model, any other as a classifier; exclusive with model.name",
    )
    tokenizer_path: str | None = Field(
        default=None,
        description="local tokenizer folder; default: the model's own folder (from-config "
        "models use the packaged MiniLM WordPiece tokenizer)",
    )
    num_layers: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="keep only the first N transformer blocks (>= 1); default all",
    )

    @field_validator("path")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return _storage_location(value)

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name is None) == (self.path is None):
            raise cross_field_error(
                [
                    (
                        "name",
                        self.name,
                        "exactly one of model.name and model.path must be set",
                        f"set model.name to one of {PACKAGED_MODELS + CONFIG_MODELS} "
                        "or model.path to a local Hugging Face folder",
                    )
                ]
            )
        known = PACKAGED_MODELS + CONFIG_MODELS
        if self.name is not None and self.name not in known:
            hub = "/" in self.name
            why = (
                "looks like a Hugging Face hub id; this tool never downloads"
                if hub
                else "is not a known short name"
            )
            raise cross_field_error(
                [
                    (
                        "name",
                        self.name,
                        why,
                        f"use one of {known}, or download the model elsewhere (e.g. "
                        "`huggingface-cli download ...`) and set model.path to that local folder",
                    )
                ]
            )
        return self


PACKAGED_CORPORA = ("mr", "sms_spam", "trec", "bbc_news", "rotten_tomatoes", "mnist")


class DataConfig(ConfigModel):
    """Labelled text: a packaged corpus by name, or local CSV / JSON lines / Parquet files."""

    # One of these is set; giving the other on the command line replaces it.
    exclusive: ClassVar[tuple[str, ...]] = ("name", "path")

    name: str | None = Field(
        default=None,
        description=f"packaged corpus: one of {PACKAGED_CORPORA}; exclusive with data.path",
    )
    path: str | None = Field(
        default=None,
        description="a .csv/.tsv/.jsonl/.json/.parquet file (split by the tool), or a folder "
        "holding train.* and test.* (and optionally validation.*) files; exclusive with data.name",
    )
    format: Literal["csv", "tsv", "json", "parquet"] | None = Field(
        default=None, description="file format; default: from the file suffix"
    )
    text_column: str = Field(default="text", description="column holding the input text")
    label_column: str = Field(
        default="label", description="column holding the label (strings or integers)"
    )
    max_length: int = Field(default=64, ge=8, le=4096, description="tokens per example, 8-4096")
    limit: Annotated[int, Field(ge=10)] | None = Field(
        default=None,
        description="use at most this many examples in total (seeded subset, >= 10); default all",
    )
    val_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=0.5,
        description="fraction held out for validation (evaluation during training and the "
        "search's selection), (0, 0.5)",
    )
    test_fraction: float = Field(
        default=0.2, gt=0.0, lt=0.5, description="fraction held out for test, (0, 0.5)"
    )
    seed: int = Field(default=0, ge=0, description="seed of the split and the subset")
    cache_dir: str | None = Field(
        default=None,
        description="where tokenized splits are cached; default ~/.cache/orchestrator/data",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.name is None) == (self.path is None):
            raise cross_field_error(
                [
                    (
                        "name",
                        self.name,
                        "exactly one of data.name and data.path must be set",
                        f"set data.name to one of {PACKAGED_CORPORA} or data.path to a local file",
                    )
                ]
            )
        if self.name is not None and self.name not in PACKAGED_CORPORA:
            raise cross_field_error(
                [
                    (
                        "name",
                        self.name,
                        "is not a packaged corpus",
                        f"use one of {PACKAGED_CORPORA} or point data.path at a local file",
                    )
                ]
            )
        return self


class DistillConfig(ConfigModel):
    """Knowledge distillation during recovery: the dense model (in a search, the dense
    baseline) is a frozen teacher on every worker."""

    alpha: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="weight of the distillation loss; the task loss gets 1 - alpha, [0, 1]",
    )
    temperature: float = Field(
        default=2.0, gt=0.0, le=100.0, description="softmax temperature of both models, > 0"
    )
    hidden: float = Field(
        default=0.0,
        ge=0.0,
        description="weight of matching the student's block outputs to the teacher's (mean "
        "squared error over real tokens; blocks keep their width under head / FFN pruning and "
        "factorization); 0 turns it off",
    )
    teacher_precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="the frozen teacher's weights: fp32, or bf16 (half its memory; on a CPU "
        "with native bf16 (AVX512-BF16 / AMX) its forward takes about half of fp32's time, its "
        "outputs within about 1 % of fp32's; a device without native bf16 emulates it and may "
        "be slower, which the run logs)",
    )


class TrainConfig(ConfigModel):
    """Distributed fine-tuning: strategy, precision, optimisation and the loop's cadence."""

    strategy: Literal["ddp", "deepspeed"] = Field(
        default="ddp", description="ddp (torch DDP) or deepspeed (ZeRO stages 0-3)"
    )
    zero_stage: int = Field(
        default=0, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3 (deepspeed only)"
    )
    offload_optimizer: bool = Field(
        default=False,
        description="keep optimizer state in CPU memory (deepspeed, zero_stage 2 or 3)",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="fp32, bf16 (autocast / DeepSpeed bf16) or fp16 (GPU only)"
    )
    num_workers: int = Field(default=2, ge=1, le=1024, description="training processes, >= 1")
    batch_size: int = Field(default=16, ge=1, description="micro-batch per worker, >= 1")
    grad_accum_steps: int = Field(
        default=1, ge=1, description="micro-batches accumulated per optimizer step, >= 1"
    )
    epochs: float = Field(default=1.0, gt=0, description="passes over the training split, > 0")
    max_steps: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="optimizer steps; caps epochs when set (>= 1)"
    )
    optimizer: Literal["adamw", "sgd"] = Field(default="adamw", description="adamw or sgd")
    lr: float = Field(default=5e-5, gt=0, le=10, description="peak learning rate, (0, 10]")
    weight_decay: float = Field(default=0.01, ge=0, lt=1, description="decoupled, [0, 1)")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd momentum, [0, 1)")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="decay after warm-up: linear, cosine or constant"
    )
    warmup_ratio: float = Field(
        default=0.1, ge=0, lt=1, description="fraction of steps spent warming up, [0, 1)"
    )
    max_grad_norm: float = Field(
        default=1.0, ge=0, description="gradient clipping norm; 0 disables"
    )
    seed: int = Field(default=0, ge=0, description="seed of init, data order and dropout")
    log_every: int = Field(default=10, ge=1, description="print a progress line every N steps")
    eval_every: int = Field(
        default=0, ge=0, description="evaluate on validation every N steps; 0: only at the end"
    )
    checkpoint_every: int = Field(
        default=0, ge=0, description="checkpoint every N steps; 0: only at the end"
    )
    max_failures: int = Field(
        default=0,
        ge=-1,
        description="worker-group restarts allowed (-1: unlimited); a worker lost with a "
        "preempted node restarts without counting",
    )
    max_start_failures: int = Field(
        default=-1,
        ge=-1,
        description="times the worker group may fail to get its resources within the start "
        "timeout before the run fails, e.g. a lost node that does not come back; -1: wait for "
        "ever, as on a cluster whose autoscaler replaces nodes",
    )
    start_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="seconds each start of the worker group may wait for its resources "
        "(Ray Train's start timeout); unset: Ray's own, 60 s",
    )
    distill: DistillConfig | None = Field(
        default=None,
        description="distil from the dense model while recovering a compressed one "
        "(alpha, temperature, hidden); unset: plain fine-tuning",
    )

    @model_validator(mode="after")
    def _strategy_knobs(self) -> TrainConfig:
        problems = []
        if self.strategy == "ddp" and self.zero_stage != 0:
            problems.append(
                (
                    "zero_stage",
                    self.zero_stage,
                    "ZeRO stages need train.strategy=deepspeed",
                    "set train.strategy=deepspeed, or train.zero_stage=0 for DDP",
                )
            )
        if self.offload_optimizer and (self.strategy != "deepspeed" or self.zero_stage < 2):
            problems.append(
                (
                    "offload_optimizer",
                    True,
                    "optimizer offload needs train.strategy=deepspeed with zero_stage 2 or 3",
                    "set train.zero_stage=2 (or 3) with train.strategy=deepspeed, "
                    "or train.offload_optimizer=false",
                )
            )
        if problems:
            raise cross_field_error(problems)
        return self


class ResourcesConfig(ConfigModel):
    """What each worker gets and how big an embedded local Ray is."""

    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs per training worker, > 0")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs per worker; 0: CPU only")
    num_cpus: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="CPUs of an embedded local Ray; default: this machine's count",
    )
    address: str | None = Field(
        default=None,
        description="Ray cluster address to join; default: RAY_ADDRESS, else an embedded Ray",
    )


class MeasureConfig(ConfigModel):
    """How the artifact's latency is measured (side by side with the dense model)."""

    threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description="torch intra-op threads while timing, as the model will be deployed with; "
        ">= 1 (perf/threads records it)",
    )
    backend: Literal["torch", "onnxruntime"] = Field(
        default="torch",
        description="the runtime the latency is measured in, for the dense and the compressed "
        "model alike: torch (eager, the artifact as loaded) or onnxruntime (both exported to "
        "ONNX, as `orchestrator export --format onnx` writes them; needs the onnx extra)",
    )


class OutputConfig(ConfigModel):
    dir: str = Field(
        default="runs",
        description="root of run directories; a run writes <dir>/<name>/. On more than one "
        "node: a storage URI every node reaches (file:///shared/runs on a shared file system, "
        "s3://bucket/runs, gs://bucket/runs), or a shared file system path mounted at the same "
        "place on every node",
    )

    @field_validator("dir")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _storage_location(value)


class MlflowConfig(ConfigModel):
    """Where ``orchestrator search`` logs its runs in MLflow (``orchestrator.search.tracking``)."""

    tracking_uri: str = Field(
        min_length=1,
        description="the MLflow tracking server or store: http(s)://host:port of a server "
        "(`mlflow server ...`), or a store URI such as sqlite:///mlflow.db; reached from the "
        "search driver only, checked before the search starts. Credentials come from MLflow's "
        "own environment variables (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME / _PASSWORD)",
    )
    experiment: str | None = Field(
        default=None,
        min_length=1,
        description="MLflow experiment the search's runs go to (created when missing); "
        "default: the job's name",
    )
    log_model: bool = Field(
        default=True,
        description="also log the selected model's files (as `orchestrator export --best` "
        "writes them) as artifacts of the search's run",
    )


class TrackingConfig(ConfigModel):
    """Experiment trackers a search logs to, besides its run directory (which holds everything,
    and TensorBoard event files under tune/)."""

    mlflow: MlflowConfig | None = Field(
        default=None,
        description="log the search to MLflow: one run for the search (the job, the dense "
        "model's and the selected recipe's figures, the Pareto table, report, plot and "
        "selected model) with a child run per trial (its recipe, metrics and compress report)",
    )


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class JobSpec(ConfigModel):
    """A whole job. The resolved form is saved with every run and checkpoint."""

    name: str = Field(description="run name: letters, digits, . _ -; names the run directory")
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    compress: CompressConfig = CompressConfig()
    resources: ResourcesConfig = ResourcesConfig()
    measure: MeasureConfig = MeasureConfig()
    output: OutputConfig = OutputConfig()
    tracking: TrackingConfig = TrackingConfig()
    search: SearchConfig | None = Field(
        default=None, description="Ray Tune search over compression recipes (orchestrator search)"
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise PydanticCustomError(
                "bad_name",
                "must start with a letter or digit and hold only letters, digits, '.', '_', '-' "
                "(at most 100 characters), since it names a folder",
            )
        return v

    @model_validator(mode="after")
    def _cross_section(self) -> JobSpec:
        problems = []
        if self.train.precision == "fp16" and self.resources.gpus_per_worker == 0:
            problems.append(
                (
                    "train.precision",
                    "fp16",
                    "fp16 needs a GPU (CPUs here have no fp16 kernels and no loss-scaled "
                    "fp16 training)",
                    "use train.precision=bf16 (or fp32) on CPU, or set resources.gpus_per_worker=1",
                )
            )
        problems += self._distill_problems()
        problems += self._backend_problems()
        zero3 = self.train.strategy == "deepspeed" and self.train.zero_stage == 3
        for technique in self.compress.techniques():
            if technique.needs_whole_weights and zero3:
                problems.append(
                    (
                        f"compress.{technique.stage}.method",
                        technique.method,
                        "its masks must be re-applied to whole weights after every step, and "
                        "ZeRO-3 keeps only a shard of each weight on a worker",
                        "use train.zero_stage=2 (or 0/1) with it, or "
                        "compress.prune.method=structured",
                    )
                )
        seeds = self.search.confirm_seeds if self.search is not None else []
        if found := confirm_seeds_problem(seeds, self.train.seed):
            why, others = found
            problems.append(
                (
                    "search.confirm_seeds",
                    seeds,
                    why,
                    "list other seeds, each once, e.g. search.confirm_seeds="
                    f"[{', '.join(map(str, others))}]",
                )
            )
        if (
            self.search is not None
            and self.search.scheduler == "asha"
            and self.train.eval_every == 0
        ):
            problems.append(
                (
                    "train.eval_every",
                    0,
                    "search.scheduler=asha compares trials on validation results reported "
                    "during training, and none are",
                    "set train.eval_every to a few steps (e.g. 10)",
                )
            )
        if problems:
            raise cross_field_error(problems)
        return self

    def _backend_problems(self) -> list[tuple[str, object, str, str]]:
        """Latency in ONNX Runtime needs a recipe the ONNX export expresses: int8 kernels or no
        quantization, 8-bit embeddings."""
        if self.measure.backend != "onnxruntime" or self.compress.quantize is None:
            return []
        q = self.compress.quantize
        bits = getattr(q, "embedding_bits", None)
        if q.method == "dynamic_int8" and (bits is None or bits == 8):
            return []
        what = (
            f"compress.quantize.method={q.method}"
            if q.method != "dynamic_int8"
            else f"compress.quantize.embedding_bits={bits}"
        )
        return [
            (
                "measure.backend",
                "onnxruntime",
                f"{what} cannot be exported to ONNX Runtime (low-bit weights), so its latency "
                "cannot be measured there",
                "use measure.backend=torch, or quantize with method dynamic_int8 and 8-bit "
                "embeddings",
            )
        ]

    def _distill_problems(self) -> list[tuple[str, object, str, str]]:
        """Distillation needs a compressed student and a fine-tuned teacher: the dense baseline
        of a search, or a fine-tuned model named by model.path."""
        if self.train.distill is None:
            return []
        if self.search is None and not self.compress.enabled:
            return [
                (
                    "train.distill",
                    self.train.distill.model_dump(),
                    "distils the dense model into a compressed one, and the job compresses nothing",
                    "add a compress section, or remove train.distill",
                )
            ]
        fine_tuned_teacher = (
            self.model.path is not None
            or self.model.name in PRETRAINED_DECODERS
            or (self.search is not None and self.search.baseline.train)
        )
        if not fine_tuned_teacher:
            return [
                (
                    "train.distill",
                    self.train.distill.model_dump(),
                    f"has no fine-tuned model to distil from: model.name={self.model.name} "
                    "has a new, untrained classifier head",
                    "set model.path to a fine-tuned model folder (e.g. runs/<job>/model), or "
                    "distil inside a search whose dense baseline is fine-tuned "
                    "(search.baseline.train: true)",
                )
            ]
        return []
