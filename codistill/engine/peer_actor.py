"""PeerActor: one Peer in its own Ray actor (RayEngine).

Restarted by Ray (`max_restarts`), it resumes from its own last training checkpoint; started by a
resuming driver, from the step the driver names. Training runs free: it waits only where the
exchange says.
"""

from __future__ import annotations

import time
from typing import Any

import ray
import torch

from codistill.config import build
from codistill.data import load_dataset
from codistill.engine.report import PeerReport
from codistill.exchange import make_exchange
from codistill.exchange.ray_board import RayBoardClient
from codistill.exchange.wire import WireWeights
from codistill.peer import Peer
from codistill.storage import Storage, checkpoint_path

__all__ = ["KEEP_CHECKPOINTS", "PeerActor"]

KEEP_CHECKPOINTS = 3
"""Training checkpoints kept per peer (the newest)."""


class PeerActor:
    def __init__(
        self,
        cfg_dict: dict,
        index: int,
        board_name: str,
        namespace: str,
        storage_uri: str,
        resume_step: int | None,
    ):
        self.cfg = cfg = build(cfg_dict)
        threads = cfg.resources.threads_per_peer or max(1, int(cfg.resources.num_cpus))
        torch.set_num_threads(threads)
        self.index = index
        self.storage = Storage(storage_uri)
        self.peer = Peer(cfg, index, load_dataset(cfg.data))
        self.board = RayBoardClient(
            ray.get_actor(board_name, namespace=namespace), index, inline_max_bytes=cfg.exchange.inline_max_bytes
        )
        self.exchange = make_exchange(cfg, index, self.board)
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.busy_s = 0.0
        self.restarts = 0
        self.resumed_from: int | None = None
        steps = self.storage.checkpoint_steps(self.peer.name)
        reconstructed = ctx.was_current_actor_reconstructed
        step: int | None
        if reconstructed:
            self.restarts = ray.get(self.board.handle.note_restart.remote(index))
            step = steps[-1] if steps else None
        else:
            step = resume_step if resume_step in steps else None
        if step is not None:
            self._load(step)

    def _load(self, step: int) -> None:
        state = self.storage.read_torch(checkpoint_path(self.peer.name, step))
        self.peer.load_training_state(state)
        self.busy_s = float(state["busy_s"])
        self.restarts = max(self.restarts, int(state["restarts"]))
        self.exchange.stats.load_state_dict(state["exchange"])
        self.resumed_from = step
        self.board.mark_durable(self.index, step)

    def _save(self) -> None:
        state = self.peer.training_state()
        state.update(busy_s=self.busy_s, restarts=self.restarts, exchange=self.exchange.stats.state_dict())
        name = self.peer.name
        self.storage.write_torch(checkpoint_path(name, self.peer.step), state)
        for old in self.storage.checkpoint_steps(name)[:-KEEP_CHECKPOINTS]:
            self.storage.delete(checkpoint_path(name, old))
        self.board.mark_durable(self.index, self.peer.step)

    def info(self) -> dict[str, Any]:
        return {
            "step": self.peer.step,
            "total_steps": self.peer.total_steps,
            "node_id": self.node_id,
            "restarts": self.restarts,
            "resumed_from": self.resumed_from,
            "device": str(self.peer.device),
            "gpu_ids": ray.get_gpu_ids(),
        }

    def test_labels(self) -> torch.Tensor:
        return self.peer.dataset.test_y

    def run_round(self, until_step: int, round_index: int) -> PeerReport:
        """Train until `until_step` (free-running: waits only where the exchange says), then evaluate."""
        peer, ex, every = self.peer, self.exchange, self.cfg.output.checkpoint_every
        losses, lr = [], 0.0
        t0 = time.perf_counter()
        while peer.step < until_step:
            step = peer.step
            ex.start_step(peer, step)
            stats = peer.train_step(ex.teacher_logits(peer, step))
            ex.end_step(peer, step)
            losses.append(stats.loss)
            lr = stats.lr
            if every and peer.step % every == 0:
                self.busy_s += time.perf_counter() - t0
                self._save()
                t0 = time.perf_counter()
        if peer.step == peer.total_steps:
            ex.finish(peer)
        self.busy_s += time.perf_counter() - t0
        if not every or peer.step % every:
            self._save()  # every round ends durable: restarts and --resume start from here
        return PeerReport(
            self.index,
            peer.name,
            self.cfg.peers[self.index].model,
            peer.step,
            losses,
            peer.evaluate(),
            self.busy_s,
            ex.stats,
            lr,
            self.restarts,
            self.node_id,
        )

    def take_weights(self, version: int) -> WireWeights | None:
        return self.board.take_weights(version)

    def final_weights(self) -> dict[str, torch.Tensor]:
        return self.peer.weights()
