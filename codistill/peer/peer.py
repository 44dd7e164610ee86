"""Peer: one model being trained, with its optimiser, LR schedule, data stream and local teachers.

Plain PyTorch, no Ray. A training step is split in two so that N peers need only N forward passes
in mutual learning (not N^2): `forward(step)` computes the peer's logits on its batch (kept with
their graph, and returned detached for publishing), then `train_step(teacher_logits)` adds the loss
and updates. In checkpoint mode the teachers are local frozen copies of other peers
(`set_teacher`), run by `local_teacher_signals()` on the peer's own batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call

from codistill.config import RunConfig, TermConfig
from codistill.data import Dataset, PeerData, mix_seed
from codistill.errors import CodistillError, ConfigError
from codistill.losses import total_loss
from codistill.losses.distill import TeacherSignal, cross_entropy, flat_targets, position_mask
from codistill.losses.terms import (
    LOSS_TERMS,
    ModelInfo,
    StudentOutput,
    TeacherOutput,
    TermPlan,
    distill_terms,
    model_info,
    per_example_objective,
)
from codistill.losses.weighting import distillation_influence, normalized, weight_stats
from codistill.models import build_model
from codistill.models.randomness import draws_random_numbers
from codistill.models.taps import TapRecorder
from codistill.peer.optim import make_optimizer, make_scheduler
from codistill.peer.start import PeerStart
from codistill.peer.topology import consumers_of, part_bounds, teachers_of
from codistill.tasks import EvalResult, task_of

__all__ = ["EvalResult", "NonFiniteLossError", "Peer", "StepLoss", "StepStats", "resolve_device", "total_steps"]


class NonFiniteLossError(CodistillError, RuntimeError):
    """A peer's loss became NaN or inf: nothing trained from that step on is saved, published or evaluated."""


@dataclass(frozen=True)
class StepStats:
    """What a step knows without reading the device (its losses come later, from `Peer.take_losses`)."""

    step: int
    alpha: float
    lr: float
    num_teachers: int


@dataclass(frozen=True)
class StepLoss:
    step: int
    loss: float
    ce: float
    distill: float | None
    terms: dict[str, float] | None = None  # each loss term's value and the influence weights' statistics (NaN: none)


@dataclass
class _Pending:
    """A training forward pass waiting for its loss."""

    step: int
    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor
    taps: dict[str, torch.Tensor]


@dataclass
class _Teacher:
    model: nn.Module
    version: int  # the publisher's step at which these weights were produced


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "'cpu' or 'auto' on a machine without CUDA")
    return torch.device(name)


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    assert cfg.epochs is not None, "a RunConfig has steps or epochs"
    return max(1, math.ceil(cfg.epochs * steps_per_epoch))


