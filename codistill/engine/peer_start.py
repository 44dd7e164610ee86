"""How an engine starts a peer: the one place that decides, in the driver, what a `PeerStart` holds."""

from __future__ import annotations

from typing import Any

from codistill.config import RunConfig
from codistill.engine.preflight import num_shards
from codistill.engine.ray_data_decoder import RayDataDecoder
from codistill.exchange import EXCHANGES
from codistill.peer.start import PeerStart
from codistill.registry import all_extras

__all__ = ["order_seed", "peer_start"]


def order_seed(cfg: RunConfig, index: int) -> int:
    """An exchange that moves per-batch signals (logits) needs one batch order from the job seed; otherwise each
    peer has its own order (and, with shard: disjoint, its own part of the data)."""
    return cfg.seed if EXCHANGES[cfg.exchange.mode].shared_batch_order else cfg.peer_seed(index)


def peer_start(cfg: RunConfig, index: int, **ray_path: Any) -> PeerStart:
    """Peer `index`'s start, rank 0 of its worker group; `ray_path`: the resume step, earlier restarts and where
    the peer finds its board, storage and data (PeerStart's fields)."""
    shards = num_shards(cfg)
    if cfg.data.loader == "ray_data" and cfg.engine == "ray":
        ray_path.setdefault("decoder", RayDataDecoder(cfg.data.decode_cpus))
    return PeerStart(
        config=cfg,
        index=index,
        order_seed=order_seed(cfg, index),
        shard_index=index if shards > 1 else 0,  # one shard: every peer's is the whole training set
        num_shards=shards,
        extras=all_extras(),
        **ray_path,
    )
