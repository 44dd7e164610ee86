"""Peer: one model being trained, with its optimiser, LR schedule, data stream and local teachers.

Plain PyTorch, no Ray. A training step is split in two so that N peers need only N forward passes
in mutual learning (not N^2): `forward(step)` computes the peer's logits on its batch (kept with
their graph, and returned detached for publishing), then `train_step(teacher_logits)` adds the loss
and updates. In checkpoint mode the teachers are local frozen copies of other peers
(`set_teacher`), run by `local_teacher_logits()` on the peer's own batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from codistill.config import RunConfig
from codistill.data import Dataset, PeerData, mix_seed
from codistill.errors import CodistillError, ConfigError
from codistill.exchange.topology import part_bounds
from codistill.losses import total_loss
from codistill.losses.distill import TeacherSignal
from codistill.models import build_model
from codistill.peer.optim import make_optimizer, make_scheduler
from codistill.registry import lookup
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
    def __init__(
        self,
        cfg: RunConfig,
        index: int,
        dataset: Dataset,
        device: torch.device | str | None = None,
        *,
        shard_index: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg = cfg
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
        # An exchange that moves per-batch signals (logits) needs one batch order from the job seed;
        # otherwise each peer has its own order (and, with shard: disjoint, its own part of the data).
        shared_order = lookup("codistill.exchange", "EXCHANGES")[cfg.exchange.mode].shared_batch_order
        disjoint = cfg.data.shard == "disjoint"
        self.data = PeerData(
            dataset,
            cfg.data,
            order_seed=cfg.seed if shared_order else self.seed,
            aug_seed=self.seed,
            shard_seed=cfg.seed,
            shard_index=index if shard_index is None else shard_index,
            num_shards=cfg.num_peers if disjoint else 1,
            device=self.device,
        )
        self.total_steps = total_steps(cfg, self.data.steps_per_epoch)
        self.module = self._build(index, seed=self.seed)  # the model itself: weights, evaluation, checkpoints
        self.model: nn.Module = self.module  # what the training step calls: DDP around the module when W > 1
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            if self.device.type == "cuda":  # batch statistics over the global batch (CUDA only in torch)
                self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        oc = cfg.peer_optim(index)
        self.optimizer = make_optimizer(list(self.module.parameters()), oc)
        self.scheduler = make_scheduler(self.optimizer, oc, self.total_steps)
        self.step = 0  # completed training steps
        self.teachers: dict[int, _Teacher] = {}
        self._pending: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # step, x, y, logits
        # Losses stay on the device until something reads the peer anyway (GPU steps never wait for the host):
        # per step (step, (3,) [total, ce, distill] tensor, has_distill), then floats in _read_losses.
        self._device_losses: list[tuple[int, torch.Tensor, bool]] = []
        self._read_losses: list[StepLoss] = []
        self._checked = 0  # how many of _device_losses check_losses has read
        self._non_finite: str | None = None  # once set, every read raises it: the weights past it are not kept

    # -- construction ------------------------------------------------------------------------

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
        """Dropout and other random layers draw from (peer seed, step): identical in any process."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # Each rank of a data-parallel peer draws its own dropout masks (rank 0's are a one-worker peer's).
            torch.manual_seed(
                mix_seed(self.seed, step, salt) if self.rank == 0 else mix_seed(self.seed, step, salt, self.rank)
            )
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
        with self._step_rng(step, 0), self._autocast():
            logits = self.model(x)
        self._pending = (step, x, y, logits)
        return ids, logits.detach()

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

    def lookahead_logits(self, batch_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the current weights on the batch of a later step (bounded-staleness DML publishes
        these): train mode like the training forward, but no grad and BatchNorm statistics untouched."""
        ids, x, _ = self.batch(batch_step)
        norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [
            (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms
        ]
        self.module.train()
        try:
            for m in norms:
                m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
            with torch.no_grad(), self._step_rng(batch_step, 1), self._autocast():
                logits = self.module(self._input(x)).float()
        finally:
            for m, (momentum, tracked) in zip(norms, saved):
                m.momentum = momentum
                if tracked is not None and m.num_batches_tracked is not None:
                    m.num_batches_tracked.copy_(tracked)
        return ids, logits

    def local_teacher_logits(self) -> list[torch.Tensor]:
        """The local frozen teachers' logits on this step's batch (checkpoint mode), in teacher-index order."""
        assert self._pending is not None, "call forward() first"
        _, x, _, _ = self._pending
        out = []
        with torch.no_grad(), self._autocast():
            for j in sorted(self.teachers):
                out.append(self.teachers[j].model(x).float())
        return out

    def train_step(
        self, teacher_logits: Sequence[TeacherSignal] | None, sample_weights: torch.Tensor | None = None
    ) -> StepStats:
        """Loss on the pending forward pass given the teachers' logits, backward, optimiser and LR step."""
        assert self._pending is not None, "call forward() first"
        step, _x, y, logits = self._pending
        self._pending = None
        parts = total_loss(logits, y, teacher_logits, self.cfg.loss, step, sample_weights, self.task.valid(y))
        distill = parts.distill if parts.distill is not None else torch.zeros_like(parts.total)
        terms = torch.stack([parts.total, parts.ce, distill]).detach().float()  # (3,), stays on the device
        self._device_losses.append((step, terms, parts.distill is not None))
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step = step + 1
        return StepStats(step, parts.alpha, lr, len(teacher_logits or ()))

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
        rows = torch.stack([t for _, t, _ in unread]).tolist()  # (S, 3): the one device-to-host read
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
            stacked = stacked if stacked is not None else torch.zeros(0, 3, device=self.device)
            dist.all_reduce(stacked)  # every rank holds the same steps: their losses are summed in one call
            out = self._step_losses(self._device_losses, (stacked / self.world_size).tolist())
        self._device_losses, self._read_losses, self._checked = [], [], 0
        return out

    def _step_losses(self, steps: list[tuple[int, torch.Tensor, bool]], rows: list[list[float]]) -> list[StepLoss]:
        out = []
        for (step, _, has_distill), (total, ce, distill) in zip(steps, rows):
            if not math.isfinite(total):
                shown = distill if has_distill else None
                self._non_finite = (
                    f"peer {self.name}: non-finite loss {total} at step {step} (ce={ce}, distill={shown}); "
                    f"nothing trained from it on is kept. Lower optim.lr or loss.temperature, or check the data."
                )
                raise NonFiniteLossError(self._non_finite)
            out.append(StepLoss(step, total, ce, distill if has_distill else None))
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
        }

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self._pending = None
        self._device_losses, self._read_losses, self._checked, self._non_finite = [], [], 0, None
