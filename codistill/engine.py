"""Engines drive a run: LocalEngine (all peers in one process) and RayEngine (one actor per peer).

Both run the same Peer and the same exchange objects (codistill.exchange); only the board and the
scheduling differ. The driver's unit of progress is a round (`eval_every` steps): after each round
every peer is evaluated on the test set and reports a PeerReport; the driver computes ensemble
metrics and calls the Reporter (progress lines, MLflow).
"""

from __future__ import annotations

import enum
import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

import torch

from codistill.config import RunConfig, to_dict
from codistill.data import load_dataset
from codistill.exchange import ExchangeStats, InMemoryBoard, make_exchange
from codistill.metrics import round_metrics
from codistill.peer import EvalResult, Peer
from codistill.storage import Storage

__all__ = ["Decision", "PeerFailure", "FailurePolicy", "PeerReport", "RoundResult", "Reporter", "Reporters", "RayEngine", "PeerActor", "LocalEngine", "ENGINES", "make_engine", "build_summary"]


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


class Reporters:
    """Fan one stream of progress out to several reporters (console, MLflow, Tune)."""

    def __init__(self, *reporters):
        self.reporters = [r for r in reporters if r is not None]

    def on_start(self, cfg: RunConfig, total_steps: int) -> None:
        for r in self.reporters:
            r.on_start(cfg, total_steps)

    def on_round(self, result: RoundResult) -> None:
        for r in self.reporters:
            r.on_round(result)

    def on_event(self, message: str) -> None:
        for r in self.reporters:
            r.on_event(message)


class _Quiet:
    def on_start(self, cfg: RunConfig, total_steps: int) -> None: ...

    def on_round(self, result: RoundResult) -> None: ...

    def on_event(self, message: str) -> None: ...


class Decision(enum.Enum):
    CONTINUE = "continue"  # the run goes on; the event is shown and recorded
    RAISE = "raise"  # the run stops with the failure's message


@dataclass(frozen=True)
class PeerFailure:
    """Something that happened to a peer actor, as the driver saw it."""

    peer: str
    round: int
    kind: Literal["restarted", "died", "step_failed"]  # "restarted": Ray restarted the actor and it resumed from its checkpoint;
    #            "died": it is dead for good (restarts used up); "step_failed": a step raised
    #            (non-finite loss, a teacher that never came within exchange.timeout_s, ...)
    detail: str
    restarts: int = 0


class FailurePolicy:
    """What the driver does about a PeerFailure (Ray restarts actors itself, up to
    `resources.max_restarts`; the policy decides what the *run* does). Failure handling is data: one
    decision, acted on in one place of the collect loop."""

    def __init__(self, cfg: RunConfig):
        self.max_restarts = cfg.resources.max_restarts

    def decide(self, failure: PeerFailure) -> tuple[Decision, str]:
        if failure.kind == "restarted":
            return Decision.CONTINUE, (f"{failure.peer} restarted ({failure.restarts} restart(s) so far) "
                                       f"and resumed from its last checkpoint")
        if failure.kind == "died":
            return Decision.RAISE, (f"peer {failure.peer} died and could not be restarted "
                                    f"(resources.max_restarts={self.max_restarts}): {failure.detail}")
        # A failed step is deterministic given the peer's checkpoint (a NaN comes back the same way):
        # retrying it would loop, so the run stops and says which peer and why.
        return Decision.RAISE, f"peer {failure.peer} failed in round {failure.round}: {failure.detail}"


def evaluate_round(round_index: int, reports: Sequence[PeerReport], labels: torch.Tensor,
                   events: list[str] | None = None) -> RoundResult:
    reports = sorted(reports, key=lambda r: r.index)
    metrics = round_metrics([r.eval.logits for r in reports], labels)
    return RoundResult(round_index, min(r.step for r in reports), list(reports), metrics, events or [])


