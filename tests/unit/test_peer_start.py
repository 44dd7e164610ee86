"""A run validates its job once, in the driver: every peer is started with the frozen RunConfig itself (a
PeerStart), which pickles to another process without being validated again."""

import pickle

import pytest

from codistill.config.schema import run_config_validations
from codistill.engine import LocalEngine
from codistill.engine.peer_start import peer_start
from codistill.peer.start import PeerStart
from tests.helpers import small_job


def test_a_local_run_validates_no_job_of_its_own(tmp_path):
    cfg = small_job(steps=4)
    before = run_config_validations()
    LocalEngine(cfg).run(tmp_path)
    assert run_config_validations() == before


def test_a_peer_start_travels_and_takes_its_rank_without_validating_the_job():
    cfg = small_job("peers.0.workers=2", "engine=ray")
    before = run_config_validations()
    start = peer_start(cfg, 0)
    again = pickle.loads(pickle.dumps(start))  # what Ray does to an actor's arguments
    ranked = start.with_rank(1, 2)
    assert run_config_validations() == before
    assert again == start and again.config == cfg
    assert (ranked.rank, ranked.world_size, ranked.index) == (1, 2, 0) and ranked.config is cfg


@pytest.mark.parametrize(
    ("exchange", "shared"),
    [(("exchange.mode=logits",), True), (("exchange.mode=checkpoint", "data.shard=disjoint"), False)],
)
def test_the_engine_decides_each_peer_s_batch_order_and_shard(exchange, shared):
    cfg = small_job(*exchange)
    starts = [peer_start(cfg, i) for i in range(cfg.num_peers)]
    assert [s.order_seed for s in starts] == [cfg.seed if shared else cfg.peer_seed(i) for i in range(2)]
    assert [(s.shard_index, s.num_shards) for s in starts] == ([(0, 1)] * 2 if shared else [(0, 2), (1, 2)])


@pytest.mark.parametrize(
    ("fields", "match"),
    [({"index": 2}, "peer index 2"), ({"rank": 1}, "rank 1 of 1"), ({"shard_index": 1}, "shard 1 of 1")],
)
def test_a_peer_start_out_of_range_is_refused(fields, match):
    cfg = small_job()
    start = {"config": cfg, "index": 0, "order_seed": 0, "shard_index": 0, "num_shards": 1} | fields
    with pytest.raises(ValueError, match=match):
        PeerStart(**start)
