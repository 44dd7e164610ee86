"""LocalEngine: all peers in this process, stepped in lockstep. The reference RayEngine must match."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import ClassVar

from codistill.config import RunConfig
from codistill.data import Dataset
from codistill.engine.export import export_peers
from codistill.engine.peer_start import peer_start
from codistill.engine.preflight import check_job
from codistill.engine.report import (
    PeerReport,
    Reporter,
    RoundResult,
    evaluate_round,
    staleness_warnings,
    term_means,
)
from codistill.exchange import in_memory_board, make_exchange
from codistill.peer import Peer
from codistill.peer.memory import peak_memory
from codistill.storage import Storage

__all__ = ["LocalEngine"]


class LocalEngine:
    """Every peer in one process. Phase order mirrors one step of every peer running at once: all
    forward and publish, then all pull and update, then all publish weights."""

    supports_resume: ClassVar[bool] = False  # keeps no training checkpoints

    def __init__(
        self,
        cfg: RunConfig,
        reporter: Reporter | None = None,
        device: str | None = None,
        *,
        resume: bool = False,
        run_id: str | None = None,
    ):
        assert not resume, "LocalEngine keeps no training checkpoints"
        self.cfg = cfg
        self.reporter = reporter or Reporter()
        self.device = device
        self.step_losses: list[list[float]] = [[] for _ in cfg.peers]  # every step's loss, per peer
        self.prior_rounds: list[dict] = []
        self.final: RoundResult | None = None
        self.peers: list[Peer] = []
        self.board = in_memory_board(cfg)
        self.exports: dict[str, dict] = {}  # peer name -> its Hugging Face export's record (engine.export)

    def run(self, out_dir: str | Path | None = None, dataset: Dataset | None = None) -> list[RoundResult]:
        """Train all peers; write each peer's final weights to out_dir/peers/<name>.pt and, for a language model,
        a Hugging Face model folder out_dir/peers/<name>/ (codistill.engine.export)."""
        cfg = self.cfg
        dataset = dataset if dataset is not None else check_job(cfg)
        peers = [Peer(peer_start(cfg, i), dataset, self.device) for i in range(cfg.num_peers)]
        board = self.board = in_memory_board(cfg)
        exchanges = [make_exchange(cfg, i, board) for i in range(cfg.num_peers)]
        total = max(p.total_steps for p in peers)
        self.reporter.on_start(cfg, total)
        busy = [0.0] * len(peers)
        round_losses: list[list[float]] = [[] for _ in peers]
        round_terms: list[dict[str, float]] = [{} for _ in peers]
        history: list[RoundResult] = []
        lr = [0.0] * len(peers)
        warned: set[str] = set()
        for step in range(total):
            active = [i for i, p in enumerate(peers) if step < p.total_steps]
            for i in active:
                t0 = time.perf_counter()
                exchanges[i].start_step(peers[i], step)
                busy[i] += time.perf_counter() - t0
            teachers = {}
            for i in active:  # every peer's teachers and influence weights are out before any peer waits for them
                t0 = time.perf_counter()
                teachers[i] = exchanges[i].teacher_signals(peers[i], step)
                exchanges[i].measure_influence(peers[i], step, teachers[i])
                busy[i] += time.perf_counter() - t0
            for i in active:
                t0 = time.perf_counter()
                weights = exchanges[i].sample_weights(peers[i], step, teachers[i])
                lr[i] = peers[i].train_step(teachers[i], weights).lr
                busy[i] += time.perf_counter() - t0
            for i in active:
                t0 = time.perf_counter()
                exchanges[i].end_step(peers[i], step)
                board.mark_durable(i, peers[i].step)  # nothing sends a local peer back: taken shards can go
                if peers[i].step == peers[i].total_steps:
                    exchanges[i].finish(peers[i])
                busy[i] += time.perf_counter() - t0
            if (step + 1) % cfg.eval_every == 0 or step + 1 == total:
                for i, p in enumerate(peers):  # the round's losses, read from the device at once
                    taken = p.take_losses()
                    round_losses[i] = [s.loss for s in taken]
                    round_terms[i] = term_means([s.terms for s in taken])
                    self.step_losses[i].extend(round_losses[i])
                memory_kind, memory = peak_memory(peers[0].device)  # one process: every peer reports its peak
                reports = [
                    PeerReport(
                        i,
                        p.name,
                        cfg.peers[i].model,
                        p.step,
                        round_losses[i],
                        p.evaluate(),
                        busy[i],
                        dataclasses.replace(exchanges[i].stats),
                        lr[i],
                        batch_size=cfg.data.batch_size,
                        terms=round_terms[i],
                        memory_kind=memory_kind,
                        peak_memory=[memory],
                    )
                    for i, p in enumerate(peers)
                ]
                events = staleness_warnings(cfg, reports, warned)
                for e in events:
                    self.reporter.on_event(e)
                history.append(
                    evaluate_round(
                        len(history),
                        reports,
                        dataset.test_labels(),
                        events,
                        task=dataset.task,
                        num_classes=dataset.num_classes,
                    )
                )
                self.reporter.on_round(history[-1])
        self.peers = peers
        if out_dir is not None:
            storage = Storage(out_dir)
            finals = {p.name: p.weights() for p in peers}
            for name, final in finals.items():
                storage.write_torch(f"peers/{name}.pt", final)
            self.exports = export_peers(cfg, dataset, storage, finals, self.reporter.on_event)
        return history