def round_record(h: RoundResult) -> dict[str, Any]:
    """A JSON-ready record of a round (what summary.json and the resume file keep)."""
    return {"round": h.round, "step": h.step, **h.metrics, "events": h.events,
            "peers": {p.name: {"step": p.step, "test_accuracy": p.eval.accuracy, "test_loss": p.eval.loss,
                               "train_loss": sum(p.step_losses) / max(1, len(p.step_losses)),
                               "steps_per_s": p.steps_per_s, "lr": p.lr, "restarts": p.restarts,
                               "bytes_published": p.exchange.bytes_published,
                               "bytes_pulled": p.exchange.bytes_pulled,
                               "staleness_mean": p.exchange.staleness()["mean"]}
                      for p in h.peers}}


def build_summary(cfg: RunConfig, history: Sequence[RoundResult], wall_time_s: float,
                  prior_rounds: Sequence[dict] = ()) -> dict[str, Any]:
    """The run's summary.json: final per-peer and ensemble results plus the per-round history
    (`prior_rounds`: records of rounds an earlier driver of the same run finished)."""
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
            "staleness": r.exchange.staleness(),
            "exchange_s": r.exchange.exchange_s, "teacher_forward_s": r.exchange.teacher_forward_s,
            "busy_s": r.busy_s,
        })
    return {
        "name": cfg.name,
        "peers": peers,
        "ensemble": {"test_accuracy": final.metrics["ensemble_accuracy"]},
        "mean_peer_test_accuracy": final.metrics["mean_peer_accuracy"],
        "churn": final.metrics["churn"],
        "mean_pairwise_kl": final.metrics["mean_pairwise_kl"],
        "staleness": total.staleness(),
        "exchange": {"mode": cfg.exchange.mode, "topology": cfg.exchange.topology,
                     "staleness": cfg.exchange.staleness, "period": cfg.exchange.period,
                     "dtype": cfg.exchange.dtype, "bytes_published": ex["bytes_published"],
                     "bytes_pulled": ex["bytes_pulled"], "exchange_s": ex["exchange_s"]},
        "bytes_exchanged": ex["bytes_published"] + ex["bytes_pulled"],
        "restarts": sum(r.restarts for r in final.peers),
        "engine": cfg.engine,
        "wall_time_s": wall_time_s,
        "events": [e for r in prior_rounds for e in r.get("events", [])] + [e for h in history for e in h.events],
        "rounds": [*prior_rounds, *(round_record(h) for h in history)],
        "config": to_dict(cfg),
    }


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
            storage = Storage(out_dir)
            for p in peers:
                storage.write_torch(f"peers/{p.name}.pt", p.weights())
        return history


def checkpoint_steps(storage: Storage, peer_name: str) -> list[int]:
    return sorted(int(n[5:-3]) for n in storage.list(f"checkpoints/{peer_name}") if n.startswith("step-") and n.endswith(".pt"))


# ---------------------------------------------------------------------------------------------
# RayEngine: one actor per peer in a placement group, a named board actor, rounds collected with ray.wait


