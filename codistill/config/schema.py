"""The dataclasses of a run, validated at construction.

Every class is frozen and keyword-only; `__post_init__` checks each field and raises
`ConfigError` naming the field (relative to the object: `temperature`; the parser that knows the
section prefixes it: `loss.temperature`), the value and what is allowed. Names of models,
datasets, divergences, teacher reductions, exchanges, topologies, optimizers, schedules and
engines are checked against the registries of the modules that own them (imported on first use:
this module imports no torch, ray or mlflow). Each default is written once, here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from codistill.errors import ConfigError
from codistill.registry import lookup

__all__ = [
    "MAX_ROUNDS",
    "NAME_RULE",
    "DEFAULT_PEER_MODELS",
    "DEFAULT_STEPS",
    "MAX_STEPS",
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

MAX_STEPS = 10**9
"""Upper bound on a run's length in steps (a typo such as 10**12 steps is refused, not planned)."""
MAX_ROUNDS = 100_000
"""Upper bound on a run's rounds (steps / eval_every): each round evaluates every peer on the test set and is
a record in progress.json, the summary and MLflow, so 10**9 steps at eval_every 1 is refused, not planned."""


def check_rounds(steps: int, eval_every: int, steps_field: str = "steps") -> None:
    """ConfigError unless `steps` (from `steps_field`) make at most MAX_ROUNDS rounds of `eval_every` steps."""
    check(1 <= steps <= MAX_STEPS, steps_field, steps, f"at most {MAX_STEPS} steps")
    if -(-steps // eval_every) > MAX_ROUNDS:
        raise ConfigError(
            "eval_every",
            eval_every,
            f"at least {-(-steps // MAX_ROUNDS)} for {steps} steps (a run has at most {MAX_ROUNDS} rounds: each "
            "evaluates every peer and is a record in progress.json and MLflow)",
        )


def check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(field, value, allowed)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class _Section:
    """Errors name the field under the section (`loss.temperature`); the parser moves them to where
    the section sits in a job (`peers.1.optim.lr` for a peer's `optim.lr`)."""

    __slots__ = ()
    SECTION: ClassVar[str] = ""

    def _field(self, name: str) -> str:
        return f"{self.SECTION}.{name}" if self.SECTION else name

    def _check(self, ok: bool, name: str, value: Any, allowed: str) -> None:
        check(ok, self._field(name), value, allowed)

    def _registered(self, module: str, registry: str, value: str, name: str) -> None:
        lookup(module, registry).check(value, self._field(name))


@dataclass(kw_only=True, frozen=True, slots=True)
class DataConfig(_Section):
    SECTION: ClassVar[str] = "data"

    name: str = "digits"
    """Dataset registry key (codistill.data.DATASETS)."""
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
    num_classes: int | None = None
    """parquet: the number of classes when the file does not declare them (Hugging Face ClassLabel);
    labels must lie in [0, num_classes). None = declared, or inferred from dense labels."""
    max_decoded_bytes: int | None = None
    """What the decoded images may take in memory (bytes), checked from each image's declared size before
    anything is decoded; None = half of the memory available when the job starts."""
    synthetic_train: int = 2048
    """synthetic only: number of training examples."""
    synthetic_shape: tuple[int, ...] = (1, 8, 8)
    """synthetic only: image shape (C, H, W)."""
    synthetic_classes: int = 10
    tokenizer: str = "byte"
    """text only: `byte` (256 symbols, no files), `bpe` (trained on the training split with the `tokenizers`
    library, `vocab_size` symbols) or `hf:<name or path>` (a Hugging Face tokenizer you have)."""
    vocab_size: int = 8192
    """text, bpe only: the size of the trained vocabulary."""
    block_size: int = 128
    """text only: tokens per training sequence (the model sees `block_size` tokens and predicts the next)."""
    text_column: str = "text"
    """text only: the column of a Parquet/Arrow file that holds the text."""
    val_fraction: float = 0.1
    """text only: the share of the corpus (its end) held out for validation and test."""
    max_chars: int | None = 3_000_000
    """text only: use the first N characters of the corpus (null: all of it)."""
    validation_fraction: float = 0.0
    """The share of the training data held out as a validation split (never the test set), for
    `loss.weighting: influence`; every peer holds out the same examples and never trains on them."""

    def __post_init__(self) -> None:
        self._registered("codistill.data", "DATASETS", self.name, "name")
        self._registered("codistill.data", "TOKENIZERS", self.tokenizer, "tokenizer")
        self._check(2 <= self.vocab_size <= 1_000_000, "vocab_size", self.vocab_size, "an integer in [2, 1000000]")
        self._check(1 <= self.block_size <= 1_000_000, "block_size", self.block_size, "an integer in [1, 1000000]")
        self._check(
            _finite(self.val_fraction) and 0 < self.val_fraction < 1,
            "val_fraction",
            self.val_fraction,
            "a number in (0, 1)",
        )
        self._check(self.max_chars is None or self.max_chars >= 1, "max_chars", self.max_chars, "null or >= 1")
        self._check(
            _finite(self.validation_fraction) and 0 <= self.validation_fraction < 1,
            "validation_fraction",
            self.validation_fraction,
            "a number in [0, 1)",
        )
        self._check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        self._check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "an integer >= 1")
        for key in ("limit_train", "limit_test"):
            v = getattr(self, key)
            self._check(v is None or v >= 1, key, v, "null or an integer >= 1")
        self._check(
            len(self.synthetic_shape) == 3 and all(d >= 1 for d in self.synthetic_shape),
            "synthetic_shape",
            self.synthetic_shape,
            "three positive integers [C, H, W]",
        )
        self._check(
            self.num_classes is None or 2 <= self.num_classes <= 1_000_000,
            "num_classes",
            self.num_classes,
            "null or an integer in [2, 1000000]",
        )
        self._check(
            self.max_decoded_bytes is None or self.max_decoded_bytes >= 1,
            "max_decoded_bytes",
            self.max_decoded_bytes,
            "null (half the memory available) or a number of bytes >= 1",
        )
        self._check(self.synthetic_classes >= 2, "synthetic_classes", self.synthetic_classes, "an integer >= 2")


