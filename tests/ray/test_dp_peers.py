"""Data-parallel peers: a peer as a Ray Train worker group (DDP over gloo on CPU) co-distilling through the
same board as one-actor peers. Each Train-backed peer costs ~20 s of start-up on 2 cores: few, full tests."""

import re

import pytest
import torch
from mlflow.tracking import MlflowClient

from codistill.api import run_job
from codistill.engine import LocalEngine, RayEngine
from tests.helpers import small_job
from tests.ray.test_ray_engine import final_weights
from tests.ray.test_reliability import SigKill, check_every_round

pytestmark = pytest.mark.slow

NO_DROPOUT = "peers.0.model_args={dropout: 0}"  # dropout masks of half a batch cannot equal the whole batch's


def test_a_two_worker_peer_gives_the_one_worker_answer_in_checkpoint_mode(ray_session, tmp_path):
    """Checkpoint exchange (sync schedule): rank 0 publishes into the host actor, every rank runs the teacher
    on its part. Lockstep logits with mixed workers are pinned by the killed-worker test below."""
    torch.set_num_threads(1)  # every rank and actor runs one thread: the same reduction order
    common = [NO_DROPOUT, "peers.1.model_args={dropout: 0}", "data.batch_size=32", "data.augment=false"]
    common += ["resources.threads_per_peer=1", "exchange.mode=checkpoint", "exchange.period=4", "exchange.sync=true"]
    local = LocalEngine(small_job(*common, steps=12, models=("mlp", "mlp")))
    local_history = local.run(tmp_path / "local")
    cfg = small_job(
        "engine=ray", "peers.0.workers=2", "resources.num_cpus=0.25", *common, steps=12, models=("mlp", "mlp")
    )
    remote = RayEngine(cfg)
    history = remote.run(tmp_path / "ray")
    assert remote.peer_info[0]["workers"] == 2 and len(remote.peer_info[0]["node_ids"]) == 2
    assert "workers" not in remote.peer_info[1]
    for i in range(2):
        assert remote.step_losses[i] == pytest.approx(local.step_losses[i], rel=1e-4, abs=1e-5), i
    same_weights(tmp_path / "local", tmp_path / "ray", cfg)
    # the group's report adds its ranks' exchange; rank 0 alone publishes the weights
    published = [[p.exchange.bytes_published for p in h[-1].peers] for h in (local_history, history)]
    assert published[0] == published[1] and all(published[0])
    # the Train run (Ray dashboard, storage) is named after the job, the run and the peer
    assert [d.name for d in (tmp_path / "ray" / "train").iterdir()] == [f"test-{remote.run_id}-peer0-mlp"]


def test_the_peers_processes_are_given_the_driver_s_job_and_validate_none(ray_session, tmp_path):
    """The driver validates the job once; an actor, a worker group's host and its rank 0 each get the frozen
    RunConfig in their PeerStart and build none of their own."""
    cfg = small_job(
        "engine=ray",
        "peers.0.workers=2",
        "resources.num_cpus=0.25",
        "resources.threads_per_peer=1",
        steps=4,
        models=("mlp", "mlp"),
    )
    remote = RayEngine(cfg)
    remote.run(tmp_path / "ray")
    assert remote.peer_info[0]["workers"] == 2 and "workers" not in remote.peer_info[1]
    assert [info["config_validations"] for info in remote.peer_info] == [0, 0]


def same_weights(local_dir, ray_dir, cfg) -> None:
    for wl, wr in zip(final_weights(local_dir, cfg), final_weights(ray_dir, cfg)):
        for k in wl:
            assert torch.allclose(wl[k].float(), wr[k].float(), rtol=1e-3, atol=1e-4), k


