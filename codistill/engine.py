"""Engines drive a run: LocalEngine (all peers in one process) and RayEngine (one actor per peer).

Both run the same Peer and the same exchange objects (codistill.exchange); only the board and the
scheduling differ. The driver's unit of progress is a round (`eval_every` steps): after each round
every peer is evaluated on the test set and reports a PeerReport; the driver computes ensemble
metrics and calls the Reporter (progress lines, MLflow).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from codistill.config import RunConfig, to_dict
from codistill.data import load_dataset
from codistill.exchange import ExchangeStats, InMemoryBoard, make_exchange
from codistill.metrics import round_metrics
from codistill.peer import EvalResult, Peer

__all__ = ["PeerReport", "RoundResult", "Reporter", "LocalEngine", "ENGINES", "make_engine", "build_summary"]


@dataclass
class PeerReport:
    """What one peer reports at the end of a round."""

    index: int
    name: str
    model: str
    step: int  # completed steps
    step_losses: list[float]  # training loss of every step in this round
    eval: EvalResult
    busy_s: float  # cumulative wall time spent training (steps), excluding evaluation
    exchange: ExchangeStats
    lr: float = 0.0
    restarts: int = 0
    node_id: str | None = None

    @property
    def steps_per_s(self) -> float:
        return self.step / self.busy_s if self.busy_s > 0 else 0.0


@dataclass
class RoundResult:
    round: int
    step: int  # the slowest peer's completed steps
    peers: list[PeerReport]
    metrics: dict[str, float]  # ensemble-level (codistill.metrics.round_metrics)
    events: list[str] = field(default_factory=list)  # restarts and other notable things


class Reporter(Protocol):
    def on_start(self, cfg: RunConfig, total_steps: int) -> None: ...

    def on_round(self, result: RoundResult) -> None: ...

    def on_event(self, message: str) -> None: ...


class _Quiet:
    def on_start(self, cfg: RunConfig, total_steps: int) -> None: ...

    def on_round(self, result: RoundResult) -> None: ...

    def on_event(self, message: str) -> None: ...


def evaluate_round(round_index: int, reports: Sequence[PeerReport], labels: torch.Tensor,
                   events: list[str] | None = None) -> RoundResult:
    reports = sorted(reports, key=lambda r: r.index)
    metrics = round_metrics([r.eval.logits for r in reports], labels)
    return RoundResult(round_index, min(r.step for r in reports), list(reports), metrics, events or [])


def build_summary(cfg: RunConfig, history: Sequence[RoundResult], wall_time_s: float) -> dict[str, Any]:
    """The run's summary.json: final per-peer and ensemble results plus the per-round history."""
    final = history[-1]
    total = ExchangeStats()
    for r in final.peers:
        total.merge(r.exchange)
    ex = total.to_dict()
    peers = []
    for r in final.peers:
        peers.append({
            "name": r.name, "model": r.model, "test_accuracy": r.eval.accuracy, "test_loss": r.eval.loss,
            "steps": r.step, "steps_per_s": r.steps_per_s, "restarts": r.restarts, "node_id": r.node_id,
            "bytes_published": r.exchange.bytes_published, "bytes_pulled": r.exchange.bytes_pulled,
            "staleness": {"mean": r.exchange.to_dict()["staleness_mean"], "max": r.exchange.staleness_max},
            "exchange_s": r.exchange.exchange_s,
        })
    return {
        "name": cfg.name,
        "peers": peers,
        "ensemble": {"test_accuracy": final.metrics["ensemble_accuracy"]},
        "mean_peer_test_accuracy": final.metrics["mean_peer_accuracy"],
        "churn": final.metrics["churn"],
        "mean_pairwise_kl": final.metrics["mean_pairwise_kl"],
        "staleness": {"mean": ex["staleness_mean"], "max": ex["staleness_max"]},
        "exchange": {"mode": cfg.exchange.mode, "topology": cfg.exchange.topology,
                     "staleness": cfg.exchange.staleness, "period": cfg.exchange.period,
                     "dtype": cfg.exchange.dtype, "bytes_published": ex["bytes_published"],
                     "bytes_pulled": ex["bytes_pulled"], "exchange_s": ex["exchange_s"]},
        "bytes_exchanged": ex["bytes_published"] + ex["bytes_pulled"],
        "restarts": sum(r.restarts for r in final.peers),
        "engine": cfg.engine,
        "wall_time_s": wall_time_s,
        "events": [e for h in history for e in h.events],
        "rounds": [
            {"round": h.round, "step": h.step, **h.metrics,
             "peers": {p.name: {"step": p.step, "test_accuracy": p.eval.accuracy, "test_loss": p.eval.loss,
                                "train_loss": sum(p.step_losses) / max(1, len(p.step_losses)),
                                "steps_per_s": p.steps_per_s, "lr": p.lr} for p in h.peers}}
            for h in history
        ],
        "config": to_dict(cfg),
    }