class PeerActor:
    """A Peer in its own Ray actor. Restarted by Ray (max_restarts), it resumes from its own last
    training checkpoint; started by a resuming driver, from the step the driver names."""

    def __init__(self, cfg_dict: dict, index: int, board_name: str, namespace: str, storage_uri: str,
                 resume_step: int | None):
        import ray

        from codistill.config import build
        from codistill.exchange import RayBoardClient

        self.cfg = cfg = build(cfg_dict)
        threads = cfg.resources.threads_per_peer or max(1, int(cfg.resources.num_cpus))
        torch.set_num_threads(threads)
        self.index = index
        self.storage = Storage(storage_uri)
        self.peer = Peer(cfg, index, load_dataset(cfg.data))
        self.board = RayBoardClient(ray.get_actor(board_name, namespace=namespace), index,
                                    inline_max_bytes=cfg.exchange.inline_max_bytes)
        self.exchange = make_exchange(cfg, index, self.board)
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.busy_s = 0.0
        self.restarts = 0
        self.resumed_from: int | None = None
        steps = checkpoint_steps(self.storage, self.peer.name)
        with warnings.catch_warnings():  # Ray's own property uses a deprecated accessor internally
            warnings.simplefilter("ignore")
            reconstructed = ctx.was_current_actor_reconstructed
        if reconstructed:
            self.restarts = ray.get(self.board.handle.note_restart.remote(index))
            step = steps[-1] if steps else None
        else:
            step = resume_step if resume_step in steps else None
        if step is not None:
            self._load(step)

    def _load(self, step: int) -> None:
        state = self.storage.read_torch(f"checkpoints/{self.peer.name}/step-{step}.pt")
        self.peer.load_training_state(state)
        self.busy_s = float(state["busy_s"])
        self.restarts = max(self.restarts, int(state["restarts"]))
        for k, v in state["exchange"].items():
            setattr(self.exchange.stats, k, type(getattr(self.exchange.stats, k))(v))
        self.resumed_from = step
        self.board.mark_durable(self.index, step)

    def _save(self) -> None:
        state = self.peer.training_state()
        state.update(busy_s=self.busy_s, restarts=self.restarts, exchange=vars(self.exchange.stats).copy())
        name = self.peer.name
        self.storage.write_torch(f"checkpoints/{name}/step-{self.peer.step}.pt", state)
        for old in checkpoint_steps(self.storage, name)[:-3]:  # keep the newest three
            self.storage.delete(f"checkpoints/{name}/step-{old}.pt")
        self.board.mark_durable(self.index, self.peer.step)

    def info(self) -> dict[str, Any]:
        return {"step": self.peer.step, "total_steps": self.peer.total_steps, "node_id": self.node_id, "restarts": self.restarts,
                "resumed_from": self.resumed_from, "device": str(self.peer.device),
                "gpu_ids": __import__("ray").get_gpu_ids()}

    def test_labels(self) -> torch.Tensor:
        return self.peer.dataset.test_y

    def run_round(self, until_step: int, round_index: int) -> PeerReport:
        """Train (free-running: waits only where the exchange says) until `until_step`, then evaluate."""
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
        self.busy_s += time.perf_counter() - t0
        if not every or peer.step % every:
            self._save()  # every round ends durable: restarts and --resume start from here
        return PeerReport(self.index, peer.name, self.cfg.peers[self.index].model, peer.step, losses,
                          peer.evaluate(), self.busy_s, ex.stats, lr, self.restarts, self.node_id)

    def take_weights(self, version: int):
        return self.board.take_weights(version)

    def final_weights(self) -> dict[str, torch.Tensor]:
        return self.peer.weights()


