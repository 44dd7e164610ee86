"""What a run reports: a peer's round (PeerReport), a whole round (RoundResult), the Reporter hooks
that progress lines, MLflow and Tune implement, and the run's summary."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from codistill.config import RunConfig, to_dict
from codistill.exchange import EXCHANGES, ExchangeStats
from codistill.metrics import eval_round_metrics
from codistill.tasks import EvalResult

__all__ = [
    "PeerReport",
    "Reporter",
    "Reporters",
    "RoundResult",
    "build_summary",
    "evaluate_round",
    "round_record",
    "staleness_warnings",
    "term_means",
]


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
    events: list[str] = field(default_factory=list)  # what the peer has to tell (e.g. a checkpoint it skipped)
    batch_size: int = 0  # examples per step (the global batch of a data-parallel peer)
    workers: int = 1  # ranks of a data-parallel peer (a Ray Train worker group)
    node_ids: list[str] = field(default_factory=list)  # every rank's node (rank 0's is node_id)
    terms: dict[str, float] = field(default_factory=dict)  # the round's mean of each loss term and influence statistic
    strategy: str = "ddp"  # how a worker group holds its model (peers[i].strategy)
    memory_kind: str = ""  # "cuda" (peak allocated on the device) or "rss" (peak resident set, CPU)
    peak_memory: list[int] = field(default_factory=list)  # bytes, per rank (codistill.peer.memory)

    def memory_record(self) -> dict[str, Any]:
        """The memory report of this peer (summary.json, round records, MLflow)."""
        if not self.peak_memory:
            return {}
        by_rank = [round(b / 2**20, 1) for b in self.peak_memory]
        return {"memory_kind": self.memory_kind, "peak_memory_mb": max(by_rank), "peak_memory_mb_by_rank": by_rank}

    @property
    def steps_per_s(self) -> float:
        return self.step / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.steps_per_s * self.batch_size

    @property
    def train_loss(self) -> float:
        return sum(self.step_losses) / max(1, len(self.step_losses))


def term_means(rows: Sequence[dict[str, float] | None]) -> dict[str, float]:
    """The mean over a round's steps of each loss term's value and influence statistic (StepLoss.terms), over
    the steps that had it (NaN: a step before burn-in, or one without influence weights)."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        for k, v in (row or {}).items():
            sums.setdefault(k, [])
            if math.isfinite(v):
                sums[k].append(v)
    return {k: sum(v) / len(v) for k, v in sums.items() if v}


@dataclass
class RoundResult:
    round: int
    step: int  # the slowest peer's completed steps
    peers: list[PeerReport]
    metrics: dict[str, float]  # ensemble-level (codistill.metrics.eval_round_metrics)
    events: list[str] = field(default_factory=list)  # restarts, warnings and other notable things
    task: str = "classification"  # the dataset's (codistill.tasks.TASKS): what the numbers mean


class Reporter:
    """Hooks called by the engines: `on_start` once, `on_event` whenever something notable happens,
    `on_round` after each round (a resumed run: `on_resume` first, before `on_start`); then by `run_job`:
    `on_end` when the run finished, or `on_fail` when it stopped before its end. Each does nothing unless
    overridden."""

    def on_start(self, cfg: RunConfig, total_steps: int) -> None:
        pass

    def on_resume(self, prior_rounds: list[dict]) -> None:
        """A resumed run goes on after these rounds (records as in summary.json) of earlier drivers."""

    def on_round(self, result: RoundResult) -> None:
        pass

    def on_event(self, message: str) -> None:
        pass

    def on_end(self, summary: dict[str, Any]) -> None:
        """The run finished: its summary, as summary.json (written before this is called) holds it."""

    def on_fail(self, status: str) -> None:
        """The run stopped before its end: "FAILED" (an error in the run) or "KILLED" (stopped from outside:
        a Tune scheduler, Ctrl-C); it may not have started (`on_start`) yet."""


class Reporters(Reporter):
    """Fan one stream of progress out to several reporters (console, MLflow, Tune)."""

    def __init__(self, *reporters: Reporter | None):
        self.reporters = [r for r in reporters if r is not None]

    def on_start(self, cfg: RunConfig, total_steps: int) -> None:
        for r in self.reporters:
            r.on_start(cfg, total_steps)

    def on_resume(self, prior_rounds: list[dict]) -> None:
        for r in self.reporters:
            r.on_resume(prior_rounds)

    def on_round(self, result: RoundResult) -> None:
        for r in self.reporters:
            r.on_round(result)

    def on_event(self, message: str) -> None:
        for r in self.reporters:
            r.on_event(message)

    def on_end(self, summary: dict[str, Any]) -> None:
        for r in self.reporters:
            r.on_end(summary)

    def on_fail(self, status: str) -> None:
        for r in self.reporters:
            r.on_fail(status)


def staleness_warnings(cfg: RunConfig, reports: Sequence[PeerReport], warned: set[str]) -> list[str]:
    """One line per peer (the first time only: `warned` remembers) whose observed staleness exceeds
    what the job asked for."""
    limit = EXCHANGES[cfg.exchange.mode].staleness_limit(cfg.exchange)
    out = []
    for r in reports:
        if r.exchange.staleness_max > limit and r.name not in warned:
            warned.add(r.name)
            out.append(
                f"warning: {r.name} distilled from a teacher {r.exchange.staleness_max} steps old, more than the "
                f"{limit} this job allows ({EXCHANGES[cfg.exchange.mode].describe(cfg.exchange)})"
            )
    return out