def write_summary(summary: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    return path


def save_weights(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


class LocalEngine:
    """All peers in this process, stepped in lockstep: the reference the Ray engine must match."""

    def __init__(self, cfg: RunConfig, reporter: Reporter | None = None, device: str | None = None):
        self.cfg = cfg
        self.reporter = reporter or _Quiet()
        self.device = device
        self.step_losses: list[list[float]] = [[] for _ in cfg.peers]  # every step's loss, per peer

    def run(self, out_dir: str | Path | None = None) -> list[RoundResult]:
        """Train all peers; write each peer's final weights to out_dir/peers/<name>.pt."""
        cfg = self.cfg
        dataset = load_dataset(cfg.data)
        peers = [Peer(cfg, i, dataset, self.device) for i in range(cfg.num_peers)]
        board = InMemoryBoard(cfg)
        exchanges = [make_exchange(cfg, i, board) for i in range(cfg.num_peers)]
        total = max(p.total_steps for p in peers)
        self.reporter.on_start(cfg, total)
        busy = [0.0] * len(peers)
        round_losses: list[list[float]] = [[] for _ in peers]
        history: list[RoundResult] = []
        lr = [0.0] * len(peers)
        for step in range(total):
            active = [i for i, p in enumerate(peers) if step < p.total_steps]
            # Phase order mirrors one step of every peer running at once: all forward and publish,
            # then all pull and update, then all publish weights.
            for i in active:
                t0 = time.perf_counter()
                exchanges[i].start_step(peers[i], step)
                busy[i] += time.perf_counter() - t0
            for i in active:
                t0 = time.perf_counter()
                stats = peers[i].train_step(exchanges[i].teacher_logits(peers[i], step))
                busy[i] += time.perf_counter() - t0
                round_losses[i].append(stats.loss)
                self.step_losses[i].append(stats.loss)
                lr[i] = stats.lr
            for i in active:
                t0 = time.perf_counter()
                exchanges[i].end_step(peers[i], step)
                busy[i] += time.perf_counter() - t0
            if (step + 1) % cfg.eval_every == 0 or step + 1 == total:
                reports = [
                    PeerReport(i, p.name, cfg.peers[i].model, p.step, round_losses[i], p.evaluate(), busy[i],
                               exchanges[i].stats, lr[i])
                    for i, p in enumerate(peers)
                ]
                history.append(evaluate_round(len(history), reports, dataset.test_y))
                self.reporter.on_round(history[-1])
                round_losses = [[] for _ in peers]
        self.peers = peers
        if out_dir is not None:
            for p in peers:
                save_weights(p.weights(), Path(out_dir) / "peers" / f"{p.name}.pt")
        return history


ENGINES = {"local": LocalEngine}


def make_engine(cfg: RunConfig, reporter: Reporter | None = None):
    return ENGINES[cfg.engine](cfg, reporter)
