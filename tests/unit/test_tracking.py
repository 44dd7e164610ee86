"""MLflow tracking read back with MLflow's own client from a SQLite store in a temp dir."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from codistill.api import train
from tests.helpers import small_job


def test_run_logs_parent_and_nested_peer_runs_with_metrics_and_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = small_job("tracking.backend=mlflow", f"tracking.uri={uri}", "tracking.experiment=codistill-test", steps=30)
    summary = train(cfg, str(tmp_path / "run"))
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["codistill-test"])
    assert len(runs) == 3  # parent + 2 peers
    parent = runs[runs["tags.codistill.kind"] == "job"].iloc[0]
    peers = runs[runs["tags.codistill.kind"] == "peer"]
    assert parent["run_id"] == summary["mlflow_run_id"] and parent["status"] == "FINISHED"
    assert set(peers["tags.mlflow.parentRunId"]) == {parent["run_id"]}
    assert sorted(peers["tags.mlflow.runName"]) == ["peer0-mlp", "peer1-cnn"]
    # params: the flattened config
    assert parent["params.loss.alpha"] == "0.5" and parent["params.peers.1.model"] == "cnn"
    assert parent["params.exchange.mode"] == "logits"
    client = MlflowClient(uri)
    hist = client.get_metric_history(parent["run_id"], "ensemble_accuracy")
    assert [m.step for m in hist] == [10, 20, 30]
    assert hist[-1].value == pytest.approx(summary["ensemble"]["test_accuracy"])
    assert len(client.get_metric_history(parent["run_id"], "churn")) == 3
    for _, peer in peers.iterrows():
        acc = client.get_metric_history(peer["run_id"], "test_accuracy")
        assert [m.step for m in acc] == [10, 20, 30]
        for key in ("train_loss", "steps_per_s", "staleness_mean", "bytes_pulled", "restarts"):
            assert client.get_metric_history(peer["run_id"], key), key
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
    train(small_job("tracking=none", steps=5), str(tmp_path / "run"))
    assert not (tmp_path / "mlflow.db").exists()
