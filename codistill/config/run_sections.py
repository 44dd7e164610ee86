"""The sections of a job about the exchange, resources, tracking and output (RunConfig holds them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from codistill.config.checks import MAX_STEPS, _finite, _Section


@dataclass(kw_only=True, frozen=True, slots=True)
class ExchangeConfig(_Section):
    SECTION: ClassVar[str] = "exchange"

    mode: str = "logits"
    """Exchange registry key (codistill.exchange.EXCHANGES): logits (DML, logit shards per step) or
    checkpoint (Anil, weights every `period` steps)."""
    topology: str = "all"
    """Topology registry key (codistill.peer.topology.TOPOLOGIES): all, ring."""
    staleness: int = 0
    """logits: how many steps a peer may run ahead of the slowest before it waits."""
    period: int = 50
    """checkpoint: publish weights every `period` steps."""
    max_staleness: int | None = None
    """checkpoint: the oldest teacher a peer may distill from, in steps behind its own; beyond it the
    peer waits for its teachers (bounded staleness). None = 2 * period; at least period - 1."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Wire precision of published logits and weights."""
    sync: bool = False
    """checkpoint: use exactly the teachers' checkpoint of the last multiple of `period` (waiting for it):
    a deterministic schedule, the limit of max_staleness."""
    timeout_s: float = 300.0
    """How long a peer waits for a teacher's shard or checkpoint before the step fails."""
    inline_max_bytes: int = 32768
    """Ray, logits: a shard up to this size travels by value through the board (one RPC per pull, as
    Ray itself inlines small objects); larger ones are `ray.put` and only their reference is passed.
    0 = always by reference."""
    gather_max_mb: float = 1024.0
    """checkpoint, a sharded publisher (strategy fsdp): weights up to this size (in the wire dtype) are gathered
    onto its rank 0 and go through the object store; larger ones are written by every rank as its own shards
    (torch.distributed.checkpoint) under the run directory's `published/<peer>/v<version>/`, and each consumer
    reads them from there (a sharded consumer only its own slices): nothing holds them whole."""
    logits: Literal["full", "topk", "sampled"] = "full"
    """logits mode: `full` shards carry every class's logit; `topk` shards carry each position's `topk` largest
    (ids and values) plus the log-sum-exp at the job's temperature, exact for those k classes and one bucket
    for the rest (for language models: a fraction of the bytes), but a biased estimate of the full loss's
    gradient; `sampled` shards carry `topk` ids drawn per position from the teacher's distribution at the job's
    temperature with their counts (Sparse Logit Sampling, Anshumann et al., ACL 2025): the forward-KL loss and
    its gradient are unbiased, at fewer bytes than top-k (no values travel). Seeded: a rerun draws the same ids."""
    topk: int = 32
    """topk shards: classes kept per position; sampled shards: tokens drawn per position (with replacement)."""

    def __post_init__(self) -> None:
        self._registered("codistill.exchange", "EXCHANGES", self.mode, "mode")
        self._registered("codistill.peer.topology", "TOPOLOGIES", self.topology, "topology")
        self._check(1 <= self.topk <= 1_000_000, "topk", self.topk, "an integer in [1, 1000000]")
        self._check(self.logits in ("full", "topk", "sampled"), "logits", self.logits, "'full', 'topk' or 'sampled'")
        self._check(0 <= self.staleness <= MAX_STEPS, "staleness", self.staleness, "an integer >= 0")
        self._check(
            0 <= self.inline_max_bytes <= 1 << 20,
            "inline_max_bytes",
            self.inline_max_bytes,
            "an integer in [0, 1048576]",
        )
        self._check(1 <= self.period <= MAX_STEPS, "period", self.period, "an integer >= 1")
        finite_size = _finite(self.gather_max_mb) and self.gather_max_mb >= 0
        self._check(finite_size, "gather_max_mb", self.gather_max_mb, "a finite number >= 0")
        self._check(
            self.max_staleness is None or self.period - 1 <= self.max_staleness <= MAX_STEPS,
            "max_staleness",
            self.max_staleness,
            f"null (2 * period) or an integer >= period - 1 = {self.period - 1} (a smaller bound would make "
            f"peers wait for checkpoints not yet due)",
        )
        self._check(self.timeout_s > 0 and _finite(self.timeout_s), "timeout_s", self.timeout_s, "a finite number > 0")

    @property
    def staleness_bound(self) -> int:
        """checkpoint: the resolved max_staleness."""
        return 2 * self.period if self.max_staleness is None else self.max_staleness


