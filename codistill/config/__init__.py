"""Typed, frozen configuration of a codistill run (`schema`) and how job files become one (`parse`).

This package imports neither torch, ray nor mlflow; names are checked against the owning
registries when a config is constructed.
"""

from codistill.config.parse import (
    apply_overrides,
    build,
    bundled_jobs,
    default_job_path,
    flatten,
    from_dict,
    job_path,
    load_job,
    read_yaml,
    to_dict,
)
from codistill.config.schema import (
    MAX_STEPS,
    AdapterConfig,
    DataConfig,
    ExchangeConfig,
    LossConfig,
    OptimConfig,
    OutputConfig,
    PeerConfig,
    ResourcesConfig,
    RunConfig,
    TermConfig,
    TrackingConfig,
    check,
)

__all__ = [
    "MAX_STEPS",
    "AdapterConfig",
    "DataConfig",
    "ExchangeConfig",
    "LossConfig",
    "OptimConfig",
    "OutputConfig",
    "PeerConfig",
    "ResourcesConfig",
    "RunConfig",
    "TermConfig",
    "TrackingConfig",
    "apply_overrides",
    "build",
    "bundled_jobs",
    "job_path",
    "check",
    "default_job_path",
    "flatten",
    "from_dict",
    "load_job",
    "read_yaml",
    "to_dict",
]