class RayEngine:
    """Peers as Ray actors exchanging through the object store; the driver only collects rounds."""

    def __init__(self, cfg: RunConfig, reporter: Reporter | None = None, resume: bool = False):
        self.cfg = cfg
        self.reporter = reporter or _Quiet()
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

    def _placement_group(self):
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
            raise RuntimeError(
                f"resources: cannot reserve {self.cfg.num_peers} peers x {bundle} (placement={res.placement}); "
                f"the cluster has {ray.cluster_resources()} in all and {ray.available_resources()} free. "
                f"Lower resources.num_cpus / resources.num_gpus or add nodes.")
        return pg, 0, True

    def run(self, out_dir: str | Path) -> list[RoundResult]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from codistill.exchange import RayBoardActor

        cfg, res = self.cfg, self.cfg.resources
        self.init_ray()
        storage = Storage(out_dir)
        names = [cfg.peer_name(i) for i in range(cfg.num_peers)]
        resume_step = None
        if self.resume:
            progress = json.loads((storage.read("progress.json") or b"{}").decode() or "{}")
            self.prior_rounds = progress.get("rounds", [])
            have = [set(checkpoint_steps(storage, n)) for n in names]
            common = set.intersection(*have) if have else set()
            resume_step = max(common) if common else None  # every peer restarts from the same step
            if resume_step is not None:
                self.prior_rounds = [r for r in self.prior_rounds if r["step"] <= resume_step]
        run_id = uuid.uuid4().hex[:8]
        namespace = ray.get_runtime_context().namespace
        actor_names = [f"codistill-{run_id}-{n}" for n in names]
        board = ray.remote(RayBoardActor).options(
            name=f"codistill-{run_id}-board", namespace=namespace, num_cpus=0, max_concurrency=10_000,
        ).remote(to_dict(cfg), actor_names, namespace)
        pg, first_bundle, own_pg = self._placement_group()
        # take_weights runs in its own thread ("exchange" group) so the board can pull a checkpoint
        # while the peer is busy training.
        remote_peer = ray.remote(concurrency_groups={"exchange": 1})(PeerActor)
        actors = []
        try:
            for i in range(cfg.num_peers):
                actors.append(remote_peer.options(
                    name=actor_names[i], namespace=namespace, num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                    max_restarts=res.max_restarts, max_task_retries=res.max_restarts,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=first_bundle + i),
                ).remote(to_dict(cfg), i, f"codistill-{run_id}-board", namespace, storage.uri, resume_step))
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

    def _round_ends(self, total: int) -> list[int]:
        every = self.cfg.eval_every
        return [min(e, total) for e in range(every, total + every, every)]

    def _collect(self, actors, labels: torch.Tensor, storage: Storage) -> list[RoundResult]:
        import ray

        cfg = self.cfg
        totals = [info["total_steps"] for info in self.peer_info]  # may differ per peer under `disjoint` shards
        self.reporter.on_start(cfg, max(totals))
        self._last_report: dict[int, PeerReport] = {}
        pending: dict[Any, tuple[int, int]] = {}
        ends = [self._round_ends(t) for t in totals]
        first_round = len(self.prior_rounds)
        for i, a in enumerate(actors):
            start = self.peer_info[i]["step"]
            for r, end in enumerate(ends[i]):
                if end > start:
                    pending[a.run_round.remote(end, r)] = (i, r)
        by_round: dict[int, dict[int, PeerReport]] = {}
        history: list[RoundResult] = []
        restarts = [info["restarts"] for info in self.peer_info]
        events: list[str] = []
        for i, info in enumerate(self.peer_info):
            if info["resumed_from"] is not None:
                events.append(f"{cfg.peer_name(i)} resumed from its checkpoint at step {info['resumed_from']}")
                self.reporter.on_event(events[-1])
        num_rounds = max(len(e) for e in ends)
        next_round = first_round
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
                        raise RuntimeError(msg)
                    events.append(msg)
                    self.reporter.on_event(msg)
                assert report is not None, "only a round that came back can be continued"
                self.step_losses[i].extend(report.step_losses)
                by_round.setdefault(r, {})[i] = report
            # Rounds complete in order; a peer that finished early (shorter shard) reports its last round again.
            while next_round < num_rounds and len(by_round.get(next_round, {})) + sum(
                    1 for i in range(cfg.num_peers) if len(ends[i]) <= next_round) == cfg.num_peers:
                reports = dict(by_round.pop(next_round, {}))
                for i in range(cfg.num_peers):
                    if i not in reports:
                        reports[i] = self._last_report[i]
                for i, rep in reports.items():
                    self._last_report[i] = rep
                history.append(evaluate_round(next_round, list(reports.values()), labels, events))
                events = []
                storage.write("progress.json", json.dumps(  # before reporting: what was shown is durable
                    {"rounds": [*self.prior_rounds, *(round_record(h) for h in history)]}).encode())
                self.reporter.on_round(history[-1])
                next_round += 1
        return history


ENGINES = {"local": LocalEngine, "ray": RayEngine}


def make_engine(cfg: RunConfig, reporter: Reporter | None = None, resume: bool = False):
    if resume and cfg.engine != "ray":
        raise ValueError("--resume: needs engine=ray (LocalEngine keeps no training checkpoints)")
    return ENGINES[cfg.engine](cfg, reporter, resume=resume) if resume else ENGINES[cfg.engine](cfg, reporter)
