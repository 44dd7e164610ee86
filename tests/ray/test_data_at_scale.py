"""Data past one machine's memory, on a cluster whose object store (75 MiB, Ray's least) is smaller than the
corpus: `python -m codistill.prepare` runs its chunks as Ray Data tasks on the cluster; a data-parallel GPT peer
(2 ranks) and a one-process peer train from the shards in lockstep logits mode (the exchange refuses a teacher
shard whose sample ids differ from the student's, so a finished run proves every rank read the windows of its part
of the shared batch at every step), and a driver killed mid-run and resumed ends with the weights of the run that
was never interrupted. `data.loader: ray_data` does the same from image sources decoded by Ray Data tasks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from codistill.data.manifest import Manifest
from codistill.storage import checkpoint_path
from tests.helpers import ROOT
from tests.ray.test_resume import start_and_kill
from tests.unit.test_prepared_data import image_parquet

pytestmark = pytest.mark.slow
STEPS = 60
STORE = 75 << 20  # Ray's smallest object store
RAY_RUN = ["engine=ray", f"steps={STEPS}", "eval_every=20", "device=cpu", "tracking=none"]


@pytest.fixture(scope="module")
def small_store_cluster():
    """A cluster of its own (the session's Ray stays as it is): 2 CPUs, the smallest object store Ray allows."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": STORE, "include_dashboard": False},
    )
    yield {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    cluster.shutdown()


def run(env, out, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "codistill.run", "--output", str(out), *args]
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def whole_then_cut_and_resumed(env, tmp_path, sets: list[str], names: tuple[str, ...]) -> dict:
    """The job run whole, then run again, its driver killed after round 1 and resumed: the same final weights."""
    whole = tmp_path / "whole"
    r = run(env, whole, *(a for s in sets for a in ("--set", s)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((whole / "summary.json").read_text())
    assert [p["steps"] for p in summary["peers"]] == [STEPS] * len(names)
    cut = tmp_path / "cut"
    start_and_kill(env, cut, sets, "round   1")
    r = run(env, cut, "--resume", str(cut))
    assert r.returncode == 0 and "resumed from its checkpoint" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    for name in names:
        a = torch.load(whole / checkpoint_path(name, STEPS), weights_only=True)["model"]
        b = torch.load(cut / checkpoint_path(name, STEPS), weights_only=True)["model"]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    return summary


def test_a_corpus_larger_than_the_object_store_is_prepared_on_ray_and_trains_a_data_parallel_peer(
    small_store_cluster, tmp_path
):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "délta", "epsilon", "ζeta", "eta", "theta"]
    block = ("\n".join(" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(3000)) + "\n").encode()
    src = tmp_path / "corpus.txt"
    src.write_bytes(block * (42_000_000 // len(block) + 1))  # 42 MB of text: 84 MB of uint16 tokens
    prepared = tmp_path / "prep"
    r = subprocess.run(
        [sys.executable, "-m", "codistill.prepare", "--config", str(ROOT / "jobs" / "lm_quickstart.yaml"),
         "--set", f"data.train={src}", "--set", "data.max_chars=null", "--out", str(prepared), "--shard-mb", "8"],
        env=small_store_cluster, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0 and "wrote" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    m = Manifest.from_json((prepared / "manifest.json").read_text(), str(prepared))
    assert sum(s.bytes for split in m.splits.values() for s in split.shards) > STORE  # it never fits the store
    sets = [
        *RAY_RUN,
        "data={name: text, block_size: 16, batch_size: 8, eval_batch_size: 64, limit_test: 64}",
        f"data.train={prepared}",
        "peers=[{model: gpt-tiny, workers: 2}, {model: gpt-tiny, seed: 5}]",
        "exchange.mode=logits",
        "resources.num_cpus=0.5",
    ]
    summary = whole_then_cut_and_resumed(small_store_cluster, tmp_path, sets, ("peer0-gpt-tiny", "peer1-gpt-tiny"))
    assert summary["data"]["prepared"] == str(prepared)


def test_images_streamed_by_ray_data_train_a_data_parallel_peer_and_resume_exactly(small_store_cluster, tmp_path):
    image_parquet(tmp_path / "train.parquet", 400)
    image_parquet(tmp_path / "test.parquet", 40, seed=1)
    sets = [
        *RAY_RUN,
        f"data={{name: parquet, train: {tmp_path / 'train.parquet'}, test: {tmp_path / 'test.parquet'}, "
        "batch_size: 16, loader: ray_data, shuffle_window: 32, decode_cpus: 0.25}",
        "peers=[{model: cnn, workers: 2}, {model: mlp}]",
        "exchange.mode=checkpoint",
        "exchange.period=10",
        "loss.alpha=0",  # free-running teachers arrive when they arrive: without them the weights are the data's
        "resources.num_cpus=0.5",
    ]
    summary = whole_then_cut_and_resumed(small_store_cluster, tmp_path, sets, ("peer0-cnn", "peer1-mlp"))
    assert summary["data"]["loader"] == "ray_data"
