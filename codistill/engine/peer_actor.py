"""PeerActor: one Peer in its own Ray actor (RayEngine).

Restarted by Ray (`max_restarts`), it resumes from its newest usable training checkpoint (a corrupt
one is a warning and the one before is used), or from step 0 when none is usable (`info()["resumed_from"]`
is None: the driver's one line says which); started by a resuming driver, from the step the driver names.
A round's step losses are part of its checkpoint, so a round re-run after a restart reports every step of
the round once. Training runs free: it waits only where the exchange says.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import ray
import torch

from codistill.config.schema import run_config_validations
from codistill.data import Dataset
from codistill.engine.report import PeerReport, term_means
from codistill.engine.resume import ForeignCheckpointError, foreign_checkpoint
from codistill.exchange import EXCHANGES, make_exchange
from codistill.exchange.ray_board import RayBoardClient, actor_restarts
from codistill.exchange.stats import ExchangeStats
from codistill.exchange.wire import WireWeights
from codistill.peer import Peer
from codistill.peer.memory import peak_memory
from codistill.peer.start import PeerStart
from codistill.peer.topology import rank_slot
from codistill.registry import install_extras
from codistill.storage import Storage, checkpoint_path, sharded_checkpoint_dir

__all__ = ["GroupRank", "PeerActor", "PeerStartError"]


class PeerStartError(RuntimeError):
    """The peer could not be built; raised by its first call, so Ray does not restart it to fail again."""


def group_exchange_stats(ranks: list[dict]) -> ExchangeStats:
    """A worker group's exchange as one peer's: every rank's bytes and counts added, times averaged (the ranks
    publish and pull at the same time)."""
    total = ExchangeStats()
    for state in ranks:
        one = ExchangeStats()
        one.load_state_dict(state)
        total.merge(one)
    total.exchange_s /= len(ranks)
    total.teacher_forward_s /= len(ranks)
    total.teacher_updates //= len(ranks)  # every rank loads the same versions
    total.teacher_forwards //= len(ranks)  # each rank runs the teachers on its part: one forward of the peer's batch
    return total


class GroupRank:
    """This process's place in its peer: one actor is rank 0 of 1 (these defaults); a rank of a Ray Train worker
    group overrides how the ranks' board states are gathered and what a saved checkpoint tells Train
    (codistill.engine.train_group)."""

    rank: int = 0
    world_size: int = 1
    restarts: int = 0  # how often the group was started again (a worker group; an actor asks Ray)
    stash: Callable[[WireWeights], None] | None = None  # where rank 0's weight versions wait for the board

    def gather(self, obj: dict) -> list[dict]:
        """Every rank's `obj` on rank 0, in rank order (a collective in a group)."""
        return [obj]

    def saved(self, step: int, state: dict[str, Any] | None) -> None:
        """Rank 0 wrote the training checkpoint of `step` (`state`; None on other ranks)."""


