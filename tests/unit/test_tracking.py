"""MLflow tracking read back with MLflow's own client from a SQLite store in a temp dir."""

import json
from pathlib import Path

import mlflow
import mlflow.models
import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from codistill.api import run_job
from tests.helpers import small_job


def test_run_logs_parent_and_nested_peer_runs_with_metrics_and_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = small_job("tracking.backend=mlflow", f"tracking.uri={uri}", "tracking.experiment=codistill-test", steps=30)
    summary = run_job(cfg, str(tmp_path / "run"), run_name="test-20261123-101500-ab12")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["codistill-test"])
    assert len(runs) == 3  # parent + 2 peers
    parent = runs[runs["tags.codistill.kind"] == "job"].iloc[0]
    peers = runs[runs["tags.codistill.kind"] == "peer"]
    assert parent["run_id"] == summary["mlflow_run_id"] and parent["status"] == "FINISHED"
    assert set(peers["tags.mlflow.parentRunId"]) == {parent["run_id"]}
    # names a list can be read by: the run id (job, time, suffix) and, for peers, the peer
    assert parent["tags.mlflow.runName"] == "test-20261123-101500-ab12" == summary["run_id"]
    assert sorted(peers["tags.mlflow.runName"]) == [
        "test-20261123-101500-ab12/peer0-mlp",
        "test-20261123-101500-ab12/peer1-cnn",
    ]
    assert sorted(peers["tags.codistill.peer"]) == ["peer0-mlp", "peer1-cnn"]
    assert parent["tags.mlflow.user"] and parent["tags.mlflow.source.name"]  # MLflow's own source tags
    # params: the flattened config
    assert parent["params.loss.alpha"] == "0.5" and parent["params.peers.1.model"] == "cnn"
    assert parent["params.exchange.mode"] == "logits"
    client = MlflowClient(uri)
    # artifacts beside the store, not in ./mlruns of whatever directory the run started in (under
    # `ray job submit --working-dir` that is Ray's job package, deleted with the job)
    assert parent["artifact_uri"].startswith((tmp_path / "mlartifacts").as_uri())
    assert not (Path.cwd() / "mlruns").exists()
    hist = client.get_metric_history(parent["run_id"], "ensemble_accuracy")
    assert [m.step for m in hist] == [10, 20, 30]
    assert hist[-1].value == pytest.approx(summary["ensemble"]["test_accuracy"])
    assert len(client.get_metric_history(parent["run_id"], "churn")) == 3
    for _, peer in peers.iterrows():
        acc = client.get_metric_history(peer["run_id"], "test_accuracy")
        assert [m.step for m in acc] == [10, 20, 30]
        for key in ("train_loss", "steps_per_s", "staleness_mean", "bytes_pulled", "restarts"):
            assert client.get_metric_history(peer["run_id"], key), key
        # the training loss of every step, equal to the round means summary.json keeps
        steps = client.get_metric_history(peer["run_id"], "step_loss")
        assert [m.step for m in steps] == list(range(1, 31))
        name = peer["tags.codistill.peer"]
        first_round = [m.value for m in steps[:10]]
        assert sum(first_round) / 10 == pytest.approx(summary["rounds"][0]["peers"][name]["train_loss"])
        # the final model, loadable by MLflow, with a signature; the dataset as an input
        models = client.search_logged_models(
            experiment_ids=[peer["experiment_id"]], filter_string=f"source_run_id = '{peer['run_id']}'"
        )
        assert len(models) == 1 and models[0].name == name
        loaded = mlflow.pytorch.load_model(models[0].model_uri)
        weights = torch.load(tmp_path / "run" / "peers" / f"{name}.pt", weights_only=True)
        assert all(torch.equal(v, weights[k]) for k, v in loaded.state_dict().items())
        info = mlflow.models.get_model_info(models[0].model_uri)
        assert info.signature is not None and info.saved_input_example_info is not None
        inputs = client.get_run(peer["run_id"]).inputs
        assert inputs is not None and [d.dataset.name for d in inputs.dataset_inputs] == ["synthetic"]
    names = {a.path for a in client.list_artifacts(parent["run_id"])}
    assert {"job.yaml", "summary.json", "curves.png", "peers"} <= names
    weights = {a.path for a in client.list_artifacts(parent["run_id"], "peers")}
    assert weights == {"peers/peer0-mlp.pt", "peers/peer1-cnn.pt"}
    local = client.download_artifacts(parent["run_id"], "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["churn"] == summary["churn"]
    png = Path(client.download_artifacts(parent["run_id"], "curves.png", str(tmp_path))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_tracking_none_creates_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_job(small_job("tracking=none", steps=5), str(tmp_path / "run"))
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow  # 25 s: a round outlasts MLflow's 20 s wait for a SQLite store that is locked on purpose
def test_a_broken_store_never_stops_training_and_nothing_is_lost(tmp_path):
    """The SQLite store is locked by another process mid-run, for longer than MLflow waits for it: one
    warning line, the run goes on, and what could not be logged is logged when the store is back
    (summary.json is the record throughout)."""
    import sqlite3
    import time

    from codistill.engine.report import Reporter

    db = tmp_path / "mlflow.db"

    class LockTheStore(Reporter):
        def __init__(self) -> None:
            self.lock: sqlite3.Connection | None = None
            self.events: list[str] = []

        def on_event(self, message: str) -> None:
            self.events.append(message)

        def on_round(self, result) -> None:
            if result.round == 1:  # lock the database as a writer would (once the tracker's write ends)
                self.lock = sqlite3.connect(db, timeout=60, isolation_level=None)
                self.lock.execute("BEGIN EXCLUSIVE")
            if result.round == 3 and self.lock is not None:
                # round 2's calls wait for the lock in the background, MLflow's SQLite busy_timeout (20 s),
                # then fail while training goes on (a long round here)
                time.sleep(25)
                self.lock.execute("COMMIT")
                self.lock.close()

    cfg = small_job(
        "tracking.backend=mlflow",
        f"tracking.uri=sqlite:///{db}",
        "tracking.experiment=broken",
        "eval_every=10",
        steps=50,
    )
    reporter = LockTheStore()
    summary = run_job(cfg, tmp_path / "run", reporter)
    warnings = [e for e in reporter.events if e.startswith("warning: MLflow")]
    assert len(warnings) == 1 and "training goes on" in warnings[0], reporter.events
    assert [r["step"] for r in summary["rounds"]] == [10, 20, 30, 40, 50]
    client = MlflowClient(f"sqlite:///{db}")
    history = client.get_metric_history(summary["mlflow_run_id"], "ensemble_accuracy")
    assert sorted(m.step for m in history) == [10, 20, 30, 40, 50]
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"


def test_a_run_leaves_the_programs_mlflow_tracking_uri_as_it_was(tmp_path, monkeypatch):
    """`codistill.train` in a notebook must not repoint the user's MLflow (nor a next run's default store,
    which follows MLFLOW_TRACKING_URI) at the store of the run that just ended."""
    import os

    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)  # as in a fresh process
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_job(small_job("tracking.backend=mlflow", f"tracking.uri={uri}", steps=10), str(tmp_path / "run"))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking_utils._tracking_uri is None
    mine = f"sqlite:///{tmp_path}/mine.db"
    mlflow.set_tracking_uri(mine)
    run_job(small_job("tracking.backend=mlflow", f"tracking.uri={uri}", steps=10), str(tmp_path / "run2"))
    assert mlflow.get_tracking_uri() == mine and os.environ["MLFLOW_TRACKING_URI"] == mine


class _Events:
    """A reporter that keeps the run's event lines (warnings among them)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def on_event(self, message: str) -> None:
        self.events.append(message)


def _mlflow_warnings(events: list[str]) -> list[str]:
    return [e for e in events if e.startswith("warning: MLflow")]


def _closed_port() -> int:
    """A local port nothing listens on (bound, noted, closed): connections are refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unreachable_store_run(tmp_path, uri: str) -> tuple[dict, list[str]]:
    from codistill.engine.report import Reporter

    class Events(_Events, Reporter):
        pass

    cfg = small_job(
        "tracking.backend=mlflow",
        f"tracking.uri={uri}",
        "tracking.connect_timeout_s=1",
        "tracking.request_timeout_s=1",
        steps=20,
    )
    reporter = Events()
    summary = run_job(cfg, tmp_path / "run", reporter)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["churn"] == summary["churn"]
    assert [r["step"] for r in summary["rounds"]] == [10, 20]
    assert summary["mlflow_run_id"] is None  # the runs were never created: summary.json is the record
    assert not (tmp_path / "run" / "tracking.json").exists()  # no runs for a resumed driver to continue
    return summary, _mlflow_warnings(reporter.events)


# Unbounded, MLflow's own HTTP retries hold a run for minutes before it starts (7 retries with
# exponential backoff: 256 s against a refused port, 120 s per try against a silent server).
@pytest.mark.timeout(120)
def test_a_store_that_is_down_never_stops_training(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    _, warnings = _unreachable_store_run(tmp_path, uri)
    # one line when it starts (the store did not answer), one at the end (what could not be logged)
    assert len(warnings) == 2, warnings
    assert uri in warnings[0] and "training goes on" in warnings[0] and "background" in warnings[0]
    assert uri in warnings[1] and "not logged" in warnings[1] and "summary.json" in warnings[1]


@pytest.mark.timeout(120)
def test_a_store_that_never_answers_never_stops_training(tmp_path):
    """A server that accepts connections and never replies: per-call timeouts bound every call."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_stay_silent() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:  # timeout, or closed
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        _, warnings = _unreachable_store_run(tmp_path, uri)
        assert len(warnings) == 2, warnings
        assert uri in warnings[0] and "training goes on" in warnings[0]
        assert "not logged" in warnings[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.slow  # 15 s: a SQLite store made, then locked on purpose
@pytest.mark.timeout(180)
def test_a_store_that_answers_late_gets_the_whole_run(tmp_path):
    """The store does not answer when the run starts (another process holds the database) and does only
    once the last round is done: the runs are created then, tracking.json and summary.json name them, and
    every round, queued before they existed, is logged in them."""
    import sqlite3

    from codistill.engine.report import Reporter

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    MlflowClient(uri).search_experiments()  # the store's tables exist
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    run_dir = tmp_path / "run"

    class Unlock(_Events, Reporter):
        def on_round(self, result) -> None:
            if result.round == 3:  # the last (from 0): the runs are made in the background as the run ends
                lock.execute("COMMIT")
                lock.close()

    cfg = small_job(
        "tracking.backend=mlflow",
        f"tracking.uri={uri}",
        "tracking.experiment=late",
        "tracking.connect_timeout_s=1",
        steps=40,
    )
    reporter = Unlock()
    summary = run_job(cfg, run_dir, reporter)
    warnings = _mlflow_warnings(reporter.events)
    assert len(warnings) == 1 and "did not answer" in warnings[0] and "training goes on" in warnings[0], warnings
    state = json.loads((run_dir / "tracking.json").read_text())
    assert state["uri"] == uri and state["run_id"] == summary["mlflow_run_id"] is not None
    assert sorted(state["peer_runs"]) == ["peer0-mlp", "peer1-cnn"]
    client = MlflowClient(uri)
    job = client.get_run(state["run_id"])
    assert job.info.status == "FINISHED" and job.data.params["loss.alpha"] == "0.5"
    # round 0 was queued before the runs existed: logged into them all the same
    assert [m.step for m in client.get_metric_history(state["run_id"], "ensemble_accuracy")] == [10, 20, 30, 40]
    for peer, run_id in state["peer_runs"].items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == state["run_id"]
        assert run.data.tags["codistill.peer"] == peer and run.data.params["peer.model"] == peer.split("-")[1]
        assert [m.step for m in client.get_metric_history(run_id, "step_loss")] == list(range(1, 41))
