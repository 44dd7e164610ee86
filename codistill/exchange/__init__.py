"""The exchange: how teacher signals travel between peers.

Two layers. A **board** is the transport (`board`: the interface, the bookkeeping `BoardState` and
`InMemoryBoard`; `ray_board`: the same state in a Ray actor, for RayEngine). An **exchange** (one
per peer, `exchange.mode` -> EXCHANGES in `modes`) says what a step does with the board (`base`): `logits`
(Deep Mutual Learning, logit shards per step) and `checkpoint` (Anil et al., stale checkpoints as
local teachers). Both move the wire objects of `wire` (numpy arrays). Ray is imported only by
`ray_board`.

The names below are loaded on first use: the board actor imports `codistill.exchange.ray_board`, and
importing this package must not pull the exchanges' torch into it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EXCHANGES": "modes",
    "held_bytes_warning": "modes",
    "in_memory_board": "modes",
    "make_exchange": "modes",
    "new_board_state": "modes",
    "Exchange": "base",
    "Board": "board",
    "BoardState": "board",
    "InMemoryBoard": "board",
    "TeacherUnavailable": "board",
    "CheckpointExchange": "checkpoint",
    "LogitExchange": "logits",
    "TeacherMismatch": "logits",
    "ExchangeStats": "stats",
    "TOPOLOGIES": "codistill.peer.topology",  # a peer's, exported here as before
    "consumers_of": "codistill.peer.topology",
    "teachers_of": "codistill.peer.topology",
    "LogitShard": "wire",
    "WireWeights": "wire",
    "decode_array": "wire",
    "decode_weights": "wire",
    "encode_tensor": "wire",
    "encode_weights": "wire",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from codistill.exchange.base import Exchange as Exchange
    from codistill.exchange.board import Board as Board
    from codistill.exchange.board import BoardState as BoardState
    from codistill.exchange.board import InMemoryBoard as InMemoryBoard
    from codistill.exchange.board import TeacherUnavailable as TeacherUnavailable
    from codistill.exchange.checkpoint import CheckpointExchange as CheckpointExchange
    from codistill.exchange.logits import LogitExchange as LogitExchange
    from codistill.exchange.logits import TeacherMismatch as TeacherMismatch
    from codistill.exchange.modes import EXCHANGES as EXCHANGES
    from codistill.exchange.modes import held_bytes_warning as held_bytes_warning
    from codistill.exchange.modes import in_memory_board as in_memory_board
    from codistill.exchange.modes import make_exchange as make_exchange
    from codistill.exchange.modes import new_board_state as new_board_state
    from codistill.exchange.stats import ExchangeStats as ExchangeStats
    from codistill.exchange.wire import LogitShard as LogitShard
    from codistill.exchange.wire import WireWeights as WireWeights
    from codistill.exchange.wire import decode_array as decode_array
    from codistill.exchange.wire import decode_weights as decode_weights
    from codistill.exchange.wire import encode_tensor as encode_tensor
    from codistill.exchange.wire import encode_weights as encode_weights
    from codistill.peer.topology import TOPOLOGIES as TOPOLOGIES
    from codistill.peer.topology import consumers_of as consumers_of
    from codistill.peer.topology import teachers_of as teachers_of


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = _EXPORTS[name] if "." in _EXPORTS[name] else f"{__name__}.{_EXPORTS[name]}"
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
