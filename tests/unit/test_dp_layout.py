"""Data-parallel peers without Ray: config checks, board slots, which ranks read which shards, join_shards."""

import numpy as np
import pytest
import torch

from codistill.errors import ConfigError
from codistill.exchange import new_board_state
from codistill.exchange.slots import overlapping_ranks, shard_consumers
from codistill.exchange.wire import LogitShard, join_shards
from codistill.peer.topology import part_bounds, rank_slot
from tests.helpers import small_job


@pytest.mark.parametrize(
    "overrides, match",
    [
        (("peers.0.workers=2",), r"peers.0.workers: got 2; allowed: 1 with engine=local"),
        (("engine=ray", "peers.1.workers=3"), r"peers.1.workers: got 3; allowed: a divisor of data.batch_size=16"),
        (
            ("engine=ray", "peers.0.workers=2", "peers.0.resources={num_gpus: 0.5}"),
            r"peers.0.resources.num_gpus: got 0.5; allowed: 0 or whole GPUs per worker .*NCCL",
        ),
        (("peers.0.workers=0",), r"peers.0.workers: got 0; allowed: an integer in \[1, 1024\]"),
        (("peers.0.resources={num_cpu: 1}",), r"peers.0.resources.num_cpu: unknown key"),
    ],
)
def test_bad_worker_layouts_fail_naming_the_peer_and_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        small_job(*overrides)


def test_per_peer_resources_override_the_jobs():
    cfg = small_job("engine=ray", "peers.0.workers=2", "peers.0.resources={num_cpus: 0.5}", "resources.num_cpus=2")
    assert cfg.peer_resources(0) == (0.5, 0.0) and cfg.peer_resources(1) == (2.0, 0.0)


def test_rank_slots_keep_one_worker_peers_where_they_were():
    workers = [2, 1, 3]
    slots = [rank_slot(workers, i, r) for i in range(3) for r in range(workers[i])]
    assert slots[:1] == [0] and rank_slot(workers, 1, 0) == 1 and rank_slot(workers, 2, 0) == 2
    assert sorted(slots) == list(range(6))  # one slot per rank, none shared
    with pytest.raises(ValueError, match="peer 1 has 1 worker"):
        rank_slot(workers, 1, 1)


def test_each_rank_reads_only_the_teacher_ranks_that_cover_its_examples():
    # batch 12: a 2-worker peer has [0, 6) and [6, 12); a 3-worker peer [0, 4), [4, 8), [8, 12)
    assert part_bounds(12, 3, 1) == (4, 8)
    assert overlapping_ranks(12, 2, 4, 8) == [0, 1] and overlapping_ranks(12, 2, 0, 4) == [0]
    consumers = shard_consumers([2, 3], 12, "all")
    s = {(i, r): rank_slot([2, 3], i, r) for i, w in enumerate([2, 3]) for r in range(w)}
    assert sorted(consumers[s[0, 0]]) == sorted([s[1, 0], s[1, 1]])  # [0, 6) is read by [0, 4) and [4, 8)
    assert sorted(consumers[s[1, 1]]) == sorted([s[0, 0], s[0, 1]])  # [4, 8) is read by both halves
    state = new_board_state(small_job("engine=ray", "peers.0.workers=2", "data.batch_size=12"))
    assert state.consumers[rank_slot([2, 1], 0, 1)] == [1] and sorted(state.consumers[1]) == [0, 2]


@pytest.mark.parametrize("topk", [False, True])
def test_join_shards_cuts_a_rank_s_examples_out_of_a_teacher_s_parts(topk):
    tokens, vocab = 3, 5
    full = torch.randn(12, tokens, vocab)
    ids = np.arange(100, 112)

    def shard(lo: int, hi: int) -> LogitShard:
        if not topk:
            return LogitShard(7, 6, ids[lo:hi], full[lo:hi].numpy(), "float32")
        flat = full[lo:hi].reshape(-1, vocab)
        return LogitShard(
            7, 6, ids[lo:hi], flat[:, :2].numpy(), "float32", np.zeros((len(flat), 2), np.uint8),
            flat[:, 0].numpy(), flat[:, 1].numpy(), vocab,
        )  # fmt: skip

    parts = [shard(0, 6), shard(6, 12)]  # a 2-worker teacher; the student's rank holds [4, 8)
    got, want = join_shards(parts, 4, 8), shard(4, 8)
    assert np.array_equal(got.sample_ids, want.sample_ids) and np.array_equal(got.logits, want.logits)
    if topk:
        assert got.lse is not None and want.lse is not None and np.array_equal(got.lse, want.lse)
    assert join_shards(parts[:1], 0, 6) is parts[0]  # one part, whole: no copy
