"""The Exchange contract: what one peer's step does with a board.

Engines call, for each step k of each peer, `start_step` (forward pass, publish what others need),
`teacher_logits` (pull or compute the teachers' signals; may wait) and `end_step` (publish weights),
then `finish` once after the last step. They never branch on the mode: what a mode decides
elsewhere is declared here as class attributes (whether peers share one batch order, how many
weight versions a board keeps, what the job's staleness promise is).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from codistill.config import ExchangeConfig, RunConfig
from codistill.exchange.board import Board
from codistill.exchange.stats import ExchangeStats
from codistill.losses.weighting import WEIGHTINGS
from codistill.peer.influence import measure_influence
from codistill.peer.topology import consumers_of, rank_slot, teachers_of

if TYPE_CHECKING:
    import torch

    from codistill.losses.distill import TeacherSignal
    from codistill.losses.terms import TeacherOutput
    from codistill.peer import Peer
    from codistill.storage import Storage

__all__ = ["Exchange"]


class Exchange(ABC):
    shared_batch_order: ClassVar[bool] = True
    """Whether every peer draws the same batch at step k (a per-batch signal is keyed by sample ids)."""

    @classmethod
    def versions_kept(cls, cfg: ExchangeConfig) -> int:
        """How many weight versions per publisher a board keeps."""
        return 1

    @classmethod
    @abstractmethod
    def describe(cls, cfg: ExchangeConfig) -> str:
        """The mode's settings in a few words, for the start line."""

    @classmethod
    @abstractmethod
    def staleness_limit(cls, cfg: ExchangeConfig) -> int:
        """The most steps a teacher signal may lag its student under this job; more is a warning."""

    @classmethod
    def held_bytes(cls, cfg: RunConfig, positions_per_batch: int, num_classes: int) -> int:
        """About how many bytes of per-step signals a board holds at most between two training checkpoints
        (kept for exact replay after a restart); 0 for an exchange that keeps none."""
        return 0

    def __init__(self, cfg: RunConfig, index: int, board: Board, rank: int = 0):
        self.cfg = cfg
        self.index = index
        self.rank = rank  # of a data-parallel peer's ranks; its board address is `slot`
        self.workers = [pc.workers for pc in cfg.peers]
        # the run directory (RayEngine sets it): where a large sharded peer's published weights go (checkpoint mode)
        self.storage: Storage | None = None
        self.slot = rank_slot(self.workers, index, rank)
        self.board = board
        self.teachers = teachers_of(index, cfg.num_peers, cfg.exchange.topology)
        self.publishes = bool(consumers_of(index, cfg.num_peers, cfg.exchange.topology)) and cfg.loss.alpha > 0
        self.stats = ExchangeStats()
        self.weighting = WEIGHTINGS[cfg.loss.weighting]

    def distills_at(self, step: int) -> bool:
        return bool(self.teachers) and self.cfg.loss.alpha > 0 and step >= self.cfg.loss.burn_in

    @abstractmethod
    def start_step(self, peer: Peer, step: int) -> None:
        """The peer's forward pass for `step`, and whatever others need from it now."""

    @abstractmethod
    def teacher_signals(self, peer: Peer, step: int) -> list[TeacherOutput] | None:
        """The teachers' logits and taps on the peer's batch of `step` (None: no distillation this step)."""

    def teacher_logits(self, peer: Peer, step: int) -> list[TeacherSignal] | None:
        """The teachers' logits alone (`teacher_signals` without taps)."""
        signals = self.teacher_signals(peer, step)
        return None if signals is None else [t.logits for t in signals]

    def influence_step(self, step: int) -> bool:
        """Whether influence weights are measured at `step` (a step that distills, where loss.weighting measures)."""
        return self.distills_at(step) and self.weighting.measures_at(self.cfg.loss, step)

    def measure_influence(self, peer: Peer, step: int, teachers: list[TeacherOutput] | None) -> None:
        """At an influence step, the peer's own influence weights (kept on the peer; an exchange whose
        teachers need them sends them)."""
        peer.influence = None
        if teachers and self.influence_step(step):
            peer.influence = measure_influence(peer, step, teachers)

    def teacher_side_weights(self, peer: Peer, step: int) -> list[torch.Tensor]:
        """(B_part,) per teacher: the influence each teacher measured as this peer's student."""
        raise NotImplementedError

    def sample_weights(self, peer: Peer, step: int, teachers: list[TeacherOutput] | None) -> list[torch.Tensor] | None:
        """Per teacher, the (B_part,) weights of this step's distillation terms (loss.weighting), or None."""
        if not teachers or not self.influence_step(step):
            return None
        own = peer.influence
        assert own is not None, "measure_influence first"
        theirs = lambda: self.teacher_side_weights(peer, step)
        return self.weighting.example_weights(self.cfg.loss, own, theirs, len(teachers))

    def train(self, peer: Peer, step: int) -> float:
        """The middle of one peer's step when it runs alone (a Ray actor or rank): teachers' signals, influence
        weights, update. Returns the learning rate used. LocalEngine runs the same calls phase by phase."""
        teachers = self.teacher_signals(peer, step)
        self.measure_influence(peer, step, teachers)
        return peer.train_step(teachers, self.sample_weights(peer, step, teachers)).lr

    def end_step(self, peer: Peer, step: int) -> None:
        """After the peer's update of `step`."""

    def finish(self, peer: Peer) -> None:
        """After the peer's last step: nobody waits for what it will not publish."""
        self.board.mark_finished(self.slot)
