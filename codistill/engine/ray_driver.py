"""RayEngine: one actor per peer in a placement group, a named board actor, rounds collected as they
come. The driver only collects; peers run free and wait only where the exchange says.

The assembly of rounds from the peers' reports is `engine.rounds`; what the driver shows of its workers,
`engine.worker_output`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import torch

from codistill import trust
from codistill.config import RunConfig
from codistill.data import Dataset
from codistill.engine.export import export_peers
from codistill.engine.failure import Decision, FailurePolicy, PeerFailure
from codistill.engine.peer_start import peer_start
from codistill.engine.preflight import check_job
from codistill.engine.report import (
    PeerReport,
    Reporter,
    RoundResult,
    evaluate_round,
    round_record,
    staleness_warnings,
)
from codistill.engine.resume import ResumePoint, apply_resume, plan_resume
from codistill.engine.rounds import RoundAssembler, round_ends
from codistill.engine.worker_output import one_line, worker_output_to_run_log
from codistill.errors import CodistillError, ResourcesError
from codistill.exchange import held_bytes_warning, new_board_state
from codistill.peer.start import PeerStart
from codistill.storage import Storage
from codistill.tasks import task_of

__all__ = ["RayEngine"]

log = logging.getLogger("codistill")  # the run's log file (full tracebacks) when run through codistill.api


class RayEngine:
    """Peers as Ray actors exchanging through the object store (see module docstring).

    The driver keeps one round in flight per peer, so a retried task can never report another round's
    state; a peer that is unreachable for a moment (`ActorUnavailableError`) is waited for and asked
    again, not taken for dead.
    """

    supports_resume: ClassVar[bool] = True
    UNAVAILABLE_PATIENCE_S: ClassVar[float] = 600.0
    """How long a peer may stay unreachable (its node lost, Ray restarting it) before it counts as dead."""

    def __init__(
        self, cfg: RunConfig, reporter: Reporter | None = None, resume: bool = False, run_id: str | None = None
    ):
        self.cfg = cfg
        self.reporter = reporter or Reporter()
        self.resume = resume
        self.failure_policy = FailurePolicy(cfg)
        self.step_losses: list[list[float]] = [[] for _ in cfg.peers]
        self.prior_rounds: list[dict] = []
        self.peer_info: list[dict] = []
        self.final: RoundResult | None = None  # the last round, when this driver ran none
        self.run_id = run_id or uuid.uuid4().hex[:8]  # in actor names, the run directory and MLflow alike
        self.board_name = f"codistill-{self.run_id}-board"
        self.exports: dict[str, dict] = {}  # peer name -> its Hugging Face export's record (engine.export)

    @staticmethod
    def init_ray() -> None:
        import ray

        if ray.is_initialized():
            return
        # the person's opt-in to code a job names (codistill.trust) holds in every worker of this job
        env = trust.runtime_env_vars()
        runtime_env = {"env_vars": env} if env else None
        if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`, or pointing at a cluster
            ray.init(log_to_driver=True, runtime_env=runtime_env)
        else:
            ray.init(include_dashboard=False, runtime_env=runtime_env)

    def _placement_group(self) -> tuple[Any, int, bool]:
        """(placement group, index of the first one-worker peer's bundle, whether we own it); None when every
        peer is a worker group. Inside a Tune trial the peers go into the trial's own group (one bundle for
        the trial, then one per one-worker peer)."""
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group

        actor_peers = [i for i, pc in enumerate(self.cfg.peers) if pc.workers == 1]  # worker groups: Train's own
        if not actor_peers:  # every peer is a worker group: nothing to reserve here (not even a token bundle)
            return None, 0, False
        current = get_current_placement_group()
        if current is not None and len(current.bundle_specs) >= len(actor_peers):
            return current, len(current.bundle_specs) - len(actor_peers), False
        res = self.cfg.resources
        bundles = []
        for i in actor_peers:
            cpus, gpus = self.cfg.peer_resources(i)
            bundles.append({"CPU": cpus, **({"GPU": gpus} if gpus else {})})
        strategy = {"pack": "PACK", "spread": "SPREAD"}[res.placement]
        pg = placement_group(bundles, strategy=strategy)
        ready, _ = ray.wait([pg.ready()], timeout=float(os.environ.get("CODISTILL_PLACEMENT_TIMEOUT_S", 60)))
        if not ready:
            ray.util.remove_placement_group(pg)
            alike = len({str(b) for b in bundles}) == 1
            count = f"{len(bundles)} peers x {bundles[0]}" if alike else f"peers {bundles}"
            raise ResourcesError(
                f"resources: cannot reserve {count} (placement={res.placement}); "
                f"the cluster has {ray.cluster_resources()} in all and {ray.available_resources()} free. "
                f"Lower resources.num_cpus / resources.num_gpus or add nodes."
            )
        return pg, 0, True

    def _start_board(self, actor_names: list[str], namespace: str) -> Any:
        """The board lives on the driver's node (it goes only when the driver goes) and is restarted by
        Ray if it dies; the peers give a new board what the old one held."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from codistill.exchange.ray_board import RayBoardActor

        state = new_board_state(self.cfg)  # the board gets its bookkeeping's arguments, not the job
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return (
            ray.remote(RayBoardActor)
            .options(
                name=self.board_name,
                namespace=namespace,
                num_cpus=0,
                max_concurrency=10_000,
                max_restarts=-1,
                max_task_retries=-1,
                scheduling_strategy=here,
            )
            .remote(state.consumers, state.versions_kept, actor_names, namespace)
        )

    def run(self, out_dir: str | Path, dataset: Dataset | None = None) -> list[RoundResult]:
        with contextlib.ExitStack() as once_ray_runs:  # what lasts from Ray's start to the run's end
            return self._run(out_dir, dataset, once_ray_runs)

    def _run(
        self, out_dir: str | Path, dataset: Dataset | None, once_ray_runs: contextlib.ExitStack
    ) -> list[RoundResult]:
        cfg = self.cfg
        storage = Storage(out_dir)
        names = [cfg.peer_name(i) for i in range(cfg.num_peers)]
        dataset = dataset if dataset is not None else check_job(cfg)  # before Ray: bad input costs nothing
        self._task: dict[str, Any] = {"task": dataset.task, "num_classes": dataset.num_classes}
        positions = cfg.data.batch_size * task_of(dataset).positions_per_row(dataset)
        if (held := held_bytes_warning(cfg, positions, dataset.num_classes)) is not None:
            self.reporter.on_event(held)
        point = ResumePoint(None, [])
        if self.resume:
            point = plan_resume(cfg, storage, self.run_id)
            apply_resume(cfg, storage, point)
            self.prior_rounds = point.prior_rounds
            self.reporter.on_resume(self.prior_rounds)
        self.init_ray()
        once_ray_runs.enter_context(worker_output_to_run_log())
        self._check_groups_fit()
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from codistill.engine.peer_actor import PeerActor

        namespace = ray.get_runtime_context().namespace
        actor_names = [f"codistill-{self.run_id}-{n}" for n in names]
        board = self._start_board(actor_names, namespace)
        pg, first_bundle, own_pg = self._placement_group()
        self._board_started(board)
        data_ref = ray.put(dataset.to_arrays())  # decoded once, shared read-only by every peer on a node
        # take_weights runs in its own thread ("exchange" group) so the board can pull a checkpoint
        # while the peer is busy training.
        remote_peer = ray.remote(concurrency_groups={"exchange": 1})(PeerActor)  # type: ignore[call-overload]
        res = cfg.resources
        actors: list[Any] = []
        try:
            bundle = first_bundle
            for i, name in enumerate(names):
                start = peer_start(  # the job itself, validated here once: the peers' processes build none
                    cfg,
                    i,
                    resume_step=None if point.steps is None else point.steps[name],
                    prior_restarts=point.restarts.get(name, 0),
                    board_name=self.board_name,
                    namespace=namespace,
                    storage_uri=storage.uri,
                    data=data_ref,
                )
                if cfg.peers[i].workers > 1:  # a Ray Train worker group behind a host actor of the same name
                    actors.append(self._start_group(start, actor_names[i]))
                    continue
                strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
                bundle += 1
                cpus, gpus = cfg.peer_resources(i)
                actors.append(
                    remote_peer.options(
                        name=actor_names[i],
                        namespace=namespace,
                        num_cpus=cpus,
                        num_gpus=gpus,
                        max_restarts=res.max_restarts,
                        max_task_retries=-1,  # a round is re-run after a restart (it resumes from its checkpoint)
                        scheduling_strategy=strategy,
                    ).remote(start)
                )
            self.peer_info = self._started(actors)
            history = self._collect(actors, dataset.test_labels(), storage, point)
            finals = ray.get([a.final_weights.remote() for a in actors])
            for name, w in zip(names, finals):
                storage.write_torch(f"peers/{name}.pt", w)
        finally:
            groups = [a for i, a in enumerate(actors) if cfg.peers[i].workers > 1]
            ray.wait([g.shutdown.remote() for g in groups], num_returns=len(groups), timeout=60)
            for a in actors:
                ray.kill(a, no_restart=True)
            ray.kill(board, no_restart=True)
            if own_pg:
                ray.util.remove_placement_group(pg)
        # language models: peers/<name>/ as Hugging Face model folders, made here from the final weights once the
        # peers' resources are free again
        self.exports = export_peers(cfg, dataset, storage, dict(zip(names, finals)), self.reporter.on_event)
        return history

    def _check_groups_fit(self) -> None:
        """A worker group the cluster can never hold fails now, naming the peer (Train would wait forever)."""
        import ray

        total = ray.cluster_resources()
        largest = {
            kind: max((n["Resources"].get(kind, 0.0) for n in ray.nodes() if n["Alive"]), default=0.0)
            for kind in ("CPU", "GPU")
        }
        for i, pc in enumerate(self.cfg.peers):
            if pc.workers == 1:
                continue
            for kind, per_worker in zip(("CPU", "GPU"), self.cfg.peer_resources(i)):
                need = per_worker * pc.workers
                if need > total.get(kind, 0.0) or per_worker > largest[kind]:
                    raise ResourcesError(
                        f"peers.{i}.workers: {pc.workers} workers x {per_worker:g} {kind} = {need:g} {kind}; the "
                        f"cluster has {total.get(kind, 0.0):g} in all, at most {largest[kind]:g} on one node. "
                        f"Use fewer workers or less per worker (peers.{i}.resources), or add nodes."
                    )

    def _start_group(self, start: PeerStart, host_name: str) -> Any:
        """A peer as a Ray Train worker group (codistill.engine.train_group); Train reserves its workers."""
        import ray

        from codistill.engine.train_group import TrainPeerHost, train_run_name

        cfg, name = self.cfg, start.name
        return (
            ray.remote(concurrency_groups={"exchange": 1})(TrainPeerHost)  # type: ignore[call-overload]
            .options(name=host_name, namespace=start.namespace, num_cpus=0, max_concurrency=64, max_restarts=0)
            .remote(
                start,
                host_name,
                # a resumed driver's groups get Train runs of their own: a restart must never pick up a
                # checkpoint an earlier driver's group reported beyond the step this driver resumed from
                train_run_name(cfg.name, self.run_id, name)
                + (f"-resumed-{uuid.uuid4().hex[:6]}" if self.resume else ""),
            )
        )

    def _board_started(self, board: Any) -> None:
        """A board that cannot be built (Ray does not restart a constructor that raised) stops the run in
        one line; the peers would otherwise each fail on it and name themselves."""
        import ray

        try:
            ray.get(board.__ray_ready__.remote())
        except ray.exceptions.ActorDiedError as e:
            log.error("the exchange board could not start:\n%s", e)
            raise CodistillError(f"the exchange board could not start: {one_line(e)}") from None
        self._board, self._board_seen = board, ray.get(board.incarnation.remote())

    def _board_restarted(self) -> str | None:
        """A line when Ray restarted the board since the driver last asked (once per round report: a call that
        waits only while the board is being restarted); the peers tell the new board what it lost."""
        import ray

        now = ray.get(self._board.incarnation.remote())
        if now["epoch"] == self._board_seen["epoch"]:
            return None
        self._board_seen = now
        return (
            f"the exchange board restarted ({max(now['restarts'], 1)} restart(s) so far); "
            f"the peers publish again what it held"
        )

    def _restart_detail(self, actor: Any) -> str:
        """How a restarted peer went on, from what it says once it is back: "resumed from its checkpoint at step K"
        or "started over from step 0" (no usable checkpoint); a worker group says its workers were started again."""
        import ray

        try:
            info = ray.get(actor.info.remote())
        except ray.exceptions.RayError:  # gone again: its next report tells
            return ""
        step = info["resumed_from"]
        how = (
            f"resumed from its checkpoint at step {step}"
            if step is not None
            else "started over from step 0 (no usable checkpoint)"
        )
        return how + (f" (Ray Train started its {info['workers']} workers again)" if info.get("workers") else "")

    def _started(self, actors: list[Any]) -> list[dict]:
        """Each peer's info once it is built; a peer that could not be built stops the run in one line."""
        import ray

        infos = []
        for i, actor in enumerate(actors):
            try:
                infos.append(ray.get(actor.info.remote()))
            except ray.exceptions.RayTaskError as e:
                failure = PeerFailure(self.cfg.peer_name(i), 0, "start_failed", one_line(e))
                log.error("peer %s could not start:\n%s", failure.peer, e)
                raise self.failure_policy.error(failure, self.failure_policy.decide(failure)[1]) from None
        return infos

    def _collect(
        self, actors: list[Any], labels: torch.Tensor, storage: Storage, point: ResumePoint
    ) -> list[RoundResult]:
        import ray

        cfg = self.cfg
        totals = [info["total_steps"] for info in self.peer_info]  # may differ per peer under `disjoint` shards
        self.reporter.on_start(cfg, max(totals))
        ends = [round_ends(t, cfg.eval_every) for t in totals]
        assembler: RoundAssembler[PeerReport] = RoundAssembler([len(e) for e in ends], first_round=point.first_round)
        assembled_steps: list[list[int]] = [  # each assembled round's per-peer steps: the resume points
            [int(r["peers"][cfg.peer_name(i)]["step"]) for i in range(cfg.num_peers)] for r in self.prior_rounds
        ]
        if not assembled_steps and point.steps is not None:  # progress.json's records were lost: the point stands
            assembled_steps = [[point.steps[cfg.peer_name(i)] for i in range(cfg.num_peers)]]
        next_round = [sum(1 for e in ends[i] if e <= info["step"]) for i, info in enumerate(self.peer_info)]
        pending: dict[Any, tuple[int, int]] = {}
        unavailable_since: dict[int, float] = {}

        def submit(i: int) -> None:
            r = next_round[i]
            if r < len(ends[i]):
                keep_from = assembled_steps[-3][i] if len(assembled_steps) >= 3 else 0
                pending[actors[i].run_round.remote(ends[i][r], r, keep_from)] = (i, r)

        for i in range(cfg.num_peers):
            submit(i)
        if not pending:  # resumed after the last round: the peers report it again (no training) for the summary
            for line in point.messages:
                self.reporter.on_event(line)
            refs = [a.run_round.remote(ends[i][-1], len(ends[i]) - 1, 0) for i, a in enumerate(actors)]
            self.final = evaluate_round(point.first_round - 1, ray.get(refs), labels, **self._task)
            return []
        history: list[RoundResult] = []
        restarts = [info["restarts"] for info in self.peer_info]
        events: list[str] = list(point.messages)
        warned: set[str] = set()
        for i, info in enumerate(self.peer_info):
            if info["resumed_from"] is not None:
                events.append(f"{cfg.peer_name(i)} resumed from its checkpoint at step {info['resumed_from']}")
        for line in events:
            self.reporter.on_event(line)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            i, r = pending.pop(ref)
            report, failure = None, None
            try:
                report = ray.get(ref)
            except ray.exceptions.ActorUnavailableError as e:
                # Its node is unreachable or Ray is restarting it: wait and ask again (run_round is idempotent).
                first = unavailable_since.setdefault(i, time.monotonic())
                if time.monotonic() - first < self.UNAVAILABLE_PATIENCE_S:
                    time.sleep(1.0)
                    pending[actors[i].run_round.remote(ends[i][r], r, 0)] = (i, r)
                    continue
                failure = PeerFailure(
                    cfg.peer_name(i), r, "died", f"unreachable for {self.UNAVAILABLE_PATIENCE_S:.0f}s: {e}"
                )
            except ray.exceptions.RayActorError as e:
                log.error("peer %s died in round %d:\n%s", cfg.peer_name(i), r, e)
                failure = PeerFailure(cfg.peer_name(i), r, "died", one_line(e))
            except ray.exceptions.RayTaskError as e:
                log.error("peer %s failed in round %d:\n%s", cfg.peer_name(i), r, e)
                failure = PeerFailure(cfg.peer_name(i), r, "step_failed", one_line(e))
            unavailable_since.pop(i, None)
            if report is not None and report.restarts > restarts[i]:
                failure = PeerFailure(report.name, r, "restarted", self._restart_detail(actors[i]), report.restarts)
                restarts[i] = report.restarts
            if report is not None and (board_line := self._board_restarted()) is not None:
                events.append(board_line)  # a board failure is never a peer's: a line of its own
                self.reporter.on_event(board_line)
            if failure is not None:
                decision, msg = self.failure_policy.decide(failure)
                if decision is Decision.RAISE:
                    raise self.failure_policy.error(failure, msg)
                events.append(msg)
                self.reporter.on_event(msg)
            assert report is not None, "only a round that came back can be continued"
            for line in report.events:
                events.append(line)
                self.reporter.on_event(line)
            self.step_losses[i].extend(report.step_losses)
            next_round[i] = r + 1
            submit(i)  # the next round only now: one round in flight per peer
            for round_index, reports in assembler.add(i, r, report):
                for warning in staleness_warnings(cfg, reports, warned):
                    events.append(warning)
                    self.reporter.on_event(warning)
                history.append(evaluate_round(round_index, reports, labels, events, **self._task))
                assembled_steps.append([p.step for p in reports])
                events = []
                records = [*self.prior_rounds, *(round_record(h) for h in history)]
                # before reporting: what was shown is durable
                storage.write("progress.json", json.dumps({"rounds": records}).encode())
                self.reporter.on_round(history[-1])
        return history
