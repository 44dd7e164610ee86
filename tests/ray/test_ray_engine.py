"""RayEngine on a real local Ray: same answer as LocalEngine, faults, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from codistill.api import train
from codistill.engine import LocalEngine, RayEngine
from tests.helpers import ROOT, small_job

pytestmark = pytest.mark.slow


def ray_job(*overrides, steps=20):
    return small_job("engine=ray", "resources.num_cpus=1", "resources.threads_per_peer=1", *overrides, steps=steps)


def final_weights(out_dir, cfg):
    return [
        torch.load(Path(out_dir) / "peers" / f"{cfg.peer_name(i)}.pt", weights_only=True) for i in range(cfg.num_peers)
    ]


@pytest.mark.parametrize(
    "mode",
    [
        ("exchange.mode=logits",),
        ("exchange.mode=logits", "exchange.staleness=3", "exchange.inline_max_bytes=0"),  # shards by reference
        ("exchange.mode=checkpoint", "exchange.period=5", "exchange.sync=true"),
    ],
)
def test_ray_matches_local_engine(ray_session, tmp_path, mode):
    torch.set_num_threads(1)  # the actors use one thread each: same reduction order
    cfg = ray_job(*mode)
    local = LocalEngine(small_job(*mode, steps=20))
    local.run(tmp_path / "local")
    summary = train(cfg, str(tmp_path / "ray"))
    ray_engine_losses = [r["peers"] for r in summary["rounds"]]
    assert summary["peers"][0]["steps"] == 20 and summary["bytes_exchanged"] > 0
    remote = RayEngine(cfg)
    remote.run(tmp_path / "ray2")
    for i in range(2):
        assert remote.step_losses[i] == pytest.approx(local.step_losses[i], rel=1e-5, abs=1e-6)
    for wl, wr in zip(final_weights(tmp_path / "local", cfg), final_weights(tmp_path / "ray2", cfg)):
        for k in wl:
            assert torch.allclose(wl[k].float(), wr[k].float(), rtol=1e-4, atol=1e-5), k
    assert ray_engine_losses  # the CLI path wrote its rounds too


def _kill_peer_when(ray, name_part, after_round):
    """A reporter that kills one peer actor (Ray restarts it) once `after_round` is reported."""

    class Killer:
        killed = False

        def on_start(self, cfg, total):
            pass

        def on_event(self, msg):
            self.events = [*getattr(self, "events", []), msg]

        def on_round(self, r):
            if r.round == after_round and not self.killed:
                names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if name_part in a["name"]]
                ns = ray.get_runtime_context().namespace
                ray.kill(ray.get_actor(names[0], namespace=ns), no_restart=False)
                self.killed = True

    return Killer()


@pytest.mark.parametrize(
    "mode",
    [
        ("exchange.mode=logits",),
        ("exchange.mode=logits", "exchange.inline_max_bytes=0"),  # the dead publisher's shards are lost objects
        ("exchange.mode=checkpoint", "exchange.period=5"),
    ],
)
def test_killed_peer_is_restarted_and_the_run_finishes(ray_session, tmp_path, mode):
    cfg = ray_job(*mode, "eval_every=10", "exchange.timeout_s=120", steps=40)
    killer = _kill_peer_when(ray_session, "peer1", after_round=0)
    engine = RayEngine(cfg, killer)
    history = engine.run(tmp_path)
    assert killer.killed
    final = history[-1]
    assert [p.step for p in final.peers] == [40, 40]
    assert final.peers[1].restarts >= 1 and final.peers[0].restarts == 0
    assert any("peer1-cnn restarted" in e for h in history for e in h.events)
    assert any("restarted" in e for e in killer.events)
    assert final.metrics["mean_peer_accuracy"] > 0.3
    assert all(p.exchange.bytes_pulled > 0 for p in final.peers)


def test_killed_driver_resumes_and_finishes(ray_session, tmp_path):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
    }
    sets = [
        "engine=ray",
        "steps=300",
        "eval_every=30",
        "data.name=synthetic",
        "data.batch_size=16",
        "data.synthetic_train=256",
        "resources.num_cpus=1",
        "tracking=none",
        "device=cpu",
    ]
    args = [sys.executable, "-m", "codistill.run", "--output", str(out)] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.time() + 120
    assert proc.stdout is not None
    for line in proc.stdout:  # kill the driver once two rounds are done
        seen.append(line)
        if line.startswith("round   1") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(line.startswith("round   1") for line in seen), "".join(seen)[-3000:]
    assert not (out / "summary.json").exists()
    progress = json.loads((out / "progress.json").read_text())
    assert len(progress["rounds"]) >= 2
    time.sleep(1)  # let Ray reap the dead driver's actors
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
    s = json.loads((out / "summary.json").read_text())
    assert [p["steps"] for p in s["peers"]] == [300, 300]
    assert [h["step"] for h in s["rounds"]] == list(range(30, 301, 30))


def test_placement_that_cannot_fit_fails_with_a_clear_error(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("CODISTILL_PLACEMENT_TIMEOUT_S", "3")
    cfg = ray_job("resources.num_cpus=2")
    with pytest.raises(RuntimeError, match=r"resources: cannot reserve 2 peers x \{'CPU': 2.0\}"):
        RayEngine(cfg).run(tmp_path)


def test_a_diverging_peer_stops_the_run_with_its_name(ray_session, tmp_path):
    """A NaN loss is not retried (it would come back the same way): the run stops, naming the peer,
    instead of the other peer waiting out exchange.timeout_s."""
    cfg = ray_job("peers.0.optim.lr=1e12", "exchange.timeout_s=60", steps=40)
    # peer0's logits blow up; its own loss or peer1's distillation term turns non-finite first,
    # whichever comes first names the peer (waiting out the timeout would say "no logits from peer(s)")
    with pytest.raises(RuntimeError, match=r"peer (peer[\w-]+) failed in round 0: peer \1: non-finite loss"):
        RayEngine(cfg).run(tmp_path)


def test_digits_dml_job_runs_on_ray(ray_session, tmp_path):
    from codistill.run import main

    args = ["--config", str(ROOT / "jobs" / "digits_dml.yaml"), "--output", str(tmp_path)]
    for s in ("steps=40", "eval_every=20", "tracking=none"):
        args += ["--set", s]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["steps"] for p in summary["peers"]] == [40, 40, 40] and summary["engine"] == "ray"
    assert all(p["node_id"] for p in summary["peers"])
