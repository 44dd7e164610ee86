"""The dataclasses of a run, validated at construction.

Every class is frozen and keyword-only; `__post_init__` checks each field and raises
`ConfigError` naming the field (relative to the object: `temperature`; the parser that knows the
section prefixes it: `loss.temperature`), the value and what is allowed. Names of models,
datasets, divergences, teacher reductions, exchanges, topologies, optimizers, schedules and
engines are checked against the registries of the modules that own them (imported on first use:
this module imports no torch, ray or mlflow). Each default is written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from codistill.config.checks import (
    MAX_ROUNDS,
    MAX_STEPS,
    NAME_RULE,
    _finite,
    _Section,
    check,
    check_rounds,
    is_safe_name,
)
from codistill.config.run_sections import ExchangeConfig, OutputConfig, ResourcesConfig, TrackingConfig
from codistill.config.sections import AdapterConfig, DataConfig, LossConfig, OptimConfig, PeerConfig, TermConfig
from codistill.errors import ConfigError
from codistill.registry import lookup

__all__ = [
    "MAX_ROUNDS",
    "NAME_RULE",
    "DEFAULT_PEER_MODELS",
    "DEFAULT_STEPS",
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
    "check",
    "check_rounds",
    "is_safe_name",
    "run_config_validations",
]

DEFAULT_PEER_MODELS = ("mlp", "cnn")
"""A job that lists no peers trains one peer of each of these models."""

DEFAULT_STEPS = 500
"""A job that gives neither `steps` nor `epochs` trains this many steps."""

_run_configs_validated = 0


def run_config_validations() -> int:
    """How many RunConfigs this process has validated (constructed): a run validates its job once, in the driver,
    and its peers' processes receive the frozen object (unpickling validates nothing); tests count on it."""
    return _run_configs_validated


