"""Job files and overrides -> RunConfig, with errors that name the dotted field.

    python -m codistill.run --config jobs/quickstart.yaml --set loss.alpha=0 --set peers.1.model=cnn

A job file is a mapping whose sections mirror `codistill.config.schema`. `--set a.b=value` parses
the value as YAML (`[1, 2]`, `null`, `3e-4`) and coerces it to the field's type. An unknown key, a
value of the wrong type or a bad value raises `ConfigError` naming the dotted field (`peers.1.optim.lr`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from codistill.config.overrides import apply, default_raw_peers, parse_set
from codistill.config.schema import OptimConfig, PeerConfig, RunConfig, TrackingConfig
from codistill.errors import ConfigError

__all__ = [
    "apply_overrides",
    "build",
    "bundled_jobs",
    "job_path",
    "default_job_path",
    "flatten",
    "from_dict",
    "load_job",
    "read_yaml",
    "to_dict",
]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _bad(path: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(path, value, _type_name(tp))


def _coerce_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        words = ("true", "false", "yes", "no", "on", "off", "1", "0")
        if isinstance(value, str) and value.strip().lower() in words:
            return value.strip().lower() in ("true", "yes", "on", "1")
    elif tp is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        try:
            f = float(value) if isinstance(value, (float, str)) else math.nan
        except ValueError:
            f = math.nan
        if math.isfinite(f) and f.is_integer():
            return int(f)
    elif tp is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise AssertionError(f"unsupported config type {tp} at {path}")
    raise _bad(path, value, tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value (or a --set string) to `tp`, or raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(typing.cast(type, tp), value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        nullable = type(None) in args
        if nullable and (value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~"))):
            return None
        inner_errors: list[ConfigError] = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                inner_errors.append(e)
        deeper = [e for e in inner_errors if e.field != path]  # an error inside a section says more
        raise deeper[0] if deeper else _bad(path, value, tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        if isinstance(value, str):  # --set gives strings; YAML may give bool for on/off-like words
            for a in allowed:
                if str(a) == value:
                    return a
        raise _bad(path, value, tp)
    if origin is dict:  # free-form keyword arguments (model_args): YAML scalars, lists and mappings as given
        if isinstance(value, str) and value.strip().startswith("{"):
            value = yaml.safe_load(value)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(path, value, "a mapping of names to values")
        return dict(value)
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _bad(path, value, tp)
        return tuple(_coerce(v, item_tp, f"{path}.{i}") for i, v in enumerate(value))
    return _coerce_scalar(value, tp, path)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def from_dict(cls: type, raw: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys; nested sections recurse, and an
    error found by a section's own validation is reported under `path`."""
    where = path or "job"
    if cls is TrackingConfig and isinstance(raw, str):  # `tracking: none` shorthand
        raw = {"backend": raw}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(where, raw, f"a mapping of {', '.join(_fields(cls))}")
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in known:
            raise ConfigError(sub, message=f"unknown key; allowed keys in {where}: {', '.join(known)}")
        kwargs[key] = _coerce(value, hints[key], sub)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.relocated(getattr(cls, "SECTION", ""), path) from None


def _peers_from_raw(raw: dict) -> dict:
    """Merge job-level `optim` into each peer's `optim` (a peer's own keys win)."""
    raw = copy.deepcopy(raw)
    job_optim = raw.get("optim") or {}
    if not isinstance(job_optim, dict):
        raise ConfigError("optim", job_optim, f"a mapping of {', '.join(_fields(OptimConfig))}")
    peers = raw.get("peers")
    if peers is None:
        peers = default_raw_peers()
    if not isinstance(peers, list) or not peers:
        raise ConfigError("peers", peers, "a list of peer mappings (at least one)")
    merged = []
    for i, p in enumerate(peers):
        if isinstance(p, str):  # `- resnet20` shorthand
            p = {"model": p}
        if not isinstance(p, dict):
            raise ConfigError(f"peers.{i}", p, f"a mapping of {', '.join(_fields(PeerConfig))}")
        own = p.get("optim") or {}
        if not isinstance(own, dict):
            raise ConfigError(f"peers.{i}.optim", own, f"a mapping of {', '.join(_fields(OptimConfig))}")
        merged.append({**p, "optim": {**job_optim, **own}})
    raw["peers"] = merged
    return raw


def build(raw: Any) -> RunConfig:
    """A validated RunConfig from a raw job mapping (as read from YAML, overrides applied)."""
    if not isinstance(raw, dict):
        raise ConfigError("job", raw, f"a mapping of {', '.join(_fields(RunConfig))}")
    return typing.cast(RunConfig, from_dict(RunConfig, _peers_from_raw(raw)))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides (--set) to a raw job mapping (a copy is returned; config/overrides.py)."""
    return apply(raw, parse_set(overrides))


def _jobs_dir() -> Path:
    """`jobs/` beside the package in a checkout, or the installed copy (`codistill.jobs`, mapped
    from the same folder by pyproject.toml)."""
    checkout = Path(__file__).resolve().parents[2] / "jobs"
    if (checkout / "quickstart.yaml").exists():
        return checkout
    import importlib.resources

    return Path(str(importlib.resources.files("codistill.jobs")))


def bundled_jobs() -> list[str]:
    return sorted(p.stem for p in _jobs_dir().glob("*.yaml"))


def default_job_path() -> Path:
    """The quickstart job."""
    return _jobs_dir() / "quickstart.yaml"


def job_path(name: str | Path | None) -> Path:
    """A job file's path, or the bundled job of that name (`--config quickstart`); None = the quickstart."""
    if name is None:
        return default_job_path()
    if not Path(name).exists() and str(name) in bundled_jobs():
        return _jobs_dir() / f"{name}.yaml"
    return Path(name)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError("--config", message=f"file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError("--config", message=f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError("--config", message=f"{path}: a job file must be a mapping at the top level")
    return raw


def load_job(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw = read_yaml(path or default_job_path())
    return build(apply_overrides(raw, overrides or []))


def to_dict(cfg: Any) -> Any:
    """A plain (YAML/JSON-ready) mapping of a config; tuples become lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'loss': {'alpha': 0.5}} -> {'loss.alpha': 0.5}; peers become peers.0.model etc."""
    out: dict[str, Any] = {}
    items: Any
    if isinstance(d, dict):
        items = d.items()
    elif isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        items = ((str(i), v) for i, v in enumerate(d))
    else:
        return {prefix: d}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