@dataclass(kw_only=True, frozen=True, slots=True)
class ResourcesConfig(_Section):
    SECTION: ClassVar[str] = "resources"

    num_cpus: float = 1.0
    """CPUs reserved per peer actor."""
    num_gpus: float = 0.0
    """GPUs per peer actor; fractions let several peers share one GPU (no memory isolation)."""
    placement: Literal["pack", "spread"] = "pack"
    max_restarts: int = 3
    """How often a dead peer actor is restarted (it resumes from its own last checkpoint)."""
    threads_per_peer: int | None = None
    """torch intra-op threads per peer; default = num_cpus (at least 1)."""

    def __post_init__(self) -> None:
        self._check(self.num_cpus >= 0 and _finite(self.num_cpus), "num_cpus", self.num_cpus, "a finite number >= 0")
        self._check(
            _finite(self.num_gpus)
            and self.num_gpus >= 0
            and (self.num_gpus <= 1 or self.num_gpus == int(self.num_gpus)),
            "num_gpus",
            self.num_gpus,
            "a fraction in [0, 1] or a whole number of GPUs",
        )
        self._check(self.max_restarts >= 0, "max_restarts", self.max_restarts, "an integer >= 0")
        self._check(
            self.threads_per_peer is None or self.threads_per_peer >= 1,
            "threads_per_peer",
            self.threads_per_peer,
            "null or an integer >= 1",
        )


@dataclass(kw_only=True, frozen=True, slots=True)
class TrackingConfig(_Section):
    SECTION: ClassVar[str] = "tracking"

    backend: Literal["mlflow", "none"] = "mlflow"
    uri: str | None = None
    """MLflow tracking URI; default MLFLOW_TRACKING_URI or MLflow's own default (sqlite:///mlflow.db)."""
    experiment: str | None = None
    """MLflow experiment; default the job name."""
    connect_timeout_s: float = 10.0
    """How long a run waits for the store to create its runs before training; past it (one warning line)
    training goes on and tracking is retried in the background. At the end, how long it waits for a store
    that keeps failing to take what is still queued."""
    request_timeout_s: int = 10
    """HTTP stores: seconds one call may take before it counts as failed and is retried later (the
    tracker's calls run with MLFLOW_HTTP_REQUEST_TIMEOUT set to it and MLflow's own retries off)."""

    def __post_init__(self) -> None:
        self._check(
            _finite(self.connect_timeout_s) and 0 < self.connect_timeout_s <= 3600,
            "connect_timeout_s",
            self.connect_timeout_s,
            "a number of seconds in (0, 3600]",
        )
        self._check(
            1 <= self.request_timeout_s <= 3600, "request_timeout_s", self.request_timeout_s, "an integer in [1, 3600]"
        )


@dataclass(kw_only=True, frozen=True, slots=True)
class OutputConfig(_Section):
    SECTION: ClassVar[str] = "output"

    dir: str | None = None
    """Run directory (local path or pyarrow.fs URI); default runs/<name>-<timestamp>."""
    checkpoint_every: int = 0
    """Ray engine: peers write their own training checkpoint every N steps (0 = at the end of every round)."""

    def __post_init__(self) -> None:
        self._check(
            0 <= self.checkpoint_every <= MAX_STEPS, "checkpoint_every", self.checkpoint_every, "an integer >= 0"
        )