class Peer:
    def __init__(self, start: PeerStart, dataset: Dataset, device: torch.device | str | None = None):
        self.cfg = cfg = start.config
        index, rank, world_size = start.index, start.rank, start.world_size
        # A data-parallel peer (Ray Train worker group): this process is rank `rank` of `world_size`; it trains
        # on its contiguous part of the global batch and DDP averages the gradients (docs/design.md).
        self.rank, self.world_size = rank, world_size
        self.part = slice(*part_bounds(cfg.data.batch_size, world_size, rank))
        self.index = index
        self.name = cfg.peer_name(index)
        self.seed = cfg.peer_seed(index)
        self.device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        self.dataset = dataset
        self.task = task_of(dataset)
        # the batch order and the shard are the engine's to decide (codistill.engine.peer_start)
        self.data = PeerData(
            dataset,
            cfg.data,
            order_seed=start.order_seed,
            aug_seed=self.seed,
            shard_seed=cfg.seed,
            shard_index=start.shard_index,
            num_shards=start.num_shards,
            device=self.device,
        )
        self.total_steps = total_steps(cfg, self.data.steps_per_epoch)
        self.module = self._build(index, seed=self.seed)  # the model itself: weights, evaluation, checkpoints
        self.model: nn.Module = self.module  # what the training step calls: DDP around the module when W > 1
        # a model without dropout (or other random layers) needs no seeded generator around each forward
        self._random_forward = draws_random_numbers(self.module)
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            if self.device.type == "cuda":  # batch statistics over the global batch (CUDA only in torch)
                self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        self._plan_terms()
        oc = cfg.peer_optim(index)
        self.optimizer = make_optimizer(list(self.module.parameters()) + list(self.heads.parameters()), oc)
        self.scheduler = make_scheduler(self.optimizer, oc, self.total_steps)
        self.step = 0  # completed training steps
        self.teachers: dict[int, _Teacher] = {}
        self._pending: _Pending | None = None
        self.influence: torch.Tensor | None = None  # this step's own normalised influence weights (B_part,)
        # Losses stay on the device until something reads the peer anyway (GPU steps never wait for the host):
        # per step (step, (3,) [total, ce, distill] tensor, has_distill), then floats in _read_losses.
        self._device_losses: list[tuple[int, torch.Tensor, bool]] = []
        self._read_losses: list[StepLoss] = []
        self._checked = 0  # how many of _device_losses check_losses has read
        self._non_finite: str | None = None  # once set, every read raises it: the weights past it are not kept

    # -- construction ------------------------------------------------------------------------

    def _plan_terms(self) -> None:
        """What each loss term reads from this peer and its teachers, the trainable projections it needs
        (`heads`, part of this peer's optimiser and training checkpoints) and what its own consumers read."""
        cfg = self.cfg
        self.default_loss = cfg.loss.default_terms  # the loss exactly as before terms: total_loss
        self.teacher_indices = teachers_of(self.index, cfg.num_peers, cfg.exchange.topology)
        self.heads = nn.ModuleDict()
        self.plans: dict[str, list[TermPlan]] = {}
        self.projections: dict[str, list[nn.Module | None]] = {}
        self.student_taps: tuple[str, ...] = ()
        self.publish_taps: tuple[str, ...] = ()
        self.teacher_taps: dict[int, tuple[str, ...]] = {}
        self.extra_names: list[str] = []  # per-step values besides total, ce, distill
        if self.default_loss:
            return
        self.extra_names = [f"term.{t.name}" for t in cfg.loss.terms]
        if cfg.loss.weighting == "influence":
            self.extra_names += ["influence_mean", "influence_std", "influence_negative"]
        infos = self._model_infos()
        consumers = consumers_of(self.index, cfg.num_peers, cfg.exchange.topology)
        student: list[str] = []
        publish: list[str] = []
        teacher: dict[int, list[str]] = {j: [] for j in self.teacher_indices}
        for tc in cfg.loss.terms:
            term = LOSS_TERMS[tc.name]
            plans = [self._plan(term, tc, infos, self.index, j) for j in self.teacher_indices]
            self.plans[tc.name] = plans
            projections: list[nn.Module | None] = []
            for j, plan in zip(self.teacher_indices, plans):
                with torch.random.fork_rng(devices=[]):  # initialised from the peer's seed, in any process
                    torch.manual_seed(mix_seed(self.seed, 17, j, len(self.heads)))
                    proj = term.projections(plan)
                if proj is not None:
                    self.heads[f"{tc.name}_{j}"] = proj
                projections.append(proj)
                student += plan.student_taps
                teacher[j] += plan.teacher_taps
            self.projections[tc.name] = projections
            for c in consumers:
                publish += self._plan(term, tc, infos, c, self.index).teacher_taps
        self.heads.to(self.device)
        self.student_taps = tuple(dict.fromkeys(student))
        self.publish_taps = tuple(dict.fromkeys(publish))
        self.teacher_taps = {j: tuple(dict.fromkeys(names)) for j, names in teacher.items()}

    def _plan(self, term, tc, infos: dict[int, ModelInfo | None], student: int, teacher: int) -> TermPlan:
        try:  # infos are None when only the logit term is used: it reads no taps
            return term.plan(tc, infos[student], infos[teacher])
        except ValueError as e:
            raise ConfigError("loss.terms", tc.name, f"terms these peers can pair: {e}") from None

    def _model_infos(self) -> dict[int, ModelInfo | None]:
        """Every peer's ModelInfo (built on the meta device: shapes only), when a term reads taps."""
        if all(t.name == "logits" for t in self.cfg.loss.terms):
            return {i: None for i in range(self.cfg.num_peers)}
        example = self.task.example_input(self.dataset)
        out: dict[int, ModelInfo | None] = {}
        for i, pc in enumerate(self.cfg.peers):
            with torch.device("meta"):
                model = build_model(
                    pc.model, self.task.input_shape(self.dataset), self.dataset.num_classes, model_args=pc.model_args
                )
            try:
                out[i] = model_info(model, example, f"peers.{i}.model")
            except ValueError as e:
                raise ConfigError(
                    f"peers.{i}.model", pc.model, f"a model with named layers for loss.terms: {e}"
                ) from None
        return out

    def _build(self, index: int, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # initialise from the peer's seed without touching global RNG
            torch.manual_seed(seed)
            pc = self.cfg.peers[index]
            model = build_model(
                pc.model,
                self.task.input_shape(self.dataset),
                self.dataset.num_classes,
                model_args=pc.model_args,
                pretrained=pc.pretrained,
            )
        model = model.to(self.device)
        if self.device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            model = model.to(memory_format=torch.channels_last)
        return model

    @property
    def _channels_last(self) -> bool:
        return self.device.type == "cuda"

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _step_rng(self, step: int, salt: int):
        """Dropout and other random layers draw from (peer seed, step): identical in any process. A model that
        draws nothing keeps torch's generator untouched without saving and restoring its state every step."""
        if not self._random_forward:
            yield
            return
        cuda = self.device.type == "cuda"
        # Each rank of a data-parallel peer draws its own dropout masks (rank 0's are a one-worker peer's).
        seed = mix_seed(self.seed, step, salt) if self.rank == 0 else mix_seed(self.seed, step, salt, self.rank)
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            # The generators the forward uses, seeded directly: torch.manual_seed also seeds every CUDA device,
            # and in a process that has not initialised CUDA it defers that with the caller's formatted stack
            # (traceback.format_stack) on every call: 0.08 ms from a shallow stack, more from a deep one, per step.
            torch.default_generator.manual_seed(seed)
            if cuda:
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                torch.cuda.default_generators[index].manual_seed(seed)
            yield

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last and x.ndim == 4 else x

    # -- one training step ---------------------------------------------------------------------

    def forward(self, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward pass on the batch of `step` (default: the next one). Returns (sample_ids, logits detached)."""
        step = self.step if step is None else step
        if step != self.step:
            raise ValueError(f"peer {self.name}: forward for step {step} but the next step is {self.step}")
        ids, x, y = self.batch(step)
        x = self._input(x)
        self.model.train()
        with self._step_rng(step, 0), self._autocast(), self._taps(self.student_taps + self.publish_taps) as taps:
            logits = self.model(x)
        self._pending = _Pending(step, x, y, logits, dict(taps))
        return ids, logits.detach()

    def _taps(self, names: tuple[str, ...], model: nn.Module | None = None):
        """Records the named taps of `model` (default: this peer's) during the forward passes inside."""
        if not names:
            return contextlib.nullcontext({})
        return TapRecorder(self.module if model is None else model, names)

    def published_taps(self) -> dict[str, torch.Tensor]:
        """The taps this peer's consumers read, from the pending forward pass (detached)."""
        assert self._pending is not None, "call forward() first"
        return {n: self._pending.taps[n].detach() for n in self.publish_taps}

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample_ids, inputs, targets) of this rank's part of the global batch of `step`. The whole batch is
        made first, so augmentation draws exactly what one worker would (W workers = one, to float tolerance)."""
        ids, x, y = self.data.batch(step)
        if self.world_size == 1:
            return ids, x, y
        return ids[self.part], x[self.part], y[self.part]

    def batch_ids(self, step: int) -> torch.Tensor:
        """The sample ids this rank trains on at `step` (what its teachers' shards must cover)."""
        ids = self.data.batch_ids(step)
        return ids if self.world_size == 1 else ids[self.part]

    @contextlib.contextmanager
    def _norm_stats_kept(self, model: nn.Module | None = None):
        """Train-mode forward passes inside leave BatchNorm's running statistics as they were."""
        model = self.module if model is None else model
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [
            (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms
        ]
        try:
            for m in norms:
                m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
            yield
        finally:
            for m, (momentum, tracked) in zip(norms, saved):
                m.momentum = momentum
                if tracked is not None and m.num_batches_tracked is not None:
                    m.num_batches_tracked.copy_(tracked)

    def lookahead_logits(self, batch_step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (and the taps consumers read) of the current weights on the batch of a later step
        (bounded-staleness DML publishes these): train mode like the training forward, but no grad and
        BatchNorm statistics untouched."""
        ids, x, _ = self.batch(batch_step)
        self.module.train()
        kept, rng = self._norm_stats_kept(), self._step_rng(batch_step, 1)
        with torch.no_grad(), kept, rng, self._autocast(), self._taps(self.publish_taps) as taps:
            logits = self.module(self._input(x)).float()
        return ids, logits, dict(taps)

    def local_teacher_signals(self) -> list[TeacherOutput]:
        """The local frozen teachers' logits and taps on this step's batch (checkpoint mode), by teacher index."""
        assert self._pending is not None, "call forward() first"
        x = self._pending.x
        out = []
        with torch.no_grad(), self._autocast():
            for j in sorted(self.teachers):
                model = self.teachers[j].model
                with self._taps(self.teacher_taps.get(j, ()), model) as taps:
                    logits = model(x).float()
                out.append(TeacherOutput(j, logits, dict(taps)))
        return out

    def _as_teachers(self, teachers: Sequence[TeacherOutput | TeacherSignal]) -> list[TeacherOutput]:
        """Bare logits (tests, callers of the logit-only API) become TeacherOutputs in teacher-index order."""
        return [
            t if isinstance(t, TeacherOutput) else TeacherOutput(j, t)
            for j, t in zip(self.teacher_indices or range(len(teachers)), teachers)
        ]

    def train_step(
        self,
        teachers: Sequence[TeacherOutput | TeacherSignal] | None,
        sample_weights: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> StepStats:
        """Loss on the pending forward pass given the teachers' signals, backward, optimiser and LR step.

        sample_weights: (B,) for every teacher, or one (B,) per teacher (influence weighting)."""
        assert self._pending is not None, "call forward() first"
        pending = self._pending
        self._pending = None
        step, y, logits = pending.step, pending.y, pending.logits
        mask = self.task.valid(y)
        if self.default_loss:
            bare = [t.logits if isinstance(t, TeacherOutput) else t for t in teachers] if teachers else None
            single = sample_weights if sample_weights is None or isinstance(sample_weights, torch.Tensor) else None
            parts = total_loss(logits, y, bare, self.cfg.loss, step, single, mask)
            total, ce, distill_value, alpha = parts.total, parts.ce, parts.distill, parts.alpha
            extras: list[torch.Tensor] = []
        else:
            total, ce, distill_value, alpha, extras = self._terms_loss(pending, teachers, sample_weights, mask)
        distill = distill_value if distill_value is not None else torch.zeros_like(total)
        values = torch.stack([total, ce, distill, *extras]).detach().float()  # (3 + extras,), stays on the device
        self._device_losses.append((step, values, distill_value is not None))
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.world_size > 1 and len(self.heads):  # projections live outside DDP: average their gradients
            self._all_reduce_mean([p.grad for p in self.heads.parameters() if p.grad is not None])
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step = step + 1
        return StepStats(step, alpha, lr, len(teachers or ()))

    def _terms_loss(self, pending: _Pending, teachers, sample_weights, mask):
        """(total, ce, distill or None, alpha, extras) for a job with loss.terms or weighting (LossConfig)."""
        loss = self.cfg.loss
        ce, targets = cross_entropy(pending.logits, pending.y, mask)
        nan = torch.full((), float("nan"), device=ce.device)
        alpha = loss.alpha if (teachers and pending.step >= loss.burn_in) else 0.0
        stats = [nan, nan, nan] if loss.weighting == "influence" else []
        if alpha == 0.0 or not teachers:
            return ce, ce, None, 0.0, [nan] * len(loss.terms) + stats
        outputs = self._as_teachers(teachers)
        weights = None
        if sample_weights is not None:
            weights = (
                [sample_weights] * len(outputs) if isinstance(sample_weights, torch.Tensor) else list(sample_weights)
            )
            stats = list(weight_stats(torch.cat([w.reshape(-1) for w in weights])).unbind())
        values = distill_terms(
            loss,
            self.plans,
            self.projections,
            StudentOutput(pending.logits, pending.taps),
            outputs,
            self._example_positions(pending, targets),
            weights,
        )
        total = (1 - alpha) * ce + alpha * values.total
        return total, ce, values.total, alpha, [values.terms[t.name] for t in loss.terms] + stats

    def _example_positions(self, pending: _Pending, targets: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, P) the valid positions of each example of the pending batch, or None when all are valid."""
        mask = self.task.valid(pending.y)
        targets = flat_targets(pending.y, mask) if targets is None else targets
        valid = position_mask(pending.y, mask, targets)
        return None if valid is None else valid.reshape(pending.logits.shape[0], -1)

    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors across the ranks of this data-parallel peer, in place, in one collective."""
        import torch.distributed as dist

        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    # -- influence-weighted distillation (LGTM) -------------------------------------------------

    def validation_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the held-out validation batch of `step` (inputs, targets)."""
        x, y = self.data.validation_batch(step)
        return (x, y) if self.world_size == 1 else (x[self.part], y[self.part])

    def measure_influence(self, step: int, teachers: Sequence[TeacherOutput]) -> torch.Tensor:
        """(B_part,) this peer's distillation influence on each example of its pending batch, normalised to
        mean |w| = 1 over the whole batch (all ranks) (codistill.losses.weighting; LGTM)."""
        assert self._pending is not None, "call forward() first"
        pending, loss = self._pending, self.cfg.loss
        val_x, val_y = self.validation_batch(step)
        valid = self._example_positions(pending)

        def validation_loss() -> torch.Tensor:
            with self._norm_stats_kept(), self._step_rng(step, 2), self._autocast():
                val_logits = self.module(self._input(val_x))
            return cross_entropy(val_logits, val_y, self.task.valid(val_y))[0]

        def per_example(moved: Mapping[str, torch.Tensor]) -> torch.Tensor:
            kept, rng = self._norm_stats_kept(), self._step_rng(step, 3)
            with kept, rng, self._autocast(), self._taps(self.student_taps) as taps:
                out = functional_call(self.module, dict(moved), (pending.x,))
            return per_example_objective(
                loss, self.plans, self.projections, StudentOutput(out, dict(taps)), teachers, valid
            )

        self.module.train()
        reduce = self._all_reduce_mean if self.world_size > 1 else None
        params = dict(self.module.named_parameters())
        raw = distillation_influence(params, validation_loss, per_example, loss.influence_eps, reduce)
        self.influence = self._normalized(raw)
        return self.influence

    def teacher_influence(self, j: int) -> torch.Tensor:
        """(B_part,) the influence of distilling from this peer on its student j, estimated here on the local frozen
        copy of j (checkpoint mode): j's validation gradient, and j's logit divergence toward this peer's pending
        logits at j's weights moved along it. Normalised as `measure_influence`."""
        assert self._pending is not None, "call forward() first"
        pending, loss = self._pending, self.cfg.loss
        copy = self.teachers[j].model
        val_x, val_y = self.validation_batch(pending.step)
        valid = self._example_positions(pending)
        mine = [TeacherOutput(self.index, pending.logits.detach().float())]
        logit_only = dataclasses.replace(loss, terms=(TermConfig(),), teacher_reduce="each")

        def validation_loss() -> torch.Tensor:
            with self._autocast():
                return cross_entropy(copy(self._input(val_x)), val_y, self.task.valid(val_y))[0]

        def per_example(moved: Mapping[str, torch.Tensor]) -> torch.Tensor:
            with self._autocast():
                out = functional_call(copy, dict(moved), (pending.x,))
            return per_example_objective(
                logit_only, {"logits": [TermPlan()]}, {"logits": [None]}, StudentOutput(out), mine, valid
            )

        copy.requires_grad_(True)
        try:
            reduce = self._all_reduce_mean if self.world_size > 1 else None
            params = dict(copy.named_parameters())
            raw = distillation_influence(params, validation_loss, per_example, loss.influence_eps, reduce)
        finally:
            copy.requires_grad_(False)
        return self._normalized(raw)

    def _normalized(self, raw: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return normalized(raw)
        import torch.distributed as dist

        total_abs = raw.abs().sum().reshape(1)
        dist.all_reduce(total_abs)
        return normalized(raw, total_abs[0], raw.numel() * self.world_size)

    # -- losses, read once per round ----------------------------------------------------------

    def check_losses(self) -> None:
        """Read this process's losses of the steps since the last read from the device, at once, and stop at a
        non-finite one. No collective: rank 0 of a data-parallel peer calls it alone before publishing.

        Called wherever the peer's state leaves the device anyway (evaluation, weights published or saved), so a
        model trained past a NaN is never evaluated, published or written, yet no step waits for the host."""
        if self._non_finite is not None:
            raise NonFiniteLossError(self._non_finite)
        unread = self._device_losses[self._checked :]
        if not unread:
            return
        rows = torch.stack([t for _, t, _ in unread]).tolist()  # (S, 3 + extras): the one device-to-host read
        self._checked = len(self._device_losses)
        self._read_losses.extend(self._step_losses(unread, rows))

    def take_losses(self) -> list[StepLoss]:
        """The losses of the steps since the last call, oldest first (raises NonFiniteLossError on a NaN or inf).
        A data-parallel peer's are the means over its ranks (equal parts of the batch): every rank calls this."""
        if self.world_size == 1:
            self.check_losses()
            out = self._read_losses
        else:
            import torch.distributed as dist

            if self._non_finite is not None:
                raise NonFiniteLossError(self._non_finite)
            stacked = torch.stack([t for _, t, _ in self._device_losses]) if self._device_losses else None
            stacked = stacked if stacked is not None else torch.zeros(0, 3 + len(self.extra_names), device=self.device)
            dist.all_reduce(stacked)  # every rank holds the same steps: their losses are summed in one call
            out = self._step_losses(self._device_losses, (stacked / self.world_size).tolist())
        self._device_losses, self._read_losses, self._checked = [], [], 0
        return out

    def _step_losses(self, steps: list[tuple[int, torch.Tensor, bool]], rows: list[list[float]]) -> list[StepLoss]:
        out = []
        for (step, _, has_distill), (total, ce, distill, *extras) in zip(steps, rows):
            if not math.isfinite(total):
                shown = distill if has_distill else None
                self._non_finite = (
                    f"peer {self.name}: non-finite loss {total} at step {step} (ce={ce}, distill={shown}); "
                    f"nothing trained from it on is kept. Lower optim.lr or loss.temperature, or check the data."
                )
                raise NonFiniteLossError(self._non_finite)
            terms = dict(zip(self.extra_names, extras)) if self.extra_names else None
            out.append(StepLoss(step, total, ce, distill if has_distill else None, terms))
        return out

    # -- teachers (checkpoint mode) ------------------------------------------------------------

    def set_teacher(self, source_index: int, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Load a published checkpoint of peer `source_index` as a frozen local teacher."""
        teacher = self.teachers.get(source_index)
        if teacher is None:
            model = self._build(source_index, seed=0)
            model.eval().requires_grad_(False)
            teacher = self.teachers[source_index] = _Teacher(model, -1)
        teacher.model.load_state_dict(dict(weights))  # copies: the (read-only) arrays are not kept
        teacher.version = version

    def teacher_versions(self) -> dict[int, int]:
        return {j: t.version for j, t in self.teachers.items()}

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's weights on the CPU (what a checkpoint exchange publishes)."""
        self.check_losses()
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}

    # -- evaluation and training checkpoints ---------------------------------------------------

    def evaluate(self) -> EvalResult:
        """Streamed over the evaluation set: only what the round's metrics need leaves this peer
        (codistill.tasks.Task.evaluate)."""
        self.check_losses()
        self.module.eval()
        with torch.no_grad(), self._autocast():
            return self.task.evaluate(
                lambda x: self.module(self._input(x)), self.data.test_batches(), self.data.num_test_positions, self.step
            )

    def training_state(self) -> dict[str, Any]:
        """Everything needed to resume this peer exactly (loadable with torch.load(weights_only=True))."""
        return {
            "step": self.step,
            "model": self.weights(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "heads": {k: v.detach().to("cpu", copy=True) for k, v in self.heads.state_dict().items()},
        }

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.heads.load_state_dict(state.get("heads", {}))  # the loss terms' projections
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self._pending = None
        self._device_losses, self._read_losses, self._checked, self._non_finite = [], [], 0, None
