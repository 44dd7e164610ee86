"""Peer: one model being trained, with its optimiser, LR schedule, data stream and local teachers.

Plain PyTorch, no Ray. A training step is split in two so that N peers need only N forward passes
in mutual learning (not N^2): `forward(step)` computes the peer's logits on its batch (kept with
their graph, and returned detached for publishing), then `train_step(teacher_logits)` adds the loss
and updates. In checkpoint mode the teachers are local frozen copies of other peers
(`set_teacher`), run by `local_teacher_signals()` on the peer's own batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from codistill.config import RunConfig
from codistill.data import Dataset, mix_seed
from codistill.errors import ConfigError
from codistill.losses import total_loss
from codistill.losses.distill import TeacherSignal
from codistill.losses.terms import StudentOutput, TeacherOutput
from codistill.models import build_model
from codistill.models.adapters import adapter_state, add_adapter, has_adapter, load_adapter_state, share_base
from codistill.models.randomness import draws_random_numbers
from codistill.models.taps import TapRecorder
from codistill.models.units import shard_units
from codistill.peer.batches import PeerData
from codistill.peer.forward_context import norm_stats_kept, seeded_generators
from codistill.peer.ledger import LossLedger, NonFiniteLossError, StepLoss
from codistill.peer.local_teachers import LocalTeachers
from codistill.peer.optim import make_optimizer, make_scheduler
from codistill.peer.sharding import full_state_dict, load_full_state_dict, shard_model
from codistill.peer.start import PeerStart
from codistill.peer.term_plan import LossPlan, plan_loss
from codistill.peer.topology import consumers_of, part_bounds, teachers_of
from codistill.tasks import EvalResult, task_of

__all__ = ["EvalResult", "NonFiniteLossError", "Peer", "StepLoss", "StepStats", "resolve_device", "total_steps"]


@dataclass(frozen=True)
class StepStats:
    """What a step knows without reading the device (its losses come later, from `Peer.take_losses`)."""

    step: int
    alpha: float
    lr: float
    num_teachers: int


@dataclass
class _Pending:
    """A training forward pass waiting for its loss."""

    step: int
    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor
    taps: dict[str, torch.Tensor]


BASE_SALT = 0xBA5E


def base_seed(job_seed: int) -> int:
    """The initialisation seed of an adapter peer's frozen base (the same for every peer of the job)."""
    return mix_seed(job_seed, BASE_SALT)


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
            rank=rank,
            world_size=world_size,
            decoder=start.decoder,
        )
        self.total_steps = total_steps(cfg, self.data.steps_per_epoch)
        pc = cfg.peers[index]
        # strategy fsdp: the module itself is sharded in place (codistill.peer.sharding); its teachers are too
        self.sharded = pc.strategy == "fsdp" and world_size > 1
        # the model itself: weights, evaluation, checkpoints (a sharded one stays on the host until each unit is
        # moved to the device as it is sharded: the whole model is never on the device at once)
        self.module = self._build(index, seed=self.seed, on_device=not self.sharded)
        self.model: nn.Module = self.module  # what the training step calls: DDP around the module when W > 1
        # a model without dropout (or other random layers) needs no seeded generator around each forward
        self._random_forward = draws_random_numbers(self.module)
        if self.sharded:
            self.module = self.model = shard_model(
                self.module, self.device, bf16=self.amp, activation_checkpointing=pc.activation_checkpointing
            )
        elif world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            if self.device.type == "cuda":  # batch statistics over the global batch (CUDA only in torch)
                self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        self.default_loss = cfg.loss.default_terms  # the loss exactly as before terms: total_loss
        self.teacher_indices = teachers_of(index, cfg.num_peers, cfg.exchange.topology)
        consumers = consumers_of(index, cfg.num_peers, cfg.exchange.topology)
        self.loss_plan: LossPlan = plan_loss(
            cfg, index, self.teacher_indices, consumers, self.task, dataset, self.seed, self.device
        )
        plan = self.loss_plan  # what its terms read, kept here for the forward passes, exchanges and tests
        self.heads, self.student_taps, self.publish_taps = plan.heads, plan.student_taps, plan.publish_taps
        self.teacher_taps, self.extra_names = plan.teacher_taps, plan.extra_names
        oc = cfg.peer_optim(index)
        trained = [p for p in self.module.parameters() if p.requires_grad]  # an adapter peer's base is frozen
        self.optimizer = make_optimizer(trained + list(self.heads.parameters()), oc)
        self.scheduler = make_scheduler(self.optimizer, oc, self.total_steps)
        self.step = 0  # completed training steps
        self.teachers = LocalTeachers(self._build_teacher, load_full_state_dict if self.sharded else self._load_teacher)
        self._pending: _Pending | None = None
        self.influence: torch.Tensor | None = None  # this step's own normalised influence weights (B_part,)
        self.ledger = LossLedger(self.name, self.loss_plan.extra_names, world_size, self.device)

    # -- construction ------------------------------------------------------------------------

    def _build(self, index: int, seed: int, on_device: bool = True) -> nn.Module:
        pc = self.cfg.peers[index]
        with torch.random.fork_rng(devices=[]):  # initialise from the peer's seed without touching global RNG
            # An adapter peer's frozen base comes from the job's seed: the same base for every peer of that model
            # (what makes publishing only the adapters enough, and one base per process possible).
            torch.manual_seed(base_seed(self.cfg.seed) if pc.adapter is not None else seed)
            model = build_model(
                pc.model,
                self.task.input_shape(self.dataset),
                self.dataset.num_classes,
                model_args=pc.model_args,
                pretrained=pc.pretrained,
            )
            if pc.adapter is not None:
                torch.manual_seed(seed)  # the adapters' own initialisation: the peer's
                model = add_adapter(model, pc.adapter)
        if not on_device:
            return model
        model = model.to(self.device)
        if self.device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            model = model.to(memory_format=torch.channels_last)
        return model

    def _build_teacher(self, index: int) -> nn.Module:
        """A frozen local copy of peer `index` (checkpoint mode): a sharded peer shards it the same way, so each
        rank holds 1/W of it (a teacher with no units to shard, e.g. an MLP, is kept whole on every rank). A teacher
        with this peer's base and adapter layout shares this peer's base tensors: one base per process."""
        if self._same_base(index):
            return share_base(self.module)
        model = self._build(index, seed=0, on_device=False)
        if self.sharded and shard_units(model):
            return shard_model(model, self.device, bf16=self.amp, frozen=True)
        return model.to(self.device)

    def _same_base(self, index: int) -> bool:
        """Whether peer `index` is an adapter peer on this peer's frozen base, with the same adapter layout."""
        own, other = self.cfg.peers[self.index], self.cfg.peers[index]
        same = ("model", "model_args", "pretrained", "adapter")
        return own.adapter is not None and all(getattr(own, f) == getattr(other, f) for f in same)

    def _load_teacher(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        """Published weights into a local teacher: an adapter peer publishes its adapters only."""
        if has_adapter(model):
            load_adapter_state(model, weights)
        else:
            model.load_state_dict(dict(weights))

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _step_rng(self, step: int, salt: int):
        """Dropout and other random layers draw from (peer seed, step): identical in any process. A model that
        draws nothing keeps torch's generator untouched without saving and restoring its state every step."""
        if not self._random_forward:
            return contextlib.nullcontext()
        # Each rank of a data-parallel peer draws its own dropout masks (rank 0's are a one-worker peer's).
        seed = mix_seed(self.seed, step, salt) if self.rank == 0 else mix_seed(self.seed, step, salt, self.rank)
        return seeded_generators(seed, self.device)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = self.device.type == "cuda"
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x

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
        if self.world_size == 1 or self.data.streamed is not None:  # a rank's stream is its part already
            return ids, x, y
        return ids[self.part], x[self.part], y[self.part]

    def batch_ids(self, step: int) -> torch.Tensor:
        """The sample ids this rank trains on at `step` (what its teachers' shards must cover)."""
        ids = self.data.batch_ids(step)
        return ids if self.world_size == 1 or self.data.streamed is not None else ids[self.part]

    def lookahead_logits(self, batch_step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (and the taps consumers read) of the current weights on the batch of a later step
        (bounded-staleness DML publishes these): train mode like the training forward, but no grad and
        BatchNorm statistics untouched."""
        ids, x, _ = self.batch(batch_step)
        self.module.train()
        kept, rng = norm_stats_kept(self.module), self._step_rng(batch_step, 1)
        with torch.no_grad(), kept, rng, self._autocast(), self._taps(self.publish_taps) as taps:
            logits = self.module(self._input(x)).float()
        return ids, logits, dict(taps)

    def local_teacher_signals(self) -> list[TeacherOutput]:
        """The local frozen teachers' logits and taps on this step's batch (checkpoint mode), by teacher index."""
        assert self._pending is not None, "call forward() first"
        return self.teachers.signals(
            self._pending.x, self._autocast(), lambda j, model: self._taps(self.teacher_taps.get(j, ()), model)
        )

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
            student = StudentOutput(logits, pending.taps)
            outputs = self._as_teachers(teachers) if teachers else None
            terms = self.loss_plan.loss(self.cfg.loss, step, student, y, mask, outputs, sample_weights)
            total, ce, distill_value, alpha, extras = terms.total, terms.ce, terms.distill, terms.alpha, terms.extras
        distill = distill_value if distill_value is not None else torch.zeros_like(total)
        values = torch.stack([total, ce, distill, *extras]).detach().float()  # (3 + extras,), stays on the device
        self.ledger.record(step, values, distill_value is not None)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.world_size > 1 and len(self.heads):  # projections live outside DDP: average their gradients
            self._all_reduce_mean([p.grad for p in self.heads.parameters() if p.grad is not None])
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step = step + 1
        return StepStats(step, alpha, lr, len(teachers or ()))

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank of this peer (collective; what its ranks must agree on)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

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

    # -- losses, read once per round (codistill.peer.ledger) ----------------------------------------

    def check_losses(self) -> None:
        """Read the losses of the steps since the last read from the device and stop at a non-finite one
        (LossLedger.check): wherever the peer's state leaves the device."""
        self.ledger.check()

    def take_losses(self) -> list[StepLoss]:
        """The losses of the steps since the last call, oldest first (LossLedger.take; every rank calls it)."""
        return self.ledger.take()

    @property
    def _device_losses(self) -> list[tuple[int, torch.Tensor, bool]]:
        return self.ledger.device_losses

    @property
    def _read_losses(self) -> list[StepLoss]:
        return self.ledger.read_losses

    # -- teachers (checkpoint mode) ------------------------------------------------------------

    def set_teacher(self, source_index: int, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Load a published checkpoint of peer `source_index` as a frozen local teacher."""
        self.teachers.load(source_index, version, weights)

    def set_teacher_from(self, source_index: int, version: int, fill: Callable[[dict[str, Any]], None]) -> None:
        """Load a teacher whose weights `fill` writes in place (LocalTeachers.load_with: DCP shards)."""
        self.teachers.load_with(source_index, version, fill)

    def state_nbytes(self, dtype_bytes: int = 4) -> int:
        """The whole model's floating-point weights at `dtype_bytes` each (a sharded peer's: all ranks' together)."""
        return sum(t.numel() * dtype_bytes for t in self.module.state_dict().values() if t.is_floating_point())

    def teacher_versions(self) -> dict[int, int]:
        return self.teachers.versions()

    def published_weights(self) -> dict[str, torch.Tensor]:
        """What a checkpoint exchange publishes (one process, not sharded): the whole model's weights, or an adapter
        peer's adapters only (its consumers hold the same frozen base)."""
        self.check_losses()  # weights trained past a NaN are never published
        if self.cfg.peers[self.index].adapter is not None:
            return adapter_state(self.module)
        return self.module.state_dict()

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's full weights on the CPU (what a checkpoint exchange publishes, and the final weights). A
        sharded peer gathers them one parameter at a time: every rank must call it; rank 0 gets them, the others {}."""
        self.check_losses()
        if self.sharded:
            return full_state_dict(self.module, keep=self.rank == 0)
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}

    # -- evaluation and training checkpoints ---------------------------------------------------

    def evaluate(self) -> EvalResult:
        """Streamed over the evaluation set: only what the round's metrics need leaves this peer
        (codistill.tasks.Task.evaluate)."""
        self.check_losses()
        self.module.eval()
        with torch.no_grad(), self._autocast():
            forward = lambda x: self.module(self._input(x))
            result = self.task.evaluate(forward, self.data.test_batches(), self.data.num_test_positions, self.step)
            result.train = self.task.score_training(forward, self.data.train_eval_batches())
        return result

    def training_state(self) -> dict[str, Any]:
        """Everything needed to resume this peer exactly (loadable with torch.load(weights_only=True)). A sharded
        peer's model, optimizer and heads are not in it: they are `sharded_state()`, saved by every rank."""
        if self.sharded:
            return {"step": self.step, "scheduler": self.scheduler.state_dict()}
        return {
            "step": self.step,
            "model": self.weights(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "heads": {k: v.detach().to("cpu", copy=True) for k, v in self.heads.state_dict().items()},
        }

    def sharded_state(self) -> dict[str, Any]:
        """A sharded peer's model, loss-term projections and optimizer state as torch.distributed.checkpoint saves
        and loads them: {"model": {name: DTensor}, "optim": by parameter name}, this rank's shards (collective: the
        optimizer's state is made here before its first step, so a load has tensors to fill)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.check_losses()
        model_state, optim_state = get_state_dict(self._stateful(), self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_sharded_state(self, state: Mapping[str, Any]) -> None:
        """Load what `sharded_state()` gave, filled by a checkpoint (collective)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self._stateful(), self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

    def _stateful(self) -> nn.Module:
        # the model and the loss terms' projections under one module: every parameter of the optimizer has a name
        return nn.ModuleDict({"model": self.module, "heads": self.heads})

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Go on from `training_state()` (a sharded peer: and `load_sharded_state` of the same step)."""
        if not self.sharded:
            self.module.load_state_dict(state["model"])
            self.heads.load_state_dict(state.get("heads", {}))  # the loss terms' projections
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self._pending = None
        self.ledger.clear()