def test_a_killed_worker_restarts_its_group_and_the_answer_is_one_worker_s(ray_session, tmp_path, capfd):
    """Lockstep DML between a 2-worker peer and a 1-worker peer (each teaches the other, shard by shard), and
    SIGKILL of rank 1 after round 0: Ray Train restarts the group, which goes on from round 0's checkpoint and
    publishes again the shards the other peer waits for. Every round is the true one in summary.json and
    MLflow, the restart shows in both, and the result equals the uninterrupted one-worker run (LocalEngine):
    a restart replays exactly. The console keeps the one event line; the ranks' gloo and Ray Train tracebacks
    (Ray forwards them to the driver) are in the run's log file."""
    torch.set_num_threads(1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = (NO_DROPOUT, "data.batch_size=32", "data.augment=false", "resources.threads_per_peer=1", "eval_every=10")
    local = LocalEngine(small_job(*common, steps=20))
    local.run(tmp_path / "local")
    cfg = small_job(
        *common,
        "engine=ray",
        "peers.0.workers=2",
        "resources.num_cpus=0.25",
        "exchange.timeout_s=120",
        "tracking.backend=mlflow",
        f"tracking.uri={uri}",
        steps=20,
    )
    killer = SigKill(ray_session, "peer0", after_round=0)
    capfd.readouterr()
    summary = run_job(cfg, tmp_path / "run", killer)
    console = "".join(capfd.readouterr())
    assert "Traceback" not in console and "RayTrainWorker" not in console, console[-3000:]
    run_log = (tmp_path / "run" / "codistill.log").read_text()
    assert "RayTrainWorker" in run_log and "TrainController" in run_log and "Traceback" in run_log
    assert killer.killed_pid is not None
    assert [p["steps"] for p in summary["peers"]] == [20, 20]
    assert summary["peers"][0]["restarts"] >= 1 and summary["peers"][1]["restarts"] == 0
    assert summary["peers"][0]["workers"] == 2 and len(summary["peers"][0]["node_ids"]) == 2
    told = [e for e in summary["events"] if "peer0-mlp" in e]  # one line, with where the group went on
    restarted = r"peer0-mlp restarted \(\d restart\(s\) so far\) and resumed from its checkpoint at step 10 "
    assert len(told) == 1 and re.fullmatch(restarted + r"\(Ray Train started its 2 workers again\)", told[0]), told
    assert all(p["bytes_pulled"] > 0 for p in summary["peers"])
    check_every_round(summary, uri, summary["mlflow_run_id"], 20, 10)
    client = MlflowClient(uri)
    assert client.get_metric_history(summary["mlflow_run_id"], "restarts")[-1].value >= 1
    experiment = client.get_run(summary["mlflow_run_id"]).info.experiment_id
    peer_runs = {
        r.data.tags["codistill.peer"]: r for r in client.search_runs([experiment], "tags.codistill.peer != ''")
    }
    assert peer_runs["peer0-mlp"].data.tags["codistill.workers"] == "2"
    assert len(peer_runs["peer0-mlp"].data.tags["codistill.node_ids"].split(",")) == 2
    assert "samples_per_s" in peer_runs["peer0-mlp"].data.metrics
    # the memory report: the group's peak and each rank's, one process's peak for the actor
    group_metrics, actor_metrics = peer_runs["peer0-mlp"].data.metrics, peer_runs["peer1-cnn"].data.metrics
    assert {"peak_memory_mb", "peak_memory_mb.rank0", "peak_memory_mb.rank1"} <= set(group_metrics)
    assert group_metrics["peak_memory_mb"] == max(group_metrics[f"peak_memory_mb.rank{r}"] for r in (0, 1))
    assert "peak_memory_mb" in actor_metrics and "peak_memory_mb.rank0" not in actor_metrics
    # the same answer as one worker, uninterrupted: per-round training loss and final weights
    for i, name in enumerate(cfg.peer_name(j) for j in range(2)):
        want = [sum(local.step_losses[i][r : r + 10]) / 10 for r in range(0, 20, 10)]
        got = [r["peers"][name]["train_loss"] for r in summary["rounds"]]
        assert got == pytest.approx(want, rel=1e-4), name
    same_weights(tmp_path / "local", tmp_path / "run", cfg)


def test_a_job_of_worker_groups_reserves_nothing_itself(ray_session):
    """Every peer a worker group: the job makes no placement group (a 0.001-CPU token bundle once kept two
    groups that exactly fill the cluster from both starting: Train waited for workers forever)."""
    cfg = small_job("engine=ray", "peers.0.workers=2", "peers.1.workers=2", "resources.num_cpus=0.5")
    assert RayEngine(cfg)._placement_group() == (None, 0, False)
    one_actor = RayEngine(small_job("engine=ray", "peers.0.workers=2", "resources.num_cpus=0.5"))
    pg, first, owned = one_actor._placement_group()
    try:
        assert first == 0 and owned and pg.bundle_specs == [{"CPU": 0.5}]  # the one-worker peer only
    finally:
        ray_session.util.remove_placement_group(pg)


def test_a_worker_group_the_cluster_can_never_hold_fails_before_anything_starts(ray_session, tmp_path):
    cfg = small_job("engine=ray", "peers.0.workers=4", "resources.num_cpus=1", "data.batch_size=32")
    with pytest.raises(RuntimeError, match=r"peers.0.workers: 4 workers x 1 CPU = 4 CPU; the cluster has 2 in all"):
        RayEngine(cfg).run(tmp_path)
    assert not (tmp_path / "train").exists()