def evaluate_round(
    round_index: int,
    reports: Sequence[PeerReport],
    labels: torch.Tensor,
    events: list[str] | None = None,
    *,
    task: str = "classification",
    num_classes: int,
) -> RoundResult:
    """A round from the peers' reports; `labels` are the evaluation set's (classification: the ensemble's
    accuracy), `num_classes` the dataset's (its vocabulary for language models)."""
    reports = sorted(reports, key=lambda r: r.index)
    metrics = eval_round_metrics([r.eval for r in reports], num_classes, labels)
    return RoundResult(round_index, min(r.step for r in reports), list(reports), metrics, events or [], task)


def round_record(h: RoundResult) -> dict[str, Any]:
    """A JSON-ready record of a round (what summary.json and the resume file keep)."""
    peers = {
        p.name: {
            "step": p.step,
            "test_accuracy": p.eval.accuracy,
            "test_loss": p.eval.loss,
            "perplexity": p.eval.perplexity,
            "train_loss": p.train_loss,
            **p.eval.train,  # train_set_loss, train_accuracy (and train_accuracy_clean): data.train_eval
            "steps_per_s": p.steps_per_s,
            "samples_per_s": p.samples_per_s,
            "lr": p.lr,
            "restarts": p.restarts,
            "bytes_published": p.exchange.bytes_published,
            "bytes_pulled": p.exchange.bytes_pulled,
            "staleness_mean": p.exchange.staleness()["mean"],
            "staleness_max": p.exchange.staleness_max,
            "teacher_lead_max": p.exchange.teacher_lead_max,
            **p.memory_record(),
            **({"terms": dict(p.terms)} if p.terms else {}),
        }
        for p in h.peers
    }
    return {"round": h.round, "step": h.step, **h.metrics, "events": h.events, "peers": peers}


def build_summary(
    cfg: RunConfig,
    history: Sequence[RoundResult],
    wall_time_s: float,
    prior_rounds: Sequence[dict] = (),
    final: RoundResult | None = None,
    exports: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The run's summary.json: final per-peer and ensemble results plus the per-round history
    (`prior_rounds`: records of rounds an earlier driver of the same run finished; `final`: the last
    round when this driver ran none, as when a run resumes after its last round; `exports`: each language-model
    peer's Hugging Face export, by name (codistill.engine.export), as its `export` entry)."""
    final = history[-1] if history else final
    assert final is not None, "a summary needs a round"
    total = ExchangeStats()
    for r in final.peers:
        total.merge(r.exchange)
    ex = total.to_dict()
    peers = [
        {
            "name": r.name,
            "model": r.model,
            "test_accuracy": r.eval.accuracy,
            "test_loss": r.eval.loss,
            "perplexity": r.eval.perplexity,
            **r.eval.train,
            "steps": r.step,
            "teacher_forwards": r.exchange.teacher_forwards,
            "steps_per_s": r.steps_per_s,
            "samples_per_s": r.samples_per_s,
            "restarts": r.restarts,
            "workers": r.workers,
            "strategy": r.strategy,
            **r.memory_record(),
            "node_id": r.node_id,
            "node_ids": r.node_ids or ([r.node_id] if r.node_id else []),
            "bytes_published": r.exchange.bytes_published,
            "bytes_per_publish": r.exchange.bytes_per_publish,  # checkpoint mode: one version's
            "bytes_pulled": r.exchange.bytes_pulled,
            "staleness": r.exchange.staleness(),
            "exchange_s": r.exchange.exchange_s,
            "teacher_forward_s": r.exchange.teacher_forward_s,
            "busy_s": r.busy_s,
            **({"terms": dict(r.terms)} if r.terms else {}),
            **({"export": dict(exports[r.name])} if exports and r.name in exports else {}),
        }
        for r in final.peers
    ]
    return {
        "name": cfg.name,
        "task": final.task,
        "peers": peers,
        "ensemble": {
            "test_accuracy": final.metrics.get("ensemble_accuracy"),  # classification only
            "test_loss": final.metrics["ensemble_loss"],
        },
        "mean_peer_test_accuracy": final.metrics["mean_peer_accuracy"],
        "mean_peer_test_loss": final.metrics["mean_peer_loss"],
        "churn": final.metrics["churn"],
        "mean_pairwise_kl": final.metrics["mean_pairwise_kl"],
        "staleness": total.staleness(),
        "exchange": {
            "mode": cfg.exchange.mode,
            "topology": cfg.exchange.topology,
            "staleness": cfg.exchange.staleness,
            "period": cfg.exchange.period,
            "max_staleness": cfg.exchange.staleness_bound,
            "staleness_limit": EXCHANGES[cfg.exchange.mode].staleness_limit(cfg.exchange),
            "dtype": cfg.exchange.dtype,
            "bytes_published": ex["bytes_published"],
            "bytes_pulled": ex["bytes_pulled"],
            "exchange_s": ex["exchange_s"],
        },
        "bytes_exchanged": ex["bytes_published"] + ex["bytes_pulled"],
        "restarts": sum(r.restarts for r in final.peers),
        "engine": cfg.engine,
        "wall_time_s": wall_time_s,
        "events": [e for r in prior_rounds for e in r.get("events", [])] + [e for h in history for e in h.events],
        "rounds": [*prior_rounds, *(round_record(h) for h in history)],
        "config": to_dict(cfg),
    }
