"""The sections of a job about data, optimisation, peers and the loss (RunConfig holds them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from codistill.config.checks import MAX_STEPS, NAME_RULE, _finite, _Section, is_safe_name
from codistill.registry import lookup


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
    """Use only N training examples (quick experiments, small-data regimes): the first N, or with
    `limit_balanced` a class-balanced draw."""
    limit_test: int | None = None
    limit_balanced: bool = False
    """classification: `limit_train` examples drawn at random with the classes as equal as N allows (N // K of
    each of the K classes, one more for the first N % K classes), from `subset_seed`."""
    subset_seed: int = 0
    """The draw of the balanced subset: the same for every arm and run seed unless set."""
    label_noise: float = 0.0
    """classification: symmetric label noise. This fraction of the training labels (after the subset) is moved to
    a uniformly drawn *other* class, drawn from `noise_seed`; test labels are never touched. The summary's `data`
    says which rows were flipped; training accuracy is scored on the given and on the clean labels."""
    noise_seed: int = 0
    """The draw of the flipped rows and their new labels: the same for every arm and run seed unless set."""
    train_eval: int | None = None
    """Training examples (evenly spaced over a peer's shard, no augmentation) each evaluation also scores: the
    training loss and accuracy on the labels trained on and, with `label_noise`, on the clean labels (0: none;
    null: 512 for classification, none for language models, whose windows cost far more; data held in memory
    only)."""
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
    """text only: the column of a Parquet/Arrow file (or key of a JSONL object) that holds the text."""
    messages_column: str = "messages"
    """text only: the column (Parquet/Arrow) or key (JSONL) that makes a source a chat corpus: a list of
    {role, content} messages per row, rendered by the tokenizer's chat template, trained only on the assistant's
    turns (codistill.data.chat)."""
    val_fraction: float = 0.1
    """text only: the share of the corpus (its end) held out for validation and test."""
    max_chars: int | None = 3_000_000
    """text only: use the first N characters of the corpus (null: all of it)."""
    image_size: tuple[int, int] | None = None
    """prepare: resize every image to [H, W] (null: keep the first image's size; all images must have it)."""
    validation_fraction: float = 0.0
    """The share of the training data held out as a validation split (never the test set), for
    `loss.weighting: influence`; every peer holds out the same examples and never trains on them."""
    loader: Literal["auto", "ray_data"] = "auto"
    """Where training batches come from. `auto`: in memory, or read lazily from a prepared folder when
    `data.train` holds one. `ray_data`: images (data.name parquet: Hugging Face image Parquet or class folders)
    decoded from their sources by Ray Data tasks anywhere in the cluster and streamed to each peer and rank, in
    an order of its own (docs/design.md, "Data at scale"); not with `exchange.mode: logits`."""
    shuffle_window: int = 2048
    """ray_data only: images one Ray Data task decodes and shuffles together (8 chunks of the source, drawn at
    random each epoch); larger mixes better and holds more decoded images per task."""
    decode_cpus: float = 1.0
    """ray_data only: CPUs each decoding task asks Ray for (the cluster needs them free beside the peers)."""

    def __post_init__(self) -> None:
        self._registered("codistill.data", "DATASETS", self.name, "name")
        self._registered("codistill.data", "TOKENIZERS", self.tokenizer, "tokenizer")
        self._check(2 <= self.vocab_size <= 1_000_000, "vocab_size", self.vocab_size, "an integer in [2, 1000000]")
        self._check(1 <= self.block_size <= 1_000_000, "block_size", self.block_size, "an integer in [1, 1000000]")
        for key in ("text_column", "messages_column"):
            v = getattr(self, key)
            self._check(isinstance(v, str) and v.strip() != "", key, v, "a non-empty column name")
        self._check(
            self.messages_column != self.text_column,
            "messages_column",
            self.messages_column,
            f"a column other than data.text_column ({self.text_column!r})",
        )
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
            not self.limit_balanced or self.limit_train is not None,
            "limit_balanced",
            self.limit_balanced,
            "false unless data.limit_train sets the subset's size",
        )
        self._check(
            _finite(self.label_noise) and 0 <= self.label_noise < 1,
            "label_noise",
            self.label_noise,
            "a fraction in [0, 1)",
        )
        for key in ("subset_seed", "noise_seed"):
            v = getattr(self, key)
            self._check(0 <= v < 2**63, key, v, "an integer in [0, 2**63)")
        self._check(
            self.train_eval is None or self.train_eval >= 0,
            "train_eval",
            self.train_eval,
            "null or an integer >= 0 (0: no training scores)",
        )
        self._check(
            self.loader == "auto" or (not self.limit_balanced and self.label_noise == 0),
            "limit_balanced" if self.limit_balanced else "label_noise",
            self.limit_balanced if self.limit_balanced else self.label_noise,
            "false / 0 with data.loader ray_data (it streams the sources as they are)",
        )
        self._check(
            len(self.synthetic_shape) == 3 and all(d >= 1 for d in self.synthetic_shape),
            "synthetic_shape",
            self.synthetic_shape,
            "three positive integers [C, H, W]",
        )
        self._check(
            self.image_size is None or (len(self.image_size) == 2 and all(1 <= d <= 65_536 for d in self.image_size)),
            "image_size",
            self.image_size,
            "null or two integers [H, W] in [1, 65536]",
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
        self._check(self.loader in ("auto", "ray_data"), "loader", self.loader, "'auto' or 'ray_data'")
        self._check(
            self.loader == "auto" or self.name == "parquet",
            "loader",
            self.loader,
            "'auto' for data.name " + repr(self.name) + " (ray_data streams images: data.name parquet)",
        )
        self._check(
            self.loader == "auto" or self.validation_fraction == 0,
            "validation_fraction",
            self.validation_fraction,
            "0 with data.loader ray_data (validation batches are drawn at random: prepare the images instead)",
        )
        self._check(
            8 <= self.shuffle_window <= 1_000_000, "shuffle_window", self.shuffle_window, "an integer in [8, 1000000]"
        )
        self._check(
            _finite(self.decode_cpus) and 0 < self.decode_cpus <= 1024,
            "decode_cpus",
            self.decode_cpus,
            "a number in (0, 1024]",
        )


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
class AdapterConfig(_Section):
    """`peers[i].adapter`: train low-rank adapters on a frozen base instead of the whole model (codistill.models.
    adapters, through `peft`): LoRA, W x + (alpha / r) B A x with A (r, in) and B (out, r) (Hu et al., "LoRA:
    Low-Rank Adaptation of Large Language Models", ICLR 2022)."""

    SECTION: ClassVar[str] = "adapter"

    kind: Literal["lora"] = "lora"
    """The adapter family (peft's): `lora`."""
    r: int = 8
    """The rank of each adapter."""
    alpha: float = 16.0
    """LoRA's scale numerator: the update is (alpha / r) B A."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: tuple[str, ...] | None = None
    """Names (or name suffixes) of the Linear layers to adapt; None: the model's default (the built-in GPT's
    qkv, proj and fc; a Hugging Face model's from peft's table for its model_type, e.g. q_proj, v_proj)."""

    def __post_init__(self) -> None:
        self._check(self.kind == "lora", "kind", self.kind, "'lora'")
        self._check(1 <= self.r <= 4096, "r", self.r, "an integer in [1, 4096]")
        self._check(_finite(self.alpha) and self.alpha > 0, "alpha", self.alpha, "a finite number > 0")
        self._check(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        names = self.target_modules
        self._check(
            names is None or (len(names) > 0 and all(isinstance(n, str) and n.strip() for n in names)),
            "target_modules",
            names,
            "null or a non-empty list of module names",
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
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How a worker group holds the model: `ddp` (every rank a whole copy) or `fsdp` (PyTorch FSDP2: parameters,
    gradients and optimizer state sharded across the W ranks, one unit per transformer block or network stage;
    its checkpoints sharded, its teachers in checkpoint mode sharded the same way). `fsdp` needs workers >= 2."""
    activation_checkpointing: bool = False
    """fsdp: recompute each sharded unit's activations in the backward pass instead of keeping them."""
    resources: WorkerResources | None = None
    """Per worker of this peer, overriding the job's `resources` (num_cpus, num_gpus)."""
    adapter: AdapterConfig | None = None
    """Train only adapters (`{kind: lora, r, alpha, dropout, target_modules}`) on a frozen base: the base is built
    from the job's seed (or loaded, `pretrained`), the same for every peer with the same model, so checkpoint
    exchange publishes and loads only the adapters and a process holds each base once."""

    def __post_init__(self) -> None:
        self._registered("codistill.models", "MODELS", self.model, "model")
        self._check(1 <= self.workers <= 1024, "workers", self.workers, "an integer in [1, 1024]")
        self._check(self.strategy in ("ddp", "fsdp"), "strategy", self.strategy, "'ddp' or 'fsdp'")
        self._check(
            self.strategy == "fsdp" or not self.activation_checkpointing,
            "activation_checkpointing",
            self.activation_checkpointing,
            "false with strategy=ddp (it applies to fsdp's sharded units)",
        )
        if self.name is not None:
            self._check(is_safe_name(self.name), "name", self.name, NAME_RULE)
        self._check(
            self.adapter is None or self.strategy == "ddp",
            "adapter",
            "lora",
            "no adapter with strategy=fsdp (adapters are for models whose frozen base fits each worker: use ddp)",
        )


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
