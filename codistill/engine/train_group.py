"""A data-parallel peer: a Ray Train v2 `TorchTrainer` worker group (W ranks, DDP) behind one host actor.

The driver talks to every peer through the same calls (`info`, `run_round`, `final_weights`,
`take_weights`); for a one-worker peer they go to a `PeerActor`, for a worker group to its
`TrainPeerHost`, a named threaded actor that runs `trainer.fit()` in a thread and passes commands to the
ranks and rank 0's round reports back. Each rank runs the same `PeerActor` code as rank r of W
(`TrainRank`): its part of the global batch, DDP gradients, its own board slot for logit shards (shard by
shard, never gathered to rank 0). Per-step traffic never goes through `ray.train.report`; the ranks
report a Train checkpoint (rank 0's training state) at every checkpoint the peer writes, and when a worker
dies Ray Train restarts the whole group (`FailureConfig(max_failures)`) from it. Weight versions that rank
0 publishes wait in the host (it outlives the workers) until the board takes them.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

from codistill.config.schema import run_config_validations
from codistill.engine.peer_actor import GroupRank, PeerActor
from codistill.engine.resume import foreign_checkpoint
from codistill.exchange.ray_board import WeightOutbox
from codistill.exchange.wire import WireWeights
from codistill.peer.start import PeerStart
from codistill.storage import Storage

__all__ = ["TrainPeerHost", "TrainRank", "train_run_name"]

STATE_FILE = "peer.pt"


def train_run_name(job: str, run_id: str, peer_name: str) -> str:
    """The Train run's name (Ray dashboard, storage folder): the job, the run and the peer."""
    return f"{job}-{run_id}-{peer_name}"


class TrainRank(GroupRank):
    """Rank r of a peer's worker group, inside a Ray Train worker."""

    def __init__(self, host: Any, restarts: int):
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.host = host
        self.restarts = restarts
        self.stash = self._stash if self.rank == 0 else None

    def _stash(self, weights: WireWeights) -> None:
        ray.get(self.host.stash_weights.remote(weights))  # in the host before the board is told of it

    def gather(self, obj: dict) -> list[dict]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def saved(self, step: int, state: dict[str, Any] | None) -> None:
        # A sharded peer's state is its shards in the run directory: a restarted group goes on from there
        # (PeerActor._load_newest), so Train keeps no copy of its own.
        if state is None or "sharded" in state:
            ray.train.report({"step": step})
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)  # the checkpoint file's state: its run id is checked on load
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d))


def _train_loop(config: dict) -> None:
    """Every rank: build the peer (from the Train checkpoint after a restart), then run the host's commands."""
    host: Any = ray.get_actor(config["host"], namespace=config["start"].namespace)
    rank = ray.train.get_context().get_world_rank()
    node_id, pid = ray.get_runtime_context().get_node_id(), os.getpid()
    restarts: int = ray.get(host.group_started.remote(rank, node_id, pid))
    # Train's checkpoint is where a group this driver started goes on after a failure; a group's first start
    # follows the driver (fresh, or `--resume`'s step), even if an earlier driver's run left checkpoints.
    checkpoint = ray.train.get_checkpoint() if restarts > 0 else None
    group = TrainRank(host, restarts)
    # the driver's start as this rank's (a restarted group loads its newest checkpoint, not the start's step)
    start: PeerStart = config["start"]
    actor = PeerActor(start.with_rank(group.rank, group.world_size), group)
    actor._check_started()
    # After a restart PeerActor has loaded the peer's newest checkpoint file; Train's newest may be older (Train
    # registers a reported checkpoint at its next poll of the workers, and a worker can die before it). The
    # newer one wins, so no step is trained twice and none is lost.
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
        # the state is the peer's checkpoint file's (PeerActor._save), run id included: another run's is not loaded
        if (why := foreign_checkpoint(state, actor.run_id)) is not None:
            if rank == 0:
                actor.events.append(f"warning: {actor.peer.name}: its Ray Train checkpoint is unusable ({why})")
        elif int(state["step"]) > actor.peer.step:
            actor.load_state(state)
    steps = group.gather({"step": actor.peer.step})
    if len({g["step"] for g in steps}) > 1:  # a rank that cannot see the run directory starts elsewhere
        raise RuntimeError(
            f"peer {actor.peer.name}: its ranks start from different steps {[g['step'] for g in steps]}; the run "
            f"directory must be storage every node sees (a shared path or a pyarrow.fs URI such as s3://...)"
        )
    if rank == 0:  # after a restart its resumed_from says where the group went on (the driver's one line)
        host.rank0_ready.remote(actor.info())
    seen = -1
    while True:
        seen, command = ray.get(host.next_command.remote(seen))
        if command is None:
            return
        kind, args = command
        if kind == "round":
            report = actor.run_round(*args)
            if rank == 0:
                ray.get(host.done.remote(seen, report))
        elif kind == "final" and (rank == 0 or actor.peer.sharded):
            weights = actor.final_weights()  # a sharded peer's ranks gather them together, onto rank 0
            if rank == 0:
                ray.get(host.done.remote(seen, weights))


