"""Data-parallel peers: a peer as a Ray Train worker group (DDP over gloo on CPU) co-distilling through the
same board as one-actor peers. Each Train-backed peer costs ~20 s of start-up on 2 cores: few, full tests."""

import pytest
import torch

from codistill.engine import LocalEngine, RayEngine
from tests.helpers import small_job
from tests.ray.test_ray_engine import final_weights

pytestmark = pytest.mark.slow

NO_DROPOUT = "peers.0.model_args={dropout: 0}"  # dropout masks of half a batch cannot equal the whole batch's


@pytest.mark.parametrize(
    "mode, models",
    [
        # a 2-worker peer teaches a 1-worker peer and the reverse, shard by shard (cnn has BatchNorm: W = 1 only)
        (("exchange.mode=logits",), ("mlp", "cnn")),
        (("exchange.mode=checkpoint", "exchange.period=4", "exchange.sync=true"), ("mlp", "mlp")),
    ],
    ids=["logits-mixed-workers", "checkpoint"],
)
def test_a_two_worker_peer_gives_the_one_worker_answer(ray_session, tmp_path, mode, models):
    torch.set_num_threads(1)  # every rank and actor runs one thread: the same reduction order
    common = (NO_DROPOUT, "peers.1.model_args={dropout: 0}" if models[1] == "mlp" else NO_DROPOUT)
    common += ("data.batch_size=32", "data.augment=false", "resources.threads_per_peer=1", *mode)
    local = LocalEngine(small_job(*common, steps=12, models=models))
    local.run(tmp_path / "local")
    cfg = small_job("engine=ray", "peers.0.workers=2", "resources.num_cpus=0.25", *common, steps=12, models=models)
    remote = RayEngine(cfg)
    remote.run(tmp_path / "ray")
    assert remote.peer_info[0]["workers"] == 2 and len(remote.peer_info[0]["node_ids"]) == 2
    assert "workers" not in remote.peer_info[1]
    for i in range(2):
        assert remote.step_losses[i] == pytest.approx(local.step_losses[i], rel=1e-4, abs=1e-5), i
    for wl, wr in zip(final_weights(tmp_path / "local", cfg), final_weights(tmp_path / "ray", cfg)):
        for k in wl:
            assert torch.allclose(wl[k].float(), wr[k].float(), rtol=1e-3, atol=1e-4), k
    # the Train run (Ray dashboard, storage) is named after the job, the run and the peer
    assert [d.name for d in (tmp_path / "ray" / "train").iterdir()] == [f"test-{remote.run_id}-peer0-mlp"]
