"""The exchange modes (`exchange.mode` -> EXCHANGES) and what is built from a job's choice of one: a peer's
exchange, an empty board's bookkeeping, the in-process board, the held-bytes warning."""

from __future__ import annotations

from codistill.config import RunConfig
from codistill.exchange.base import Exchange
from codistill.exchange.board import Board, BoardState, InMemoryBoard
from codistill.exchange.checkpoint import CheckpointExchange
from codistill.exchange.logits import LogitExchange
from codistill.exchange.slots import influence_slot, shard_consumers
from codistill.losses.weighting import WEIGHTINGS
from codistill.registry import Registry

__all__ = [
    "EXCHANGES",
    "HELD_BYTES_WARNING",
    "held_bytes_warning",
    "in_memory_board",
    "make_exchange",
    "new_board_state",
]

EXCHANGES: Registry[type[Exchange]] = Registry("exchange", {"logits": LogitExchange, "checkpoint": CheckpointExchange})


def make_exchange(cfg: RunConfig, index: int, board: Board, rank: int = 0) -> Exchange:
    return EXCHANGES[cfg.exchange.mode](cfg, index, board, rank)


def new_board_state(cfg: RunConfig) -> BoardState:
    """An empty board's bookkeeping for this job (who consumes whom, how many versions are kept)."""
    # Addressed by rank slot (codistill.peer.topology.rank_slot): slot i is peer i's rank 0, so with
    # one worker per peer a slot is a peer. Weights are published by rank 0 slots only.
    workers = [pc.workers for pc in cfg.peers]
    consumers = shard_consumers(workers, cfg.data.batch_size, cfg.exchange.topology)
    if (
        WEIGHTINGS[cfg.loss.weighting].publishes_to_teachers(cfg.loss)
        and EXCHANGES[cfg.exchange.mode].shared_batch_order
    ):
        # A student's influence weights go to its teachers, which (topology all) are its consumers.
        consumers |= {influence_slot(workers, slot): list(c) for slot, c in consumers.items()}
    return BoardState(consumers, EXCHANGES[cfg.exchange.mode].versions_kept(cfg.exchange))


HELD_BYTES_WARNING = 2 << 30  # above this a board's shards spill out of a typical object store


def held_bytes_warning(cfg: RunConfig, positions_per_batch: int, num_classes: int) -> str | None:
    """One line when the board may hold more per-step signals than an object store keeps in memory."""
    held = EXCHANGES[cfg.exchange.mode].held_bytes(cfg, positions_per_batch, num_classes)
    if held <= HELD_BYTES_WARNING:
        return None
    return (
        f"warning: the board may hold about {held / 1e9:.1f} GB of logit shards between training checkpoints "
        f"({num_classes} classes x {positions_per_batch} positions per batch); Ray spills what its object store "
        f"cannot hold to disk. Smaller: exchange.logits=topk, exchange.dtype=bfloat16 or output.checkpoint_every."
    )


def in_memory_board(cfg: RunConfig) -> InMemoryBoard:
    return InMemoryBoard(new_board_state(cfg))
