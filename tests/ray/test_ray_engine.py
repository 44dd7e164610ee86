"""RayEngine on a real local Ray: same answer as LocalEngine, faults, resume."""

import json
from pathlib import Path

import pytest
import torch

from codistill.api import run_job
from codistill.engine import LocalEngine, RayEngine
from tests.helpers import ROOT, lm_job, small_job

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
    remote = RayEngine(cfg)
    history = remote.run(tmp_path / "ray2")
    for i in range(2):
        assert remote.step_losses[i] == pytest.approx(local.step_losses[i], rel=1e-5, abs=1e-6)
    for wl, wr in zip(final_weights(tmp_path / "local", cfg), final_weights(tmp_path / "ray2", cfg)):
        for k in wl:
            assert torch.allclose(wl[k].float(), wr[k].float(), rtol=1e-4, atol=1e-5), k
    assert all(p.exchange.bytes_pulled > 0 for p in history[-1].peers)  # the teachers' signals crossed actors


TERMS = (
    "loss.terms=[{name: logits}, {name: hidden_mse, weight: 0.1}, {name: attention_kl}, {name: attention_mse}]",
    "loss.weighting=influence",
    "data.validation_fraction=0.1",
)


@pytest.mark.parametrize(
    "shards",
    [
        # top-k logit shards with every loss term's taps beside them, and the students' influence weights sent
        # to their teachers (LGTM's teacher side) at a board slot of their own
        ("exchange.logits=topk", "exchange.topk=8", *TERMS),
        # local frozen teachers produce the taps; each peer estimates its students' influence on its copies
        ("exchange.mode=checkpoint", "exchange.period=4", "exchange.sync=true", *TERMS, "loss.influence_side=both"),
    ],
)
def test_ray_matches_local_engine_for_language_models(ray_session, tmp_path, shards):
    """Seeded lockstep GPT peers on text: the same per-step losses and final weights on Ray as locally, with
    top-k logit shards (full shards take the path the image tests above take), every loss term and influence
    weighting, on both exchanges."""
    torch.set_num_threads(1)
    local = LocalEngine(lm_job(tmp_path, *shards, steps=12))
    local.run(tmp_path / "local")
    cfg = lm_job(tmp_path, "engine=ray", "resources.num_cpus=1", "resources.threads_per_peer=1", *shards, steps=12)
    remote = RayEngine(cfg)
    remote.run(tmp_path / "ray")
    for i in range(2):
        assert remote.step_losses[i] == pytest.approx(local.step_losses[i], rel=1e-5, abs=1e-6)
    for wl, wr in zip(final_weights(tmp_path / "local", cfg), final_weights(tmp_path / "ray", cfg)):
        for k in wl:
            assert torch.allclose(wl[k].float(), wr[k].float(), rtol=1e-4, atol=1e-5), k


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


def test_a_peer_that_cannot_start_is_one_line_and_not_restarted(ray_session, tmp_path, capsys):
    """device=cuda passes the driver's checks (workers may have GPUs); on this CPU machine each peer fails
    to build. That is one `error:` line naming the peer and the cause, with the traceback in the run log;
    the actor is not restarted to fail again."""
    from codistill.run import main

    out = tmp_path / "run"
    argv = ["--output", str(out)]
    for s in ("device=cuda", "tracking=none", "steps=10", "resources.num_cpus=1", "resources.max_restarts=3"):
        argv += ["--set", s]
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: peer peer0-mlp could not start: ConfigError: device: got 'cuda'"), lines[0]
    assert lines[0].endswith(f"(details: {out / 'codistill.log'})")
    log = (out / "codistill.log").read_text()
    assert "Traceback" in log and "resolve_device" in log
    assert "Traceback" not in captured.out + captured.err


def test_a_model_registered_at_run_time_works_on_ray(ray_session, tmp_path):
    """What a notebook does: register a model in the driver's process; the peers' actors get it."""
    import torch.nn as nn

    from codistill.models import MODELS

    def tiny(input_shape, num_classes):  # a local function: shipped by value, as from a notebook
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))

    MODELS["tiny_registered"] = tiny
    try:
        summary = run_job(ray_job("peers.1.model=tiny_registered", steps=10), tmp_path / "run")
    finally:
        del MODELS["tiny_registered"]
    assert [p["model"] for p in summary["peers"]] == ["mlp", "tiny_registered"]
    assert [p["steps"] for p in summary["peers"]] == [10, 10]
