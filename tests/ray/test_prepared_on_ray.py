"""Prepared data on Ray: `prepare` runs its chunks as Ray Data tasks; two GPT peers train from the shards on Ray in
lockstep logits mode (the exchange refuses a teacher shard whose sample ids differ from the student's, so a
finished run proves both peers read the same windows at every step); a driver killed mid-run and resumed ends
with the weights of the run that was never interrupted (the lazy batch order is a pure function of seed and
step)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from codistill.config import DataConfig
from codistill.prepare import prepare
from codistill.storage import checkpoint_path
from tests.helpers import ROOT
from tests.ray.test_resume import start_and_kill
from tests.unit.test_prepared_data import corpus

pytestmark = pytest.mark.slow
STEPS = 60


def lm_sets(prepared) -> list[str]:
    return [
        "engine=ray",
        f"steps={STEPS}",
        "eval_every=20",
        "device=cpu",
        "tracking=none",
        "data={name: text, block_size: 16, batch_size: 8, eval_batch_size: 64, limit_test: 64}",
        f"data.train={prepared}",
        "peers=[{model: gpt-tiny}, {model: gpt-tiny, seed: 5}]",
        "exchange.mode=logits",
        "resources.num_cpus=0.5",
    ]


def test_ray_data_prepares_and_peers_resume_exactly_from_the_shards(ray_session, tmp_path):
    prepared = tmp_path / "prep"
    said: list[str] = []
    m = prepare(
        DataConfig(name="text", train=str(corpus(tmp_path, 20_000)), max_chars=None),
        str(prepared),
        shard_mb=0.1,
        runner="ray",
        say=said.append,
    )
    assert len(m.splits["train"].shards) >= 5 and "wrote" in said[-1]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}

    def run(out, *extra: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "codistill.run", "--output", str(out), *extra]
        return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)

    whole = tmp_path / "whole"
    r = run(whole, *(a for s in lm_sets(prepared) for a in ("--set", s)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((whole / "summary.json").read_text())
    assert [p["steps"] for p in summary["peers"]] == [STEPS, STEPS] and summary["data"]["prepared"] == str(prepared)

    cut = tmp_path / "cut"
    start_and_kill(env, cut, lm_sets(prepared), "round   1")
    r = run(cut, "--resume", str(cut))
    assert r.returncode == 0 and "resumed from its checkpoint" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("peer0-gpt-tiny", "peer1-gpt-tiny"):
        a = torch.load(whole / checkpoint_path(name, STEPS), weights_only=True)["model"]
        b = torch.load(cut / checkpoint_path(name, STEPS), weights_only=True)["model"]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