class PeerActor:
    def __init__(self, start: PeerStart, group: GroupRank | None = None):
        """`start` is the driver's (its `data` the ObjectRef of the dataset's arrays); a rank of a worker group
        gets its rank's start and its `group`."""
        # A constructor that raises is restarted by Ray (max_restarts) only to fail the same way, with a
        # traceback per attempt: the error is kept and raised by the first call instead.
        self.start_error: str | None = None
        self.peer_name = start.name
        try:
            self._start(start, group)
        except Exception as e:
            import traceback

            self.start_error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"

    def _check_started(self) -> None:
        if self.start_error is not None:
            raise PeerStartError(self.start_error)

    def _start(self, start: PeerStart, group: GroupRank | None) -> None:
        install_extras(start.extras)  # models and losses the driver's program registered
        self.cfg = cfg = start.config  # validated in the driver: unpickled, not built again
        self.group = group or GroupRank()
        if (start.rank, start.world_size) != (self.group.rank, self.group.world_size):
            where = f"rank {self.group.rank} of {self.group.world_size}"
            raise ValueError(f"the start of rank {start.rank} of {start.world_size} given to {where}")
        index, rank = start.index, start.rank
        torch.set_num_threads(cfg.peer_threads(index))
        self.index = index
        self.storage = Storage(start.storage_uri)
        self.run_id = start.board_name.removeprefix("codistill-").removesuffix("-board")
        # the arrays in the object store (nested in the start, so not resolved by Ray): shared, not copied
        self.peer = Peer(start, Dataset.from_arrays(ray.get(start.data)))
        self.board = RayBoardClient(
            ray.get_actor(start.board_name, namespace=start.namespace),
            rank_slot([pc.workers for pc in cfg.peers], index, rank),
            inline_max_bytes=cfg.exchange.inline_max_bytes,
            versions_kept=EXCHANGES[cfg.exchange.mode].versions_kept(cfg.exchange),
            kept_shard_steps=2 * cfg.exchange.staleness + 8,
            stash=self.group.stash,
        )
        self.exchange = make_exchange(cfg, index, self.board, rank)
        self.exchange.storage = self.storage  # a large sharded peer publishes its weights there
        self.node_id = ray.get_runtime_context().get_node_id()
        self.busy_s = 0.0
        self.events: list[str] = []  # told to the driver with the next report
        self.round_index = -1
        self.round_losses: list[float] = []
        self.round_terms: list[dict[str, float]] = []  # each step's loss terms (StepLoss.terms), when the job has them
        self.group_stats: list[dict] = []  # every rank's exchange counters at the last checkpoint
        self.group_memory: list[tuple[str, int]] = []  # every rank's peak memory then (codistill.peer.memory)
        self.lr = 0.0
        ray_restarts = actor_restarts() if group is None else self.group.restarts
        self.restarts = start.prior_restarts + ray_restarts
        self.resumed_from: int | None = None
        if ray_restarts:
            self._load_newest()
        elif start.resume_step is not None:
            self._load(start.resume_step)

    def __repr__(self) -> str:  # what the Ray dashboard shows
        if self.start_error is not None:
            return f"PeerActor({self.peer_name}, failed to start)"
        return f"PeerActor({self.peer.name}, step {self.peer.step}/{self.peer.total_steps}, run {self.run_id})"

    def _load_newest(self) -> None:
        for step in reversed(self.storage.checkpoint_steps(self.peer.name)):
            try:
                self._load(step)
                return
            except Exception as e:  # a corrupt file fails inside torch or zipfile in many ways
                why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                self.events.append(
                    f"warning: {self.peer.name}: checkpoint at step {step} unusable ({why}); trying the one before"
                )
        # none usable: from step 0 (resumed_from stays None; the driver's restart line says so)

    def _load(self, step: int) -> None:
        state = self.storage.read_torch(checkpoint_path(self.peer.name, step))
        if state is None:
            raise FileNotFoundError(checkpoint_path(self.peer.name, step))
        self.load_state(state)

    def load_state(self, state: dict[str, Any]) -> None:
        """Go on from a training checkpoint (this peer's file, or a worker group's Train checkpoint); one that
        another run wrote is refused before anything is loaded (`ForeignCheckpointError`, naming both runs)."""
        if (why := foreign_checkpoint(state, self.run_id)) is not None:
            raise ForeignCheckpointError(why)
        step = int(state["step"])
        if self.peer.sharded:  # its model and optimizer: the shards beside the file (every rank reads them)
            if "sharded" not in state:
                raise ValueError(f"the checkpoint of step {step} holds no shards (written by a peer with strategy ddp)")
            sharded = self.peer.sharded_state()
            self.storage.read_sharded(sharded_checkpoint_dir(self.peer.name, step), sharded)
            self.peer.load_sharded_state(sharded)
        elif "sharded" in state:
            raise ValueError(f"the checkpoint of step {step} is sharded (written by a peer with strategy fsdp)")
        self.peer.load_training_state(state)
        boards = state["board"] if isinstance(state["board"], list) else [state["board"]]
        self.board.restore(boards[self.group.rank], step)  # a new board (resumed driver) needs what we published
        self.busy_s = float(state["busy_s"])
        exchange = state["exchange"]
        self.exchange.stats.load_state_dict(exchange[self.group.rank] if isinstance(exchange, list) else exchange)
        self.round_index = int(state["round_index"])
        self.round_losses = [float(x) for x in state["round_losses"]]
        self.round_terms = [dict(t) for t in state.get("round_terms", [])]
        self.lr = float(state["lr"])
        self.resumed_from = step
        self.board.mark_durable(self.exchange.slot, step)

    def _is_round_end(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == self.peer.total_steps

    def _save(self, keep_from: int) -> None:
        """Write a checkpoint at the current step; keep round-end checkpoints from `keep_from` on (the
        driver's resume points) and the newest one; delete the rest."""
        taken = self.peer.take_losses()  # every rank: the group's mean
        self.round_losses.extend(s.loss for s in taken)
        self.round_terms.extend(s.terms for s in taken if s.terms is not None)
        name, now = self.peer.name, self.peer.step
        if self.peer.sharded:  # every rank writes its shards first; the file, written last, says they are whole
            self.storage.write_sharded(sharded_checkpoint_dir(name, now), self.peer.sharded_state())
        # each rank's shards, exchange counters and peak memory, in rank order (one collective)
        ranks = self.group.gather(
            {
                "board": self.board.durable_state(now),
                "exchange": self.exchange.stats.state_dict(),
                "memory": peak_memory(self.peer.device),
            }
        )
        self.group_stats = [r["exchange"] for r in ranks]
        self.group_memory = [r["memory"] for r in ranks]
        state: dict[str, Any] | None = None
        if self.group.rank == 0:
            state = self.peer.training_state()
            state.update(
                busy_s=self.busy_s,
                restarts=self.restarts,
                exchange=self.group_stats[0] if len(ranks) == 1 else self.group_stats,
                round_index=self.round_index,
                round_losses=list(self.round_losses),
                round_terms=list(self.round_terms),
                lr=self.lr,
                board=ranks[0]["board"] if len(ranks) == 1 else [r["board"] for r in ranks],
                run_id=self.run_id,  # checked on every load: a run never goes on from another run's checkpoint
                total_steps=self.peer.total_steps,  # with the step and round_index: a resume can tell a round end
            )
            if self.peer.sharded:
                state["sharded"] = True  # its model and optimizer: sharded_checkpoint_dir(name, now)
            self.storage.write_torch(checkpoint_path(name, now), state)
            for old in self.storage.checkpoint_steps(name):
                if old != now and (old < keep_from or not self._is_round_end(old)):
                    self.storage.delete(checkpoint_path(name, old))  # the file first: then the shards are unused
                    self.storage.delete_dir(sharded_checkpoint_dir(name, old))
        self.group.saved(now, state)  # a worker group: a Train checkpoint, and a barrier before what follows
        self.board.mark_durable(self.exchange.slot, now)

    def info(self) -> dict[str, Any]:
        self._check_started()
        return {
            "step": self.peer.step,
            "total_steps": self.peer.total_steps,
            "node_id": self.node_id,
            "restarts": self.restarts,
            "resumed_from": self.resumed_from,
            "device": str(self.peer.device),
            "gpu_ids": ray.get_gpu_ids(),
            "pid": os.getpid(),
            "config_validations": run_config_validations(),  # 0: this process got the driver's job, built none
        }

    def run_round(self, until_step: int, round_index: int, keep_from: int) -> PeerReport | None:
        """Train round `round_index` until `until_step` (free-running: waits only where the exchange says),
        then evaluate. Re-run after a restart, it goes on from the checkpoint and reports the whole round."""
        self._check_started()
        peer, ex, every = self.peer, self.exchange, self.cfg.output.checkpoint_every
        if round_index != self.round_index:
            self.round_index, self.round_losses, self.round_terms = round_index, [], []
        t0 = time.perf_counter()
        while peer.step < until_step:
            step = peer.step
            ex.start_step(peer, step)
            self.lr = ex.train(peer, step)
            ex.end_step(peer, step)
            if every and peer.step % every == 0 and peer.step < until_step:
                self.busy_s += time.perf_counter() - t0
                self._save(keep_from)
                t0 = time.perf_counter()
        if peer.step == peer.total_steps:
            ex.finish(peer)
        self.busy_s += time.perf_counter() - t0
        self._save(keep_from)  # every round ends durable: restarts and --resume start from here
        if self.group.rank != 0:
            if peer.sharded:
                peer.evaluate()  # its forward passes gather each unit from every rank
            return None  # rank 0 evaluates and reports for its group
        events, self.events = self.events, []
        kinds = {kind for kind, _ in self.group_memory}
        return PeerReport(
            self.index,
            peer.name,
            self.cfg.peers[self.index].model,
            peer.step,
            list(self.round_losses),
            peer.evaluate(),
            self.busy_s,
            ex.stats if self.group.world_size == 1 else group_exchange_stats(self.group_stats),
            self.lr,
            self.restarts,
            self.node_id,
            events,
            self.cfg.data.batch_size,
            terms=term_means(self.round_terms),
            strategy=self.cfg.peers[self.index].strategy,
            memory_kind="/".join(sorted(kinds)),
            peak_memory=[b for _, b in self.group_memory],
        )

    def take_weights(self, version: int) -> WireWeights | None:
        return self.board.take_weights(version)

    def final_weights(self) -> dict[str, torch.Tensor]:
        """The full weights (a sharded peer: every rank calls it, rank 0 gets them)."""
        return self.peer.weights()
