"""Whether a job may run code that is not installed on this machine.

A job file is data: reading one must not run code. Two kinds of job field could: a Hugging Face model
directory or hub id whose `config.json` names its own Python classes (`auto_map`, loaded by transformers
with `trust_remote_code`), and a registry name written as an import path (`mypkg.nets:tiny_cnn`), which
imports that module when the job is validated. Both run only with an opt-in a person gives where they
start the run, never from the YAML alone:

    python -m codistill.run --trust-remote-code ...     # or
    CODISTILL_TRUST_REMOTE_CODE=1 python -m codistill.run ...

An import path into an *installed* package (the standard library, site-packages, or any installed
distribution, editable ones included) needs no opt-in: whoever installed it already chose to run it;
a module found anywhere else on `sys.path` (the working directory, a Ray job's working_dir, PYTHONPATH)
does. The opt-in travels to Ray workers as an environment variable (`runtime_env`). This module imports
nothing of codistill but `errors`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import site
import sys
import sysconfig
from pathlib import Path
from typing import Any

__all__ = [
    "TRUST_ENV",
    "add_trust_flag",
    "allow_remote_code",
    "installed_module",
    "remote_code_allowed",
    "require_remote_code",
    "runtime_env_vars",
]

TRUST_ENV = "CODISTILL_TRUST_REMOTE_CODE"
OPT_IN = f"--trust-remote-code (or {TRUST_ENV}=1)"
"""How a person allows it, as error messages say."""


def add_trust_flag(parser: Any) -> None:
    """`--trust-remote-code` on a command line (an argparse parser)."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the job run code that is not installed here: a Hugging Face model's own Python files "
        f"(with its model_args.trust_remote_code) and modules named as package.module:attribute (or {TRUST_ENV}=1)",
    )


def remote_code_allowed() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def allow_remote_code() -> None:
    """The command line's `--trust-remote-code`: this process and what it starts (subprocesses, and Ray
    workers through `runtime_env_vars`) may run code a job names."""
    os.environ[TRUST_ENV] = "1"


def runtime_env_vars() -> dict[str, str]:
    """What a Ray `runtime_env` must carry so that workers decide as this process does."""
    return {TRUST_ENV: "1"} if remote_code_allowed() else {}


def require_remote_code(what: str) -> None:
    """ValueError (one line) unless remote code is allowed; `what` says what would run."""
    if not remote_code_allowed():
        raise ValueError(f"{what}: a job file cannot run code by itself; allow it with {OPT_IN}")


@functools.cache
def _installed_roots() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    roots = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    roots += [*site.getsitepackages(), site.getusersitepackages()]
    return tuple(Path(r).resolve() for r in roots if r)


@functools.cache
def _distribution_packages() -> frozenset[str]:
    """Top-level names provided by installed distributions (editable installs with top_level.txt included)."""
    from importlib.metadata import packages_distributions

    return frozenset(packages_distributions())


def _origin(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin in (None, "built-in", "frozen"):
        locations = list(spec.submodule_search_locations or [])
        return Path(locations[0]).resolve() if locations else None
    return Path(spec.origin).resolve()


def installed_module(module: str) -> bool:
    """Whether importing `module` runs only code installed on this machine (or already imported here)."""
    if module in sys.modules:
        return True
    top = module.partition(".")[0]
    if top in sys.builtin_module_names or top in _distribution_packages():
        return True
    origin = _origin(top)
    if origin is None:
        return top in sys.modules
    return any(origin.is_relative_to(root) for root in _installed_roots())
