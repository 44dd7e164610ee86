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
from codistill.exchange.topology import consumers_of, rank_slot, teachers_of

if TYPE_CHECKING:
    from codistill.losses.distill import TeacherSignal
    from codistill.peer import Peer

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
        self.slot = rank_slot(self.workers, index, rank)
        self.board = board
        self.teachers = teachers_of(index, cfg.num_peers, cfg.exchange.topology)
        self.publishes = bool(consumers_of(index, cfg.num_peers, cfg.exchange.topology)) and cfg.loss.alpha > 0
        self.stats = ExchangeStats()

    def distills_at(self, step: int) -> bool:
        return bool(self.teachers) and self.cfg.loss.alpha > 0 and step >= self.cfg.loss.burn_in

    @abstractmethod
    def start_step(self, peer: Peer, step: int) -> None:
        """The peer's forward pass for `step`, and whatever others need from it now."""

    @abstractmethod
    def teacher_logits(self, peer: Peer, step: int) -> list[TeacherSignal] | None:
        """The teachers' logits on the peer's batch of `step` (None: no distillation this step)."""

    def end_step(self, peer: Peer, step: int) -> None:
        """After the peer's update of `step`."""

    def finish(self, peer: Peer) -> None:
        """After the peer's last step: nobody waits for what it will not publish."""
        self.board.mark_finished(self.slot)
