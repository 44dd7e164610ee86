"""Typed, frozen configuration for a codistill run, built from a YAML job file.

A job file is a mapping whose sections mirror the dataclasses below (`data`, `optim`, `peers`,
`loss`, `exchange`, `resources`, `tracking`, `output`). Overrides use dotted keys:

    python -m codistill.run --config jobs/quickstart.yaml --set loss.alpha=0 --set peers.1.model=cnn

Every unknown key or bad value raises ValueError naming the dotted field, the value and what is
allowed, before anything trains. This module imports neither ray nor mlflow.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "DataConfig", "OptimConfig", "PeerConfig", "LossConfig", "ExchangeConfig", "ResourcesConfig",
    "TrackingConfig", "OutputConfig", "RunConfig", "load_job", "apply_overrides", "from_dict",
    "to_dict", "flatten", "default_job_path",
]


def _check(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{path}: got {value!r}; allowed: {allowed}")


@dataclass(kw_only=True, frozen=True, slots=True)
class DataConfig:
    name: str = "digits"
    """Dataset registry key (codistill.data.DATASETS): digits, mnist, fashion_mnist, cifar10,
    cifar100, parquet, synthetic."""
    root: str = "~/.cache/codistill/data"
    """Where torchvision datasets live (or are downloaded to)."""
    download: bool = False
    """Let torchvision download missing files (needs internet)."""
    train: str | None = None
    """parquet only: path of the training Parquet file (Hugging Face image layout)."""
    test: str | None = None
    """parquet only: path of the test Parquet file."""
    batch_size: int = 64
    """Per-peer training batch size (in `logits` mode every peer draws the same batch)."""
    eval_batch_size: int = 1000
    shard: Literal["same", "disjoint"] = "same"
    """`disjoint`: each peer trains on its own part of the training set (Anil et al.); checkpoint mode only."""
    augment: bool | None = None
    """Training augmentation; None = the dataset's default (random crop + flip for CIFAR)."""
    limit_train: int | None = None
    """Use only the first N training examples (quick experiments)."""
    limit_test: int | None = None
    synthetic_train: int = 2048
    """synthetic only: number of training examples."""
    synthetic_shape: tuple[int, ...] = (1, 8, 8)
    """synthetic only: image shape (C, H, W)."""
    synthetic_classes: int = 10

    def validate(self, path: str) -> None:
        _check(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, "an integer >= 1")
        _check(self.eval_batch_size >= 1, f"{path}.eval_batch_size", self.eval_batch_size, "an integer >= 1")
        for key in ("limit_train", "limit_test"):
            v = getattr(self, key)
            _check(v is None or v >= 1, f"{path}.{key}", v, "null or an integer >= 1")
        _check(len(self.synthetic_shape) == 3 and all(d >= 1 for d in self.synthetic_shape),
               f"{path}.synthetic_shape", self.synthetic_shape, "three positive integers [C, H, W]")
        _check(self.synthetic_classes >= 2, f"{path}.synthetic_classes", self.synthetic_classes, "an integer >= 2")
        if self.name == "parquet":
            _check(self.train is not None and self.test is not None, f"{path}.train", self.train,
                   "paths of both data.train and data.test Parquet files when data.name is parquet")