class TrainPeerHost:
    """One data-parallel peer as the driver and the board see it (see module docstring). Threaded: a
    driver call waits in its own thread while the ranks ask for commands in others."""

    def __init__(self, start: PeerStart, host_name: str, run_name: str):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        cfg, index = start.config, start.index  # the driver's job: unpickled, not built again
        pc = cfg.peers[index]
        self.name = cfg.peer_name(index)
        self.workers = pc.workers
        self.prior_restarts = start.prior_restarts
        self.cond = threading.Condition()
        self.seq = -1
        self.command: tuple[str, tuple] | None = ("idle", ())
        self.results: dict[int, Any] = {}
        self.starts = 0
        self.node_ids: dict[int, str] = {}
        self.pids: dict[int, int] = {}  # of the current start's ranks
        self.rank0_info: dict | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.outbox = WeightOutbox()
        cpus, gpus = cfg.peer_resources(index)
        storage = Storage(start.storage_uri)
        trainer = TorchTrainer(
            _train_loop,
            # the start's data is the ObjectRef of the dataset's arrays: Train passes the reference, not the arrays
            train_loop_config={"start": start, "host": host_name},
            scaling_config=ScalingConfig(
                num_workers=pc.workers,
                use_gpu=gpus > 0,
                resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})},
                placement_strategy={"pack": "PACK", "spread": "SPREAD"}[cfg.resources.placement],
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=f"{storage.root.rstrip('/')}/train",
                storage_filesystem=storage.fs,
                failure_config=FailureConfig(max_failures=cfg.resources.max_restarts),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        self.thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True, name=f"fit-{self.name}")
        self.thread.start()

    def _fit(self, trainer: Any) -> None:
        try:
            result = trainer.fit()
            error = result.error
        except BaseException as e:  # reported to the driver's next call
            error = e
        with self.cond:
            self.error = error
            self.finished = True
            self.cond.notify_all()

    def __repr__(self) -> str:  # what the Ray dashboard shows
        return f"TrainPeerHost({self.name}, {self.workers} workers, starts {self.starts})"

    # -- the ranks' side --
    def group_started(self, rank: int, node_id: str, pid: int) -> int:
        """A rank started; returns how often the group was restarted (the first rank of a start counts it)."""
        with self.cond:
            if rank in self.pids or not self.pids:  # a rank seen before: a new start of the group
                self.starts += 1
                self.pids, self.rank0_info = {}, None
            self.node_ids[rank], self.pids[rank] = node_id, pid
            return self.starts - 1

    def rank0_ready(self, info: dict) -> None:
        with self.cond:
            self.rank0_info = info
            self.cond.notify_all()

    def next_command(self, seen: int) -> tuple[int, tuple[str, tuple] | None]:
        """The newest command once it is newer than `seen` (a rank that restarted asks with -1 and redoes it)."""
        with self.cond:
            while self.seq <= seen or (self.command is not None and self.command[0] == "idle"):
                self.cond.wait()
            return self.seq, self.command

    def done(self, seq: int, result: Any) -> None:
        with self.cond:
            self.results[seq] = result
            self.cond.notify_all()

    def stash_weights(self, weights: WireWeights) -> None:
        self.outbox.put(weights)

    # -- the driver's and the board's side (PeerActor's calls) --
    def _wait(self, predicate: Any) -> None:
        while not predicate():
            if self.finished:
                why = f"{type(self.error).__name__}: {self.error}" if self.error else "the worker group stopped"
                raise RuntimeError(f"peer {self.name}: its Ray Train worker group failed: {why}")
            self.cond.wait(timeout=1.0)

    def _ask(self, command: tuple[str, tuple] | None) -> Any:
        with self.cond:
            self.seq += 1
            self.command, seq = command, self.seq
            self.results.clear()
            self.cond.notify_all()
            self._wait(lambda: seq in self.results)
            return self.results.pop(seq)

    def info(self) -> dict[str, Any]:
        with self.cond:
            self._wait(lambda: self.rank0_info is not None)
            assert self.rank0_info is not None
            return self.rank0_info | {
                "config_validations": self.rank0_info["config_validations"] + run_config_validations(),  # and mine
                "workers": self.workers,
                "node_ids": [self.node_ids[r] for r in sorted(self.node_ids)],
                "pids": [self.pids[r] for r in sorted(self.pids)],
                "restarts": self.prior_restarts + max(self.starts - 1, 0),
            }

    def run_round(self, until_step: int, round_index: int, keep_from: int) -> Any:
        report = self._ask(("round", (until_step, round_index, keep_from)))
        with self.cond:  # rank 0 reports for the group (its restarts too); the host knows every rank's node
            report.workers = self.workers
            report.node_ids = [self.node_ids[r] for r in sorted(self.node_ids)]
        return report

    def final_weights(self) -> dict[str, torch.Tensor]:
        return self._ask(("final", ()))

    def take_weights(self, version: int) -> WireWeights | None:
        return self.outbox.take(version)

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Tell the ranks to return (the Train run finishes), then wait for it."""
        with self.cond:
            self.seq += 1
            self.command = None
            self.cond.notify_all()
        deadline = time.monotonic() + timeout_s
        self.thread.join(max(0.0, deadline - time.monotonic()))