@dataclass(kw_only=True, frozen=True, slots=True)
class OptimConfig(_Section):
    SECTION: ClassVar[str] = "optim"

    name: str = "sgd"
    """Optimizer registry key (codistill.peer.optim.OPTIMIZERS): sgd, adamw."""
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    """LR schedule registry key (codistill.peer.optim.SCHEDULES): constant, cosine, step."""
    milestones: tuple[float, ...] = (0.5, 0.75)
    """step schedule: fractions of the run at which lr is multiplied by `gamma`."""
    gamma: float = 0.1
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        self._registered("codistill.peer.optim", "OPTIMIZERS", self.name, "name")
        self._registered("codistill.peer.optim", "SCHEDULES", self.schedule, "schedule")
        self._check(self.lr > 0 and _finite(self.lr), "lr", self.lr, "a finite number > 0")
        self._check(0 <= self.momentum < 1, "momentum", self.momentum, "0 <= momentum < 1")
        self._check(
            self.weight_decay >= 0 and _finite(self.weight_decay), "weight_decay", self.weight_decay, "a number >= 0"
        )
        self._check(
            all(0 < m < 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
            "milestones",
            self.milestones,
            "increasing fractions of the run, each in (0, 1)",
        )
        self._check(0 < self.gamma <= 1, "gamma", self.gamma, "0 < gamma <= 1")
        self._check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '_', '-', '.', '+', starting with a letter or digit (no path separators)"
"""Names that become one path component (a run, a sweep, an experiment, a peer): never `..` or `a/b`."""


def is_safe_name(name: object) -> bool:
    return isinstance(name, str) and bool(_NAME.match(name)) and ".." not in name


@dataclass(kw_only=True, frozen=True, slots=True)
class WorkerResources(_Section):
    SECTION: ClassVar[str] = "peer resources"

    num_cpus: float | None = None
    """CPUs per worker of this peer; None = the job's `resources.num_cpus`."""
    num_gpus: float | None = None
    """GPUs per worker of this peer; None = the job's `resources.num_gpus`."""

    def __post_init__(self) -> None:
        cpus, gpus = self.num_cpus, self.num_gpus
        self._check(cpus is None or (_finite(cpus) and cpus >= 0), "num_cpus", cpus, "null or a finite number >= 0")
        self._check(
            gpus is None or (_finite(gpus) and gpus >= 0 and (gpus <= 1 or gpus == int(gpus))),
            "num_gpus",
            gpus,
            "null, a fraction in [0, 1] or a whole number of GPUs",
        )


@dataclass(kw_only=True, frozen=True, slots=True)
class PeerConfig(_Section):
    SECTION: ClassVar[str] = "peer"

    model: str = "mlp"
    """Model registry key (codistill.models.MODELS) or `torchvision:<name>`."""
    name: str | None = None
    """Display name (also a file name in the run directory); default `peer<i>-<model>`."""
    seed: int | None = None
    """Initialisation and augmentation seed; default job seed + 1000 * (index + 1)."""
    optim: OptimConfig | None = None
    """This peer's optimiser; None = the job's `optim`. In a job file, the job's `optim` keys merged
    with this peer's own."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the model's builder: `gpt` sizes (`n_layer`, `n_head`, `n_embd`, `dropout`), or
    for `hf` the Hugging Face config (`model_type: llama`, `hidden_size`, ...)."""
    pretrained: bool = False
    """`hf:<id or path>` only: load the pretrained weights (else the architecture, freshly initialised)."""
    workers: int = 1
    """Data-parallel workers of this peer: 1 = one Ray actor; W > 1 = a Ray Train worker group running DDP
    (gloo on CPU, NCCL on GPU), the global batch `data.batch_size` split evenly across its ranks."""
    resources: WorkerResources | None = None
    """Per worker of this peer, overriding the job's `resources` (num_cpus, num_gpus)."""

    def __post_init__(self) -> None:
        self._registered("codistill.models", "MODELS", self.model, "model")
        self._check(1 <= self.workers <= 1024, "workers", self.workers, "an integer in [1, 1024]")
        if self.name is not None:
            self._check(is_safe_name(self.name), "name", self.name, NAME_RULE)


TERM_LAYERS = ("uniform", "last")


@dataclass(kw_only=True, frozen=True, slots=True)
class TermConfig(_Section):
    SECTION: ClassVar[str] = "term"

    name: str = "logits"
    """Loss term registry key (codistill.losses.LOSS_TERMS): logits (the divergence of `loss.divergence`),
    hidden_mse (TinyBERT/FitNets), attention_kl (MiniLM, relation heads as MiniLMv2), attention_mse (TinyBERT)."""
    weight: float = 1.0
    """This term's weight inside the distillation part: loss = (1 - alpha) CE + alpha * sum_k weight_k term_k."""
    layers: Literal["uniform", "last"] | tuple[tuple[int, ...], ...] | None = None
    """Which student layer learns from which teacher layer: `uniform` (TinyBERT's map g(m) = m N / M, first to
    first, last to last), `last` (MiniLM: the last layer only) or a list of [student, teacher] index pairs
    into the models' layers (negative from the end). None: the term's default (hidden_mse and attention_mse
    uniform, attention_kl last)."""
    relation_heads: int | None = None
    """attention terms: heads the queries, keys and values are split into before relations are formed
    (MiniLMv2), so peers with different head counts and widths compare; None: the smaller head count of the
    pair (it must divide both widths)."""
    relations: tuple[str, ...] = ("qk", "vv")
    """attention_kl: which self-attention relations to match: qk (the attention distributions, MiniLM), qq, kk,
    vv (MiniLM's value relation; MiniLMv2 uses qq, kk, vv)."""

    def __post_init__(self) -> None:
        self._registered("codistill.losses", "LOSS_TERMS", self.name, "name")
        self._check(_finite(self.weight) and self.weight >= 0, "weight", self.weight, "a finite number >= 0")
        term = lookup("codistill.losses", "LOSS_TERMS")[self.name]
        for option, unset in (("layers", None), ("relation_heads", None), ("relations", ("qk", "vv"))):
            value = getattr(self, option)
            self._check(
                value == unset or option in term.options,
                option,
                value,
                f"not set: {self.name} takes {', '.join(term.options) or 'only name and weight'}",
            )
        if isinstance(self.layers, tuple):
            self._check(
                len(self.layers) >= 1 and all(len(p) == 2 for p in self.layers),
                "layers",
                [list(p) for p in self.layers],
                f"one of {', '.join(TERM_LAYERS)} or a list of [student, teacher] layer index pairs",
            )
        self._check(
            self.relation_heads is None or 1 <= self.relation_heads <= 4096,
            "relation_heads",
            self.relation_heads,
            "null or an integer in [1, 4096]",
        )
        self._check(
            len(self.relations) >= 1 and all(r in ("qk", "qq", "kk", "vv") for r in self.relations),
            "relations",
            list(self.relations),
            "a non-empty list of qk, qq, kk, vv",
        )


@dataclass(kw_only=True, frozen=True, slots=True)
class LossConfig(_Section):
    SECTION: ClassVar[str] = "loss"

    divergence: str = "kl"
    """Divergence registry key (codistill.losses.DIVERGENCES): kl (forward, Hinton/DML), reverse_kl
    (MiniLLM), js, mse (on logits)."""
    temperature: float = 3.0
    alpha: float = 0.5
    """loss = (1 - alpha) * CE + alpha * D_teachers; alpha = 0 is independent training."""
    burn_in: int = 0
    """Steps of plain cross-entropy before distillation starts. In checkpoint mode a teacher version
    trained for fewer than `burn_in` steps is never used (docs/design.md, "Checkpoint exchange")."""
    teacher_reduce: str = "each"
    """How several teachers combine (codistill.losses.TEACHER_REDUCERS): each, probs, logits."""
    zscore: bool = False
    """Standardise logits before the divergence (Sun et al., CVPR 2024)."""
    terms: tuple[TermConfig, ...] = field(default_factory=lambda: (TermConfig(),))
    """The distillation part as weighted terms (codistill.losses.LOSS_TERMS); the default is the logit
    divergence alone, as before terms existed."""
    weighting: Literal["none", "influence"] = "none"
    """Per-sample weights on the distillation part (codistill.losses.weighting.WEIGHTINGS): `influence` weights
    each training sample by its distillation influence (LGTM, Ren et al., ACL 2023; docs/design.md
    "Influence-weighted distillation")."""
    influence_every: int = 1
    """influence: measure the weights every N steps (the steps between are unweighted)."""
    influence_eps: float = 0.01
    """influence: the finite-difference step, a distance in parameter space along the unit validation gradient."""
    influence_side: Literal["teacher", "student", "both"] = "teacher"
    """influence: whose update the weights scale. `teacher` (LGTM's): a peer's term toward teacher j is
    weighted by j's influence as j's student (needs topology all); `student`: a peer's own terms by its own
    influence; `both`: the mean of the two."""

    def __post_init__(self) -> None:
        self._registered("codistill.losses", "DIVERGENCES", self.divergence, "divergence")
        self._registered("codistill.losses", "TEACHER_REDUCERS", self.teacher_reduce, "teacher_reduce")
        self._check(
            self.temperature > 0 and _finite(self.temperature), "temperature", self.temperature, "a finite number > 0"
        )
        self._check(0 <= self.alpha <= 1, "alpha", self.alpha, "a number in [0, 1]")
        self._check(0 <= self.burn_in <= MAX_STEPS, "burn_in", self.burn_in, f"an integer in [0, {MAX_STEPS}]")
        self._check(len(self.terms) >= 1, "terms", list(self.terms), "a list of at least one term")
        names = [t.name for t in self.terms]
        self._check(len(set(names)) == len(names), "terms", names, "each term at most once")
        self._check(1 <= self.influence_every <= MAX_STEPS, "influence_every", self.influence_every, "an integer >= 1")
        self._check(
            _finite(self.influence_eps) and 0 < self.influence_eps <= 1,
            "influence_eps",
            self.influence_eps,
            "a number in (0, 1]",
        )

    @property
    def default_terms(self) -> bool:
        """The logit divergence alone at weight 1 and no weighting: the loss as it was before terms."""
        if len(self.terms) != 1 or self.terms[0] != TermConfig():
            return False
        return not lookup("codistill.losses.weighting", "WEIGHTINGS")[self.weighting].weights_examples


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
    logits: Literal["full", "topk"] = "full"
    """logits mode: `full` shards carry every class's logit; `topk` shards carry each position's `topk` largest
    (ids and values) plus the log-sum-exp at the job's temperature, exact for those k classes and one bucket
    for the rest (for language models: a fraction of the bytes)."""
    topk: int = 32
    """topk shards: classes kept per position."""
    """Ray, logits: a shard up to this size travels by value through the board (one RPC per pull, as
    Ray itself inlines small objects); larger ones are `ray.put` and only their reference is passed.
    0 = always by reference."""

    def __post_init__(self) -> None:
        self._registered("codistill.exchange", "EXCHANGES", self.mode, "mode")
        self._registered("codistill.peer.topology", "TOPOLOGIES", self.topology, "topology")
        self._check(1 <= self.topk <= 1_000_000, "topk", self.topk, "an integer in [1, 1000000]")
        self._check(0 <= self.staleness <= MAX_STEPS, "staleness", self.staleness, "an integer >= 0")
        self._check(
            0 <= self.inline_max_bytes <= 1 << 20,
            "inline_max_bytes",
            self.inline_max_bytes,
            "an integer in [0, 1048576]",
        )
        self._check(1 <= self.period <= MAX_STEPS, "period", self.period, "an integer >= 1")
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
        for i, pc in enumerate(self.peers):
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
        if self.exchange.logits == "topk" and shared_order and self.loss.teacher_reduce != "each":
            raise ConfigError(
                "loss.teacher_reduce",
                self.loss.teacher_reduce,
                "'each' with exchange.logits=topk (top-k shards of different teachers cover different classes: "
                "there is no full distribution to average; use exchange.logits=full)",
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