@dataclass(kw_only=True, frozen=True, slots=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    """step schedule: fractions of the run at which lr is multiplied by `gamma`."""
    gamma: float = 0.1
    warmup_steps: int = 0

    def validate(self, path: str) -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), f"{path}.lr", self.lr, "a finite number > 0")
        _check(0 <= self.momentum < 1, f"{path}.momentum", self.momentum, "0 <= momentum < 1")
        _check(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, "a number >= 0")
        _check(all(0 < m < 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
               f"{path}.milestones", self.milestones, "increasing fractions of the run, each in (0, 1)")
        _check(0 < self.gamma <= 1, f"{path}.gamma", self.gamma, "0 < gamma <= 1")
        _check(self.warmup_steps >= 0, f"{path}.warmup_steps", self.warmup_steps, "an integer >= 0")


@dataclass(kw_only=True, frozen=True, slots=True)
class PeerConfig:
    model: str = "mlp"
    """Model registry key (codistill.models.MODELS) or `torchvision:<name>`."""
    name: str | None = None
    """Display name; default `peer<i>-<model>`."""
    seed: int | None = None
    """Initialisation and augmentation seed; default job seed + 1000 * (index + 1)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Job-level `optim` merged with this peer's own `optim` keys."""

    def validate(self, path: str) -> None:
        self.optim.validate(f"{path}.optim")


DIVERGENCES_ALLOWED = ("kl", "reverse_kl", "js", "mse")  # mirrored from losses.DIVERGENCES, checked in tests


@dataclass(kw_only=True, frozen=True, slots=True)
class LossConfig:
    divergence: str = "kl"
    """kl (forward, Hinton/DML), reverse_kl (MiniLLM), js, mse (on logits)."""
    temperature: float = 3.0
    alpha: float = 0.5
    """loss = (1 - alpha) * CE + alpha * D_teachers; alpha = 0 is independent training."""
    burn_in: int = 0
    """Steps of plain cross-entropy before distillation starts."""
    teacher_reduce: Literal["each", "probs", "logits"] = "each"
    zscore: bool = False
    """Standardise logits before the divergence (Sun et al., CVPR 2024)."""

    def validate(self, path: str) -> None:
        _check(self.divergence in DIVERGENCES_ALLOWED, f"{path}.divergence", self.divergence,
               " | ".join(DIVERGENCES_ALLOWED))
        _check(self.temperature > 0 and math.isfinite(self.temperature), f"{path}.temperature",
               self.temperature, "a finite number > 0")
        _check(0 <= self.alpha <= 1, f"{path}.alpha", self.alpha, "a number in [0, 1]")
        _check(self.burn_in >= 0, f"{path}.burn_in", self.burn_in, "an integer >= 0")


@dataclass(kw_only=True, frozen=True, slots=True)
class ExchangeConfig:
    mode: Literal["logits", "checkpoint"] = "logits"
    """logits: DML, logit shards per step; checkpoint: Anil, weights every `period` steps."""
    topology: Literal["all", "ring"] = "all"
    staleness: int = 0
    """logits: how many steps a peer may run ahead of the slowest before it waits."""
    period: int = 50
    """checkpoint: publish weights every `period` steps."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Wire precision of published logits and weights."""
    sync: bool = False
    """checkpoint: wait at each multiple of `period` for the teachers' checkpoint of that step
    (a deterministic publish schedule); false = Anil's free-running pulls that never wait."""
    timeout_s: float = 300.0
    """How long a peer waits for a teacher's shard (or, with sync, checkpoint) before the step fails."""
    inline_max_bytes: int = 32768
    """Ray, logits: a shard up to this size travels by value through the board (one RPC per pull, as
    Ray itself inlines small objects); larger ones are `ray.put` and only their reference is passed.
    0 = always by reference."""

    def validate(self, path: str) -> None:
        _check(self.staleness >= 0, f"{path}.staleness", self.staleness, "an integer >= 0")
        _check(0 <= self.inline_max_bytes <= 1 << 20, f"{path}.inline_max_bytes", self.inline_max_bytes,
               "an integer in [0, 1048576]")
        _check(self.period >= 1, f"{path}.period", self.period, "an integer >= 1")
        _check(self.timeout_s > 0, f"{path}.timeout_s", self.timeout_s, "a number > 0")


@dataclass(kw_only=True, frozen=True, slots=True)
class ResourcesConfig:
    num_cpus: float = 1.0
    """CPUs reserved per peer actor."""
    num_gpus: float = 0.0
    """GPUs per peer actor; fractions let several peers share one GPU (no memory isolation)."""
    placement: Literal["pack", "spread"] = "pack"
    max_restarts: int = 3
    """How often a dead peer actor is restarted (it resumes from its own last checkpoint)."""
    threads_per_peer: int | None = None
    """torch intra-op threads per peer; default = num_cpus (at least 1)."""

    def validate(self, path: str) -> None:
        _check(self.num_cpus >= 0, f"{path}.num_cpus", self.num_cpus, "a number >= 0")
        _check(self.num_gpus >= 0 and (self.num_gpus <= 1 or self.num_gpus == int(self.num_gpus)),
               f"{path}.num_gpus", self.num_gpus, "a fraction in [0, 1] or a whole number of GPUs")
        _check(self.max_restarts >= 0, f"{path}.max_restarts", self.max_restarts, "an integer >= 0")


@dataclass(kw_only=True, frozen=True, slots=True)
class TrackingConfig:
    backend: Literal["mlflow", "none"] = "mlflow"
    uri: str | None = None
    """MLflow tracking URI; default MLFLOW_TRACKING_URI or MLflow's own default (sqlite:///mlflow.db)."""
    experiment: str | None = None
    """MLflow experiment; default the job name."""


@dataclass(kw_only=True, frozen=True, slots=True)
class OutputConfig:
    dir: str | None = None
    """Run directory (local path or pyarrow.fs URI); default runs/<name>-<timestamp>."""
    checkpoint_every: int = 0
    """Ray engine: peers write their own training checkpoint every N steps (0 = at the end of every round)."""

    def validate(self, path: str) -> None:
        _check(self.checkpoint_every >= 0, f"{path}.checkpoint_every", self.checkpoint_every, "an integer >= 0")


@dataclass(kw_only=True, frozen=True, slots=True)
class RunConfig:
    name: str = "codistill"
    seed: int = 0
    """Job seed: the shared batch order in logits mode; default peer seeds derive from it."""
    steps: int | None = None
    """Training steps per peer (give steps or epochs)."""
    epochs: float | None = None
    """Training length in passes over a peer's training data; converted to steps."""
    eval_every: int = 100
    """Steps per round: peers are evaluated on the test set after each round."""
    engine: Literal["local", "ray"] = "ray"
    """ray: one actor per peer (RayEngine); local: all peers in this process (debugging, reference)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    """bf16 autocast (and channels_last for conv nets) on CUDA; ignored on CPU."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Defaults for every peer's optimiser; a peer's own `optim` keys override them."""
    peers: tuple[PeerConfig, ...] = (PeerConfig(model="mlp"), PeerConfig(model="cnn"))
    loss: LossConfig = field(default_factory=LossConfig)
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def num_peers(self) -> int:
        return len(self.peers)

    def peer_name(self, index: int) -> str:
        p = self.peers[index]
        return p.name or f"peer{index}-{p.model.replace(':', '_')}"

    def peer_seed(self, index: int) -> int:
        p = self.peers[index]
        return p.seed if p.seed is not None else self.seed + 1000 * (index + 1)

    def validate(self) -> "RunConfig":
        _check((self.steps is None) != (self.epochs is None), "steps", self.steps,
               "exactly one of `steps` or `epochs`")
        _check(self.steps is None or self.steps >= 1, "steps", self.steps, "an integer >= 1")
        _check(self.epochs is None or self.epochs > 0, "epochs", self.epochs, "a number > 0")
        _check(self.eval_every >= 1, "eval_every", self.eval_every, "an integer >= 1")
        _check(len(self.peers) >= 1, "peers", list(self.peers), "a list of at least one peer")
        names = [self.peer_name(i) for i in range(self.num_peers)]
        _check(len(set(names)) == len(names), "peers", names, "distinct peer names")
        for section in ("data", "optim", "loss", "exchange", "resources", "output"):
            getattr(self, section).validate(section)
        for i, p in enumerate(self.peers):
            p.validate(f"peers.{i}")
        if self.data.shard == "disjoint":
            _check(self.exchange.mode == "checkpoint", "data.shard", self.data.shard,
                   "`same` in logits mode (every peer must see the batch its teachers saw); "
                   "`disjoint` needs exchange.mode=checkpoint")
        return self


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass, with errors that name the dotted field


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
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value (or a --set string) to `tp`, or raise ValueError naming `path`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ValueError:
                continue
        raise ValueError(f"{path}: got {value!r}; allowed: {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        if isinstance(value, str):  # --set gives strings; YAML may give bool for on/off-like words
            for a in allowed:
                if str(a) == value:
                    return a
        raise ValueError(f"{path}: got {value!r}; allowed: {_type_name(tp)}")
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}: got {value!r}; allowed: {_type_name(tp)}")
        return tuple(_coerce(v, item_tp, f"{path}.{i}") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise ValueError(f"{path}: got {value!r}; allowed: true/false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{path}: got {value!r}; allowed: an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer() and math.isfinite(f):
                    return int(f)
            except ValueError:
                pass
        raise ValueError(f"{path}: got {value!r}; allowed: an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{path}: got {value!r}; allowed: a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{path}: got {value!r}; allowed: a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{path}: got {value!r}; allowed: a string")
    raise AssertionError(f"unsupported config type {tp} at {path}")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def from_dict(cls: type, raw: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys; nested sections recurse."""
    where = path or "job"
    if cls is TrackingConfig and isinstance(raw, str):  # `tracking: none` shorthand
        raw = {"backend": raw}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: got {raw!r}; allowed: a mapping of {', '.join(_fields(cls))}")
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in known:
            raise ValueError(f"{sub}: unknown key; allowed keys in {where}: {', '.join(known)}")
        kwargs[key] = _coerce(value, hints[key], sub)
    return cls(**kwargs)


def _peers_from_raw(raw: dict) -> dict:
    """Merge job-level `optim` into each peer's `optim` (a peer's own keys win)."""
    raw = copy.deepcopy(raw)
    job_optim = raw.get("optim") or {}
    if not isinstance(job_optim, dict):
        raise ValueError(f"optim: got {job_optim!r}; allowed: a mapping of {', '.join(_fields(OptimConfig))}")
    peers = raw.get("peers")
    if peers is None:
        peers = [{"model": "mlp"}, {"model": "cnn"}]
    if not isinstance(peers, list) or not peers:
        raise ValueError(f"peers: got {peers!r}; allowed: a list of peer mappings (at least one)")
    merged = []
    for i, p in enumerate(peers):
        if isinstance(p, str):  # `- resnet20` shorthand
            p = {"model": p}
        if not isinstance(p, dict):
            raise ValueError(f"peers.{i}: got {p!r}; allowed: a mapping of {', '.join(_fields(PeerConfig))}")
        own = p.get("optim") or {}
        if not isinstance(own, dict):
            raise ValueError(f"peers.{i}.optim: got {own!r}; allowed: a mapping of {', '.join(_fields(OptimConfig))}")
        merged.append({**p, "optim": {**job_optim, **own}})
    raw["peers"] = merged
    return raw


def build(raw: dict) -> RunConfig:
    """A validated RunConfig from a raw job mapping (as read from YAML, overrides applied)."""
    if not isinstance(raw, dict):
        raise ValueError(f"job: got {raw!r}; allowed: a mapping of {', '.join(_fields(RunConfig))}")
    if "steps" not in raw and "epochs" not in raw:
        raw = {**raw, "steps": 500}
    return from_dict(RunConfig, _peers_from_raw(raw)).validate()


def _set_dotted(raw: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"{here}: no such peer index; allowed: 0..{len(node) - 1}")
            if isinstance(node[int(part)], str):
                node[int(part)] = {"model": node[int(part)]}
            node = node[int(part)]
        else:
            if part == "peers" and part not in node:
                node[part] = [{"model": "mlp"}, {"model": "cnn"}]
            if part == "tracking" and isinstance(node.get(part), str):
                node[part] = {"backend": node[part]}
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ValueError(f"{here}: is a value, not a section; cannot set {dotted}")
    last = parts[-1]
    if isinstance(node, list):
        raise ValueError(f"{dotted}: set a peer's field, e.g. peers.0.model=cnn")
    # YAML parsing turns "[1, 2]", "null", "3e-4" into values; plain strings stay strings.
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    node[last] = parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a raw job mapping (a copy is returned)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. loss.alpha=0")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), value.strip())
    return raw


def default_job_path() -> Path:
    """The quickstart job: `jobs/` beside the package in a checkout, or the installed copy
    (`codistill.jobs`, mapped from the same folder by pyproject.toml)."""
    checkout = Path(__file__).resolve().parent.parent / "jobs" / "quickstart.yaml"
    if checkout.exists():
        return checkout
    import importlib.resources

    return Path(str(importlib.resources.files("codistill.jobs") / "quickstart.yaml"))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--config: file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a job file must be a mapping at the top level")
    return raw


def load_job(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw = read_yaml(path or default_job_path())
    return build(apply_overrides(raw, overrides or []))


def to_dict(cfg: Any) -> Any:
    """A plain (YAML/JSON-ready) mapping of a config; tuples become lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'loss': {'alpha': 0.5}} -> {'loss.alpha': 0.5}; peers become peers.0.model etc."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        items = d.items()
    elif isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        items = ((str(i), v) for i, v in enumerate(d))
    else:
        return {prefix: d}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
