"""Engines drive a run: `LocalEngine` (all peers in one process, the reference) and `RayEngine`
(one actor per peer). Both run the same Peer and the same exchanges; only the board and the
scheduling differ. The driver's unit of progress is a round (`eval_every` steps): after each round
every peer is evaluated and reports a PeerReport; the driver computes ensemble metrics and calls
the Reporter (progress lines, MLflow, Tune). Ray is imported only by `ray_driver` (inside
RayEngine.run) and `peer_actor`.
"""

from __future__ import annotations

from codistill.config import RunConfig
from codistill.engine.failure import Decision, FailurePolicy, PeerFailedError, PeerFailure
from codistill.engine.local import LocalEngine
from codistill.engine.ray_driver import RayEngine
from codistill.engine.report import (
    PeerReport,
    Reporter,
    Reporters,
    RoundResult,
    build_summary,
    evaluate_round,
    round_record,
)
from codistill.engine.rounds import RoundAssembler
from codistill.errors import ConfigError
from codistill.registry import Registry

__all__ = [
    "ENGINES",
    "Decision",
    "FailurePolicy",
    "LocalEngine",
    "PeerFailedError",
    "PeerFailure",
    "PeerReport",
    "RayEngine",
    "Reporter",
    "Reporters",
    "RoundAssembler",
    "RoundResult",
    "build_summary",
    "evaluate_round",
    "make_engine",
    "round_record",
]

Engine = LocalEngine | RayEngine
ENGINES: Registry[type[Engine]] = Registry("engine", {"local": LocalEngine, "ray": RayEngine})


def make_engine(
    cfg: RunConfig, reporter: Reporter | None = None, resume: bool = False, run_id: str | None = None
) -> Engine:
    engine = ENGINES[cfg.engine]
    if resume and not engine.supports_resume:
        raise ConfigError(
            "--resume", message=f"needs an engine that keeps training checkpoints, not engine={cfg.engine}"
        )
    return engine(cfg, reporter, resume=resume, run_id=run_id)
