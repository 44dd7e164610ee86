"""A sweep file: a job plus `search:` (dotted job keys -> a domain) and `tune:` (SweepConfig) sections,
read and checked before any trial starts (codistill.sweeps.tune runs it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from codistill.config import build, check, from_dict, job_path, read_yaml
from codistill.config.overrides import apply, parse_set
from codistill.config.schema import NAME_RULE, is_safe_name
from codistill.errors import ConfigError

__all__ = ["DOMAINS", "SweepConfig", "domain_kind", "load_sweep", "search_domain"]


@dataclass(kw_only=True, frozen=True, slots=True)
class SweepConfig:
    num_samples: int = 4
    """Trials to sample (each grid point is repeated num_samples times, as in Ray Tune)."""
    max_concurrent_trials: int = 2
    metric: Literal[
        "ensemble_accuracy", "ensemble_loss", "mean_peer_accuracy", "mean_peer_loss", "churn", "mean_pairwise_kl"
    ] = "ensemble_accuracy"
    """ensemble_accuracy: classification only; language models: ensemble_loss or mean_peer_loss (mode: min)."""
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["none", "asha", "pbt"] = "none"
    """asha: stop weak trials early; pbt: population-based training (weak trials take a strong trial's state
    from its round checkpoint and go on with mutated values of the searched keys)."""
    grace_period: int = 1
    """asha: rounds every trial runs before it can be stopped."""
    perturbation_interval: int = 2
    """pbt: rounds between two exploit/explore decisions."""
    trial_cpus: float = 0.1
    """CPUs of the trial's own bundle (the trial's driver); peers get one bundle each."""
    name: str | None = None
    """Sweep directory name under storage_path; default: the job name."""
    storage_path: str | None = None
    """Where Tune keeps the sweep; default $CODISTILL_STORAGE/tune (else ~/codistill/tune)."""

    def __post_init__(self) -> None:
        check(self.num_samples >= 1, "tune.num_samples", self.num_samples, "an integer >= 1")
        check(
            self.max_concurrent_trials >= 1, "tune.max_concurrent_trials", self.max_concurrent_trials, "an integer >= 1"
        )
        check(self.grace_period >= 1, "tune.grace_period", self.grace_period, "an integer >= 1")
        check(
            self.perturbation_interval >= 1, "tune.perturbation_interval", self.perturbation_interval, "an integer >= 1"
        )
        check(self.trial_cpus >= 0, "tune.trial_cpus", self.trial_cpus, "a number >= 0")
        check(self.name is None or is_safe_name(self.name), "tune.name", self.name, NAME_RULE)


def _domain(kind: str, args: Any, path: str):
    from ray import tune

    makers = {
        "uniform": lambda a: tune.uniform(float(a[0]), float(a[1])),
        "loguniform": lambda a: tune.loguniform(float(a[0]), float(a[1])),
        "randint": lambda a: tune.randint(int(a[0]), int(a[1])),
        "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
    }
    if kind not in makers:
        raise ConfigError(path, kind, " | ".join(makers))
    if not isinstance(args, list) or not args or (kind in ("uniform", "loguniform", "randint") and len(args) != 2):
        raise ConfigError(f"{path}.{kind}", args, "a list ([low, high] for ranges, values otherwise)")
    if kind == "loguniform" and not (0 < float(args[0]) < float(args[1])):
        raise ConfigError(f"{path}.loguniform", args, "0 < low < high")
    return makers[kind](args)


DOMAINS = ("uniform", "loguniform", "randint", "choice", "grid")


def _spec(spec: dict) -> tuple[str, Any]:
    """(domain kind, its arguments) of a one-key search spec such as {uniform: [0, 1]}."""
    kind, args = next(iter(spec.items()))
    return kind, args


def domain_kind(spec: dict) -> str:
    """`grid`, `uniform`, ... of a checked search spec."""
    return _spec(spec)[0]


def search_domain(key: str, spec: dict) -> Any:
    """The Tune domain of one searched key (its spec checked by load_sweep)."""
    return _domain(*_spec(spec), f"search.{key}")


def _representatives(spec: dict) -> list[Any]:
    kind, args = _spec(spec)
    return [args[0], args[-1]] if kind in ("uniform", "loguniform", "randint") else list(args)


def load_sweep(path: str, overrides: list[str]) -> tuple[dict, dict, SweepConfig]:
    """(base raw job, search spec, sweep settings); every searched key is checked against the job schema.
    `path` is a sweep file or the name of a bundled one."""
    raw = apply(read_yaml(job_path(path)), parse_set(overrides))
    search = raw.pop("search", None) or {}
    settings = from_dict(SweepConfig, raw.pop("tune", None) or {}, "tune")
    if not isinstance(search, dict) or not search:
        raise ConfigError(
            "search", None, "a mapping of dotted job keys to {uniform|loguniform|randint|choice|grid: [...]}"
        )
    build(raw)  # the base job is valid
    search = _flatten_search(search)
    for key, spec in search.items():
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"search.{key}", spec, f"one of {', '.join(DOMAINS)} with a list")
        search_domain(key, spec)
        for value in _representatives(spec):  # unknown keys and impossible values fail before any trial
            try:
                build(apply(raw, {key: value}))
            except ConfigError as e:
                raise ConfigError(f"search.{key}", message=str(e)) from None
    return raw, search, settings


def _flatten_search(search: dict, prefix: str = "") -> dict:
    """`loss.temperature: {...}` and `loss: {temperature: {...}}` (what --set search.loss.x=... makes) alike."""
    flat = {}
    for key, spec in search.items():
        path = f"{prefix}{key}"
        if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAINS:
            flat[path] = spec
        elif isinstance(spec, dict) and spec:
            flat.update(_flatten_search(spec, f"{path}."))
        else:
            raise ConfigError(f"search.{path}", spec, f"one of {', '.join(DOMAINS)} with a list")
    return flat
