"""RayEngine: one actor per peer in a placement group, a named board actor, rounds collected as they
come. The driver only collects; peers run free and wait only where the exchange says.

The assembly of rounds from the peers' reports (`RoundAssembler`) is plain Python, tested without Ray.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch

from codistill.config import RunConfig, to_dict
from codistill.engine.failure import Decision, FailurePolicy, PeerFailure
from codistill.engine.report import (
    PeerReport,
    Reporter,
    RoundResult,
    evaluate_round,
    round_record,
    staleness_warnings,
)
from codistill.errors import ResourcesError
from codistill.storage import Storage

__all__ = ["RayEngine", "RoundAssembler", "round_ends"]

R = TypeVar("R")  # a peer's round report (PeerReport in RayEngine)


def round_ends(total_steps: int, eval_every: int) -> list[int]:
    """The step at which each round ends (the last may be short)."""
    return [min(e, total_steps) for e in range(eval_every, total_steps + eval_every, eval_every)]


class RoundAssembler(Generic[R]):
    """Turns per-peer reports, arriving in any order, into complete rounds in order.

    `rounds_per_peer[i]` is how many rounds peer i runs (peers with a shorter shard run fewer); once a
    peer has no round r, its last report stands for it. `first_round` skips rounds an earlier driver
    finished.
    """

    def __init__(self, rounds_per_peer: Sequence[int], first_round: int = 0):
        self.rounds_per_peer = list(rounds_per_peer)
        self.num_rounds = max(self.rounds_per_peer)
        self.next_round = first_round
        self._by_round: dict[int, dict[int, R]] = {}
        self._last: dict[int, R] = {}

    def add(self, peer: int, round_index: int, report: R) -> list[tuple[int, list[R]]]:
        """Record one report; returns the rounds it completed, in order, as (round, reports by peer)."""
        self._by_round.setdefault(round_index, {})[peer] = report
        done = []
        while self.next_round < self.num_rounds:
            got = self._by_round.get(self.next_round, {})
            owed = [i for i, n in enumerate(self.rounds_per_peer) if n > self.next_round and i not in got]
            if owed:
                break
            reports = dict(self._by_round.pop(self.next_round, {}))
            for i in range(len(self.rounds_per_peer)):
                if i not in reports:
                    reports[i] = self._last[i]
            self._last.update(reports)
            done.append((self.next_round, [reports[i] for i in sorted(reports)]))
            self.next_round += 1
        return done

    @property
    def complete(self) -> bool:
        return self.next_round >= self.num_rounds


class RayEngine:
    """Peers as Ray actors exchanging through the object store."""

    supports_resume: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig, reporter: Reporter | None = None, resume: bool = False):
        self.cfg = cfg
        self.reporter = reporter or Reporter()
        self.resume = resume
        self.failure_policy = FailurePolicy(cfg)
        self.step_losses: list[list[float]] = [[] for _ in cfg.peers]
        self.prior_rounds: list[dict] = []
        self.peer_info: list[dict] = []

    @staticmethod
    def init_ray() -> None:
        import ray

        if ray.is_initialized():
            return
        if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`, or pointing at a cluster
            ray.init(log_to_driver=True)
        else:
            ray.init(include_dashboard=False)

    def _placement_group(self) -> tuple[Any, int, bool]:
        """(placement group, index of peer 0's bundle, whether we own it). Inside a Tune trial the
        peers go into the trial's own group (one bundle for the trial, then one per peer)."""
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group

        current = get_current_placement_group()
        if current is not None and len(current.bundle_specs) >= self.cfg.num_peers:
            return current, len(current.bundle_specs) - self.cfg.num_peers, False
        res = self.cfg.resources
        bundle = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}
        strategy = {"pack": "PACK", "spread": "SPREAD"}[res.placement]
        pg = placement_group([dict(bundle) for _ in self.cfg.peers], strategy=strategy)
        ready, _ = ray.wait([pg.ready()], timeout=float(os.environ.get("CODISTILL_PLACEMENT_TIMEOUT_S", 60)))
        if not ready:
            ray.util.remove_placement_group(pg)
            raise ResourcesError(
                f"resources: cannot reserve {self.cfg.num_peers} peers x {bundle} (placement={res.placement}); "
                f"the cluster has {ray.cluster_resources()} in all and {ray.available_resources()} free. "
                f"Lower resources.num_cpus / resources.num_gpus or add nodes."
            )
        return pg, 0, True

    def _resume_step(self, storage: Storage, names: list[str]) -> int | None:
        progress = json.loads((storage.read("progress.json") or b"{}").decode() or "{}")
        self.prior_rounds = progress.get("rounds", [])
        have = [set(storage.checkpoint_steps(n)) for n in names]
        common: set[int] = set.intersection(*have) if have else set()
        step = max(common) if common else None  # every peer restarts from the same step
        if step is not None:
            self.prior_rounds = [r for r in self.prior_rounds if r["step"] <= step]
        return step

    def run(self, out_dir: str | Path) -> list[RoundResult]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from codistill.engine.peer_actor import PeerActor
        from codistill.exchange.ray_board import RayBoardActor

        cfg, res = self.cfg, self.cfg.resources
        self.init_ray()
        storage = Storage(out_dir)
        names = [cfg.peer_name(i) for i in range(cfg.num_peers)]
        resume_step = self._resume_step(storage, names) if self.resume else None
        run_id = uuid.uuid4().hex[:8]
        namespace = ray.get_runtime_context().namespace
        actor_names = [f"codistill-{run_id}-{n}" for n in names]
        board_name = f"codistill-{run_id}-board"
        board: Any = (
            ray.remote(RayBoardActor)
            .options(name=board_name, namespace=namespace, num_cpus=0, max_concurrency=10_000)
            .remote(to_dict(cfg), actor_names, namespace)
        )
        pg, first_bundle, own_pg = self._placement_group()
        # take_weights runs in its own thread ("exchange" group) so the board can pull a checkpoint
        # while the peer is busy training.
        remote_peer = ray.remote(concurrency_groups={"exchange": 1})(PeerActor)  # type: ignore[call-overload]
        actors: list[Any] = []
        try:
            for i in range(cfg.num_peers):
                strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=first_bundle + i)
                actors.append(
                    remote_peer.options(
                        name=actor_names[i],
                        namespace=namespace,
                        num_cpus=res.num_cpus,
                        num_gpus=res.num_gpus,
                        max_restarts=res.max_restarts,
                        max_task_retries=res.max_restarts,
                        scheduling_strategy=strategy,
                    ).remote(to_dict(cfg), i, board_name, namespace, storage.uri, resume_step)
                )
            self.peer_info = ray.get([a.info.remote() for a in actors])
            labels = ray.get(actors[0].test_labels.remote())
            history = self._collect(actors, labels, storage)
            finals = ray.get([a.final_weights.remote() for a in actors])
            for name, w in zip(names, finals):
                storage.write_torch(f"peers/{name}.pt", w)
            return history
        finally:
            for a in actors:
                ray.kill(a, no_restart=True)
            ray.kill(board, no_restart=True)
            if own_pg:
                ray.util.remove_placement_group(pg)

    def _collect(self, actors: list[Any], labels: torch.Tensor, storage: Storage) -> list[RoundResult]:
        import ray

        cfg = self.cfg
        totals = [info["total_steps"] for info in self.peer_info]  # may differ per peer under `disjoint` shards
        self.reporter.on_start(cfg, max(totals))
        ends = [round_ends(t, cfg.eval_every) for t in totals]
        assembler: RoundAssembler[PeerReport] = RoundAssembler(
            [len(e) for e in ends], first_round=len(self.prior_rounds)
        )
        pending: dict[Any, tuple[int, int]] = {}
        for i, a in enumerate(actors):
            start = self.peer_info[i]["step"]
            for r, end in enumerate(ends[i]):
                if end > start:
                    pending[a.run_round.remote(end, r)] = (i, r)
        history: list[RoundResult] = []
        restarts = [info["restarts"] for info in self.peer_info]
        events: list[str] = []
        warned: set[str] = set()
        for i, info in enumerate(self.peer_info):
            if info["resumed_from"] is not None:
                events.append(f"{cfg.peer_name(i)} resumed from its checkpoint at step {info['resumed_from']}")
                self.reporter.on_event(events[-1])
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i, r = pending.pop(ref)
                report, failure = None, None
                try:
                    report = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    failure = PeerFailure(cfg.peer_name(i), r, "died", str(e))
                except ray.exceptions.RayTaskError as e:
                    failure = PeerFailure(cfg.peer_name(i), r, "step_failed", str(e.cause))
                if report is not None and report.restarts > restarts[i]:
                    failure = PeerFailure(report.name, r, "restarted", "", report.restarts)
                    restarts[i] = report.restarts
                if failure is not None:
                    decision, msg = self.failure_policy.decide(failure)
                    if decision is Decision.RAISE:
                        raise self.failure_policy.error(failure, msg)
                    events.append(msg)
                    self.reporter.on_event(msg)
                assert report is not None, "only a round that came back can be continued"
                self.step_losses[i].extend(report.step_losses)
                for round_index, reports in assembler.add(i, r, report):
                    for warning in staleness_warnings(cfg, reports, warned):
                        events.append(warning)
                        self.reporter.on_event(warning)
                    history.append(evaluate_round(round_index, reports, labels, events))
                    events = []
                    records = [*self.prior_rounds, *(round_record(h) for h in history)]
                    # before reporting: what was shown is durable
                    storage.write("progress.json", json.dumps({"rounds": records}).encode())
                    self.reporter.on_round(history[-1])
        return history
