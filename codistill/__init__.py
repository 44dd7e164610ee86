"""codistill: distributed online co-distillation (Deep Mutual Learning, Anil-style codistillation) on Ray.

    import codistill
    cfg = codistill.load_job(overrides=["steps=60", "engine=local", "tracking=none"])
    summary = codistill.train(cfg, "runs/demo")

The public API is loaded on first use, so `import codistill.config` stays light (no torch, ray or mlflow).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "RunConfig": "codistill.config",
    "load_job": "codistill.config",
    "train": "codistill.api",
    "LocalEngine": "codistill.engine",
    "RayEngine": "codistill.engine",
    "CodistillError": "codistill.errors",
    "ConfigError": "codistill.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from codistill.api import train as train
    from codistill.config import RunConfig as RunConfig
    from codistill.config import load_job as load_job
    from codistill.engine import LocalEngine as LocalEngine
    from codistill.engine import RayEngine as RayEngine
    from codistill.errors import CodistillError as CodistillError
    from codistill.errors import ConfigError as ConfigError


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'codistill' has no attribute {name!r}")
