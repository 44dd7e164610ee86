"""Whatever dies, the run finishes or stops with the truth, and nothing it reported or kept is wrong:
SIGKILL of peers and of the board (both exchanges), with every round of the history checked against
MLflow; a lost node in a three-node cluster is in tests/ray/test_multinode.py; a killed driver and
resume in test_resume.py."""

import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from codistill.api import run_job
from codistill.engine import LocalEngine
from codistill.engine.report import Reporter
from tests.helpers import small_job

pytestmark = pytest.mark.slow


def ray_job(*overrides, steps=20):
    return small_job("engine=ray", "resources.num_cpus=1", "resources.threads_per_peer=1", *overrides, steps=steps)


class SigKill(Reporter):
    """Kills (SIGKILL) the process of the named actor of this run once round `after_round` is reported (-1: as
    the rounds start, before any peer has trained a step or written a checkpoint)."""

    def __init__(self, ray, name_part: str, after_round: int):
        self.ray, self.name_part, self.after_round = ray, name_part, after_round
        self.killed_pid: int | None = None
        self.events: list[str] = []

    def on_event(self, message: str) -> None:
        self.events.append(message)

    def on_start(self, cfg, total_steps: int) -> None:
        if self.after_round == -1:
            self._kill()

    def on_round(self, result) -> None:
        if result.round == self.after_round and self.killed_pid is None:
            self._kill()

    def _kill(self) -> None:
        ray = self.ray
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if self.name_part in a["name"]]
        handle = ray.get_actor(names[-1], namespace=ray.get_runtime_context().namespace)
        method = handle.pid if "board" in self.name_part else None
        if method is not None:
            self.killed_pid = ray.get(method.remote())
        else:  # a peer actor, or the last rank of a data-parallel peer's worker group
            info = ray.get(handle.info.remote())
            self.killed_pid = info.get("pids", [info["pid"]])[-1]
        os.kill(self.killed_pid, signal.SIGKILL)


def check_every_round(summary: dict, uri: str, run_id: str, steps: int, every: int) -> None:
    """Steps strictly increasing per peer, losses finite and non-zero, MLflow's history equal to summary.json."""
    rounds = summary["rounds"]
    assert [r["step"] for r in rounds] == list(range(every, steps + 1, every))
    client = MlflowClient(uri)
    peer_runs = {
        r.data.tags["codistill.peer"]: r.info.run_id
        for r in client.search_runs(
            [client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"
        )
    }
    for name in summary["rounds"][0]["peers"]:
        seen = [r["peers"][name] for r in rounds]
        assert [p["step"] for p in seen] == [r["step"] for r in rounds]  # lockstep rounds: each peer's own step
        for p in seen:
            assert math.isfinite(p["train_loss"]) and p["train_loss"] > 0, (name, p)
        history = client.get_metric_history(peer_runs[name], "train_loss")
        assert [(m.step, m.value) for m in history] == [(p["step"], pytest.approx(p["train_loss"])) for p in seen]
        acc = client.get_metric_history(peer_runs[name], "test_accuracy")
        assert [m.value for m in acc] == [pytest.approx(p["test_accuracy"]) for p in seen]
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize(
    "mode",
    [
        # with a hidden-state term: the restarted peer's projections come back from its checkpoint, so the run
        # ends exactly where an undisturbed one does
        ("exchange.mode=logits", "loss.terms=[{name: logits}, {name: hidden_mse, weight: 0.1}]"),
        ("exchange.mode=logits", "exchange.inline_max_bytes=0"),  # the dead publisher's shards are lost objects
        ("exchange.mode=checkpoint", "exchange.period=5"),
    ],
)
def test_killed_peer_is_restarted_and_every_round_is_true(ray_session, tmp_path, mode):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = ray_job(
        *mode, "eval_every=10", "exchange.timeout_s=120", "tracking.backend=mlflow", f"tracking.uri={uri}", steps=40
    )
    killer = SigKill(ray_session, "peer1", after_round=0)
    summary = run_job(cfg, tmp_path / "run", killer)
    if not cfg.loss.default_terms:  # lockstep logits are deterministic: compare with the same job undisturbed
        torch.set_num_threads(1)
        LocalEngine(small_job(*mode, "eval_every=10", steps=40)).run(tmp_path / "local")
        for name in ("peer0-mlp", "peer1-cnn"):
            local = torch.load(tmp_path / "local" / "peers" / f"{name}.pt", weights_only=True)
            remote = torch.load(tmp_path / "run" / "peers" / f"{name}.pt", weights_only=True)
            for k in local:
                assert torch.allclose(local[k].float(), remote[k].float(), rtol=1e-4, atol=1e-5), (name, k)
    assert killer.killed_pid is not None
    assert [p["steps"] for p in summary["peers"]] == [40, 40]
    assert summary["peers"][1]["restarts"] >= 1 and summary["peers"][0]["restarts"] == 0
    # one line per restart, and it says where the peer went on (a round-end checkpoint: a step of 10, 20, ...)
    told = [e for e in summary["events"] if "peer1-cnn" in e]
    assert told and all(re.fullmatch(RESUMED, e) for e in told), told
    assert summary["mean_peer_test_accuracy"] > 0.3
    assert all(p["bytes_pulled"] > 0 for p in summary["peers"])
    check_every_round(summary, uri, summary["mlflow_run_id"], 40, 10)


RESUMED = r"peer1-cnn restarted \(\d restart\(s\) so far\) and resumed from its checkpoint at step [1-9]0"


def test_a_peer_killed_before_its_first_checkpoint_starts_over_and_says_so_once(ray_session, tmp_path):
    killer = SigKill(ray_session, "peer1", after_round=-1)
    summary = run_job(ray_job("eval_every=10", "exchange.timeout_s=120"), tmp_path / "run", killer)
    assert killer.killed_pid is not None and [p["steps"] for p in summary["peers"]] == [20, 20]
    line = "peer1-cnn restarted (1 restart(s) so far) and started over from step 0 (no usable checkpoint)"
    assert [e for e in killer.events if "peer1-cnn" in e] == [line]  # shown once ...
    assert [e for e in summary["events"] if "peer1-cnn" in e] == [line]  # ... and recorded once


@pytest.mark.parametrize("mode", [("exchange.mode=logits",), ("exchange.mode=checkpoint", "exchange.period=5")])
def test_killed_board_is_rebuilt_and_the_run_finishes(ray_session, tmp_path, mode):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = ray_job(
        *mode, "eval_every=10", "exchange.timeout_s=120", "tracking.backend=mlflow", f"tracking.uri={uri}", steps=40
    )
    killer = SigKill(ray_session, "-board", after_round=0)
    summary = run_job(cfg, tmp_path / "run", killer)
    assert killer.killed_pid is not None
    assert [p["steps"] for p in summary["peers"]] == [40, 40]
    assert summary["restarts"] == 0  # no peer died
    assert all(p["bytes_pulled"] > 0 for p in summary["peers"])
    check_every_round(summary, uri, summary["mlflow_run_id"], 40, 10)
    # the restart is an event of the run, told once and kept in summary.json and MLflow's copy of it
    line = "the exchange board restarted (1 restart(s) so far); the peers publish again what it held"
    assert [e for e in killer.events if "board" in e] == [line] and summary["events"] == [line]
    logged = MlflowClient(uri).download_artifacts(summary["mlflow_run_id"], "summary.json", str(tmp_path))
    assert json.loads(Path(logged).read_text())["events"] == [line]