@dataclass(kw_only=True, frozen=True, slots=True)
class RunConfig(_Section):
    SECTION: ClassVar[str] = ""
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = (("steps", "epochs"),)
    """Fields of which a job gives at most one: an override of one clears the others (config/overrides.py)."""

    name: str = "codistill"
    seed: int = 0
    """Job seed: the shared batch order in logits mode; default peer seeds derive from it."""
    steps: int | None = None
    """Training steps per peer (give steps or epochs; neither = DEFAULT_STEPS)."""
    epochs: float | None = None
    """Training length in passes over a peer's training data; converted to steps."""
    eval_every: int = 100
    """Steps per round: peers are evaluated on the test set after each round."""
    engine: str = "ray"
    """Engine registry key (codistill.engine.ENGINES): ray (one actor per peer) or local (all peers in
    this process: debugging, the reference)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    """bf16 autocast (and channels_last for conv nets) on CUDA; ignored on CPU."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Defaults for every peer's optimiser; a peer's own `optim` overrides them."""
    peers: tuple[PeerConfig, ...] = field(
        default_factory=lambda: tuple(PeerConfig(model=m) for m in DEFAULT_PEER_MODELS)
    )
    loss: LossConfig = field(default_factory=LossConfig)
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        global _run_configs_validated
        _run_configs_validated += 1
        # the run id, the run directory, the Tune sweep and experiment directories are made from it
        self._check(is_safe_name(self.name), "name", self.name, NAME_RULE)
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS)  # frozen: the one place the default is set
        self._check(
            self.steps is None or self.epochs is None, "steps", self.steps, "exactly one of `steps` or `epochs`"
        )
        self._check(
            self.steps is None or 1 <= self.steps <= MAX_STEPS, "steps", self.steps, f"an integer in [1, {MAX_STEPS}]"
        )
        self._check(
            self.epochs is None or (_finite(self.epochs) and 0 < self.epochs <= 10**6),
            "epochs",
            self.epochs,
            "a finite number in (0, 1000000]",
        )
        self._check(1 <= self.eval_every <= MAX_STEPS, "eval_every", self.eval_every, "an integer >= 1")
        if self.steps is not None:  # epochs: checked once the data's size is known (engine.preflight)
            check_rounds(self.steps, self.eval_every)
        self._registered("codistill.engine", "ENGINES", self.engine, "engine")
        self._check(len(self.peers) >= 1, "peers", list(self.peers), "a list of at least one peer")
        names = [self.peer_name(i) for i in range(self.num_peers)]
        self._check(len(set(names)) == len(names), "peers", names, "distinct peer names")
        shared_order = lookup("codistill.exchange", "EXCHANGES")[self.exchange.mode].shared_batch_order
        if self.data.shard == "disjoint" and shared_order:
            raise ConfigError(
                "data.shard",
                self.data.shard,
                f"`same` with exchange.mode={self.exchange.mode} (every peer must see the batch its teachers "
                f"saw); `disjoint` needs an exchange where each peer has its own order, e.g. checkpoint",
            )
        if self.data.loader == "ray_data" and shared_order:
            raise ConfigError(
                "data.loader",
                self.data.loader,
                f"'auto' with exchange.mode={self.exchange.mode} (every peer must see the batch its teachers saw; "
                "ray_data streams each peer its own order): use exchange.mode=checkpoint, or prepare the images "
                "with python -m codistill.prepare and train from the folder",
            )
        for i, pc in enumerate(self.peers):
            if pc.strategy == "fsdp":
                self._check(
                    pc.workers >= 2,
                    f"peers.{i}.workers",
                    pc.workers,
                    "at least 2 with strategy=fsdp (a single worker has nothing to shard across; use strategy=ddp)",
                )
                self._check(
                    self.engine == "ray",
                    f"peers.{i}.strategy",
                    pc.strategy,
                    "'ddp' with engine=local (fsdp runs in a Ray Train worker group: use engine=ray)",
                )
            if pc.workers == 1:
                continue
            self._check(
                self.engine == "ray", f"peers.{i}.workers", pc.workers, "1 with engine=local (worker groups need Ray)"
            )
            self._check(
                self.data.batch_size % pc.workers == 0,
                f"peers.{i}.workers",
                pc.workers,
                f"a divisor of data.batch_size={self.data.batch_size} (the global batch is split evenly across ranks)",
            )
            gpus = self.peer_resources(i)[1]
            self._check(
                gpus == 0 or gpus >= 1,
                f"peers.{i}.resources.num_gpus",
                gpus,
                "0 or whole GPUs per worker for a data-parallel peer (NCCL cannot put two ranks on one GPU)",
            )
        lookup("codistill.losses.weighting", "WEIGHTINGS")[self.loss.weighting].check(self)  # what it needs of the job
        compact = self.exchange.logits in ("topk", "sampled")
        if compact and shared_order and self.loss.teacher_reduce != "each":
            raise ConfigError(
                "loss.teacher_reduce",
                self.loss.teacher_reduce,
                f"'each' with exchange.logits={self.exchange.logits} (the shards of different teachers cover "
                "different classes: there is no full distribution to average; use exchange.logits=full)",
            )
        if self.exchange.logits == "sampled" and shared_order and self.loss.divergence != "kl":
            raise ConfigError(
                "loss.divergence",
                self.loss.divergence,
                "'kl' with exchange.logits=sampled (sampled shards estimate the forward KL without bias; "
                f"{self.loss.divergence} is an expectation the teacher's samples cannot give: use exchange.logits=topk "
                "or full)",
            )

    @property
    def num_peers(self) -> int:
        return len(self.peers)

    def peer_name(self, index: int) -> str:
        p = self.peers[index]
        return p.name or f"peer{index}-{p.model.replace(':', '_').replace('/', '_')}"

    def peer_seed(self, index: int) -> int:
        p = self.peers[index]
        return p.seed if p.seed is not None else self.seed + 1000 * (index + 1)

    def peer_resources(self, index: int) -> tuple[float, float]:
        """(num_cpus, num_gpus) per worker of peer `index`: its own `resources`, else the job's."""
        own = self.peers[index].resources
        cpus = own.num_cpus if own is not None and own.num_cpus is not None else self.resources.num_cpus
        gpus = own.num_gpus if own is not None and own.num_gpus is not None else self.resources.num_gpus
        return cpus, gpus

    def peer_threads(self, index: int) -> int:
        """torch intra-op threads of each worker of peer `index`: `resources.threads_per_peer`, else its CPUs."""
        return self.resources.threads_per_peer or max(1, int(self.peer_resources(index)[0]))

    def peer_optim(self, index: int) -> OptimConfig:
        return self.peers[index].optim or self.optim
