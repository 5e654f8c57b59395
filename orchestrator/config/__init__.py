"""The job spec (pydantic models) and how it is loaded, overridden and saved."""

from orchestrator.config.loader import EXCLUSIVE, dump_job, load_job, read_yaml, validate_job
from orchestrator.config.overrides import apply_overrides, parse_override
from orchestrator.config.schema import (
    DataConfig,
    JobSpec,
    ModelConfig,
    OutputConfig,
    ResourcesConfig,
    TrainConfig,
)

__all__ = [
    "EXCLUSIVE",
    "DataConfig",
    "JobSpec",
    "ModelConfig",
    "OutputConfig",
    "ResourcesConfig",
    "TrainConfig",
    "apply_overrides",
    "dump_job",
    "load_job",
    "parse_override",
    "read_yaml",
    "validate_job",
]
