"""A driver killed mid-run is resumed with --resume: the run finishes with every round once, in the
MLflow runs it started (no duplicates, all FINISHED); a corrupt newest checkpoint falls back to the
round before with a warning line; resuming a finished run says so and changes nothing. A damaged
progress.json is rebuilt from the checkpoints and costs none of them; a restarted peer never goes on
from a checkpoint another run wrote."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
from mlflow.tracking import MlflowClient

from codistill.api import run_job
from codistill.engine.report import Reporter
from codistill.engine.resume import SET_ASIDE
from codistill.storage import checkpoint_path
from tests.helpers import ROOT, small_job

pytestmark = pytest.mark.slow
STEPS = 150  # 5 rounds: killed after round 2, resumed for the rest
NAMES = ("peer0-mlp", "peer1-cnn")
SMALL_RAY_JOB = [
    "engine=ray",
    f"steps={STEPS}",
    "eval_every=30",
    "data.name=synthetic",
    "data.batch_size=16",
    "data.synthetic_train=256",
    "resources.num_cpus=1",
    "device=cpu",
]
"""Two peers on synthetic data, a round every 30 steps: a driver to kill and resume."""


def start_and_kill(env: dict, out, sets: list[str], kill_after: str, config: str | None = None) -> list[str]:
    args = [sys.executable, "-m", "codistill.run", "--output", str(out)] + [a for s in sets for a in ("--set", s)]
    args += ["--config", config] if config else []
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.time() + 180
    assert proc.stdout is not None
    for line in proc.stdout:  # kill the driver once enough rounds are done
        seen.append(line)
        if line.startswith(kill_after) or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(line.startswith(kill_after) for line in seen), "".join(seen)[-3000:]
    time.sleep(1)  # let Ray reap the dead driver's actors
    return seen


@pytest.mark.parametrize(
    "mode, corrupt",
    [
        # a data-parallel peer killed and resumed: tests/ray/test_data_at_scale.py (same weights as a run never cut)
        # free-running peers with mid-round checkpoints share no checkpoint step but the round ends;
        # the newest round's checkpoint of one peer is damaged after the kill; a hidden-state term's projections
        # (part of each peer's checkpoint, loaded strictly) come back with the weights
        (
            [
                "exchange.mode=checkpoint",
                "exchange.period=10",
                "loss.burn_in=10",
                "output.checkpoint_every=7",
                "loss.terms=[{name: logits}, {name: hidden_mse, weight: 0.1}]",
            ],
            True,
        ),
    ],
)
def test_killed_driver_resumes_in_its_own_mlflow_runs(ray_session, tmp_path, mode, corrupt):
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    sets = [
        *SMALL_RAY_JOB,
        "tracking.backend=mlflow",
        f"tracking.uri={uri}",
        "tracking.experiment=resume",
        *mode,
    ]
    start_and_kill(env, out, sets, "round   2")
    assert not (out / "summary.json").exists()
    progress = json.loads((out / "progress.json").read_text())
    assert len(progress["rounds"]) >= 3
    tracking = json.loads((out / "tracking.json").read_text())
    assert set(tracking["peer_runs"]) == {"peer0-mlp", "peer1-cnn"}
    fallback_to = None
    if corrupt:
        newest = progress["rounds"][-1]["peers"]["peer1-cnn"]["step"]
        (out / checkpoint_path("peer1-cnn", newest)).write_bytes(b"\x00" * 100)
        fallback_to = progress["rounds"][-2]["step"]
    r = subprocess.run(
        [sys.executable, "-m", "codistill.run", "--resume", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from its checkpoint at step" in r.stdout
    if corrupt:
        assert "cannot be used" in r.stdout and f"resumed from its checkpoint at step {fallback_to}" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert [p["steps"] for p in s["peers"]] == [STEPS, STEPS]
    assert [h["step"] for h in s["rounds"]] == list(range(30, STEPS + 1, 30))  # every round once, in order
    if any(m.startswith("loss.terms") for m in mode):
        assert all("term.hidden_mse" in p["terms"] for h in s["rounds"] for p in h["peers"].values())
        final = torch.load(out / checkpoint_path("peer1-cnn", STEPS), weights_only=True)
        assert final["heads"] and all(torch.isfinite(v).all() for v in final["heads"].values())
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("resume")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # no duplicates
    assert {r.info.run_id for r in runs} == {tracking["run_id"], *tracking["peer_runs"].values()}
    parent_history = client.get_metric_history(tracking["run_id"], "ensemble_accuracy")
    assert sorted({m.step for m in parent_history}) == list(range(30, STEPS + 1, 30))

    # resuming the finished run says so in one line and changes nothing
    before = (out / "summary.json").read_bytes(), sorted(p.name for p in out.iterdir())
    r = subprocess.run(
        [sys.executable, "-m", "codistill.run", "--resume", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip().splitlines() == [
        f"codistill: {out} finished already (its summary.json is there): nothing to resume"
    ], r.stdout + r.stderr
    assert ((out / "summary.json").read_bytes(), sorted(p.name for p in out.iterdir())) == before
    assert {r.info.status for r in client.search_runs([runs[0].info.experiment_id])} == {"FINISHED"}


def test_a_damaged_progress_file_is_rebuilt_from_the_checkpoints(ray_session, tmp_path):
    """The driver is killed, then progress.json is emptied: the run goes on from the newest round end at which
    every peer has a checkpoint (not from step 0), the history starts after it, and no checkpoint is deleted
    (those past the resume point are set aside, byte for byte)."""
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    sets = [*SMALL_RAY_JOB, "tracking.backend=none"]
    start_and_kill(env, out, sets, "round   2")
    (out / "progress.json").write_bytes(b"")
    before = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*.pt")}
    steps = [{int(p.stem[5:]) for p in (out / "checkpoints" / name).glob("step-*.pt")} for name in NAMES]
    point = max(s for s in steps[0] & steps[1] if s % 30 == 0)
    assert point >= 90  # rounds 0-2 were reported before the kill
    r = subprocess.run(
        [sys.executable, "-m", "codistill.run", "--resume", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "progress.json is empty: rebuilding the resume point from the checkpoints" in r.stdout
    assert f"resuming after round {point // 30 - 1} (step {point})" in r.stdout and "are lost" in r.stdout
    assert "starting over" not in r.stdout
    for name in NAMES:
        assert f"{name} resumed from its checkpoint at step {point}" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert [p["steps"] for p in s["peers"]] == [STEPS, STEPS]
    assert [h["step"] for h in s["rounds"]] == list(range(point + 30, STEPS + 1, 30))  # after the point, once each
    (folder,) = (out / SET_ASIDE).iterdir()
    assert (folder / "progress.json").read_bytes() == b""
    moved = {p.relative_to(folder): p.read_bytes() for p in (folder / "checkpoints").rglob("*.pt")}
    assert moved == {rel: data for rel, data in before.items() if int(rel.stem[5:]) > point}


class PlantAndKill(Reporter):
    """Once round 0 is reported: puts another run's checkpoint (step 1000) beside peer1's own, then SIGKILLs peer1."""

    def __init__(self, ray, out, run_id: str):
        self.ray, self.out, self.run_id = ray, out, run_id
        self.killed_pid: int | None = None
        self.events: list[str] = []

    def on_event(self, message: str) -> None:
        self.events.append(message)

    def on_round(self, result) -> None:
        if result.round != 0 or self.killed_pid is not None:
            return
        own = torch.load(self.out / checkpoint_path("peer1-cnn", 10), weights_only=True)
        torch.save({**own, "step": 1000, "run_id": "another-run"}, self.out / checkpoint_path("peer1-cnn", 1000))
        ray = self.ray
        (name,) = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].endswith(f"{self.run_id}-peer1-cnn")
        ]
        handle = ray.get_actor(name, namespace=ray.get_runtime_context().namespace)
        self.killed_pid = ray.get(handle.info.remote())["pid"]
        os.kill(self.killed_pid, signal.SIGKILL)


def test_a_restarted_peer_never_goes_on_from_another_runs_checkpoint(ray_session, tmp_path):
    """Another run's newer checkpoint in a peer's folder (a directory that held another run): Ray restarts the
    killed peer, which skips that checkpoint in a line naming both runs and goes on from its own."""
    out = tmp_path / "run"
    run_id = f"test-{uuid.uuid4().hex[:6]}"
    cfg = small_job(
        "engine=ray", "resources.num_cpus=1", "resources.threads_per_peer=1", "exchange.timeout_s=30", steps=40
    )
    killer = PlantAndKill(ray_session, out, run_id)
    summary = run_job(cfg, out, killer, run_name=run_id)
    assert killer.killed_pid is not None
    assert [p["steps"] for p in summary["peers"]] == [40, 40]
    assert [r["step"] for r in summary["rounds"]] == [10, 20, 30, 40]
    assert summary["peers"][1]["restarts"] >= 1
    refused = [e for e in summary["events"] if f"written by run another-run, not by this run {run_id}" in e]
    assert refused and refused[0].startswith("warning: peer1-cnn: checkpoint at step 1000 unusable"), summary["events"]
    assert (out / checkpoint_path("peer1-cnn", 1000)).exists()  # not this run's to delete
    own = torch.load(out / checkpoint_path("peer1-cnn", 40), weights_only=True)
    assert own["run_id"] == run_id and own["total_steps"] == 40
