"""PeerStart: everything a peer's process is started with, made once by the engine in the driver.

The job travels as the validated, frozen `RunConfig` itself: it pickles as a frozen dataclass (unpickling runs
no `__post_init__`), so no process but the driver validates it again. What the engine decides for the peer is
here too (its batch order's seed, its shard, the step to resume from), so a peer reads its start and looks
nothing up. The Ray path adds where the peer finds its board, its storage and the dataset's arrays.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from codistill.config import RunConfig

__all__ = ["PeerStart"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerStart:
    config: RunConfig
    """The job, validated once in the driver."""
    index: int
    """Which of the job's peers this is."""
    order_seed: int
    """The seed of this peer's batch order: the job seed where the exchange moves per-batch signals (every peer
    sees the batch its teachers saw), else the peer's own seed (the engine decides)."""
    shard_index: int
    """This peer's part of the training data, of `num_shards` (`data.shard: disjoint`; one shard otherwise)."""
    num_shards: int
    rank: int = 0
    """This process's rank in the peer's data-parallel worker group (`with_rank`), of `world_size`."""
    world_size: int = 1
    resume_step: int | None = None
    """The step a resuming driver goes on from (its checkpoint); None: from step 0."""
    prior_restarts: int = 0
    """Restarts of this peer under earlier drivers of the run."""
    extras: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    """Models and losses the driver's program registered (`registry.all_extras()`), for the peer's process."""
    board_name: str = ""
    """The Ray path: the board actor's name and namespace, the run directory's URI and the dataset's arrays
    (`data`: an ObjectRef nested here, so its actor `ray.get`s it; Ray resolves only top-level arguments)."""
    namespace: str = ""
    storage_uri: str = ""
    data: Any = None
    decoder: Any = None
    """`data.loader: ray_data`: what decodes the peer's streamed image windows (the Ray engine's Ray Data decoder);
    None decodes them on a thread of the peer's process."""

    def __post_init__(self) -> None:
        # the config is checked already; only what the engine added is, cheaply
        peers = self.config.num_peers
        if not 0 <= self.index < peers:
            raise ValueError(f"peer index {self.index} of a job with {peers} peers")
        workers = self.config.peers[self.index].workers
        if self.world_size not in (1, workers) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of {self.world_size} for a peer of {workers} worker(s)")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard {self.shard_index} of {self.num_shards}")

    @property
    def name(self) -> str:
        return self.config.peer_name(self.index)

    def with_rank(self, rank: int, world_size: int) -> PeerStart:
        """This start as rank `rank` of a worker group of `world_size` (the job is not validated again)."""
        return dataclasses.replace(self, rank=rank, world_size=world_size)
