"""Exchange semantics on one process (no Ray): what DESIGN.md says tests must pin down."""

import copy
from typing import Any

import numpy as np
import pytest
import torch

from codistill.data import load_dataset
from codistill.engine import LocalEngine
from codistill.exchange import (
    ExchangeStats,
    LogitShard,
    TeacherUnavailable,
    consumers_of,
    decode_array,
    decode_weights,
    encode_tensor,
    encode_weights,
    in_memory_board,
    make_exchange,
    teachers_of,
)
from codistill.peer import NonFiniteLossError
from tests.helpers import make_peer, small_job


def make(cfg):
    ds = load_dataset(cfg.data)
    peers = [make_peer(cfg, i, ds) for i in range(cfg.num_peers)]
    board = in_memory_board(cfg)
    return peers, [make_exchange(cfg, i, board) for i in range(cfg.num_peers)], board


def lockstep(peers, exchanges, step, spy=None):
    for p, e in zip(peers, exchanges):
        e.start_step(p, step)
    for i, (p, e) in enumerate(zip(peers, exchanges)):
        t = e.teacher_logits(p, step)
        if spy is not None:
            spy[i] = t
        p.train_step(t)
    for p, e in zip(peers, exchanges):
        e.end_step(p, step)


def test_topology():
    assert teachers_of(0, 4, "all") == [1, 2, 3] and teachers_of(0, 4, "ring") == [3]
    assert consumers_of(3, 4, "ring") == [0] and teachers_of(0, 1, "all") == []


def test_logits_lockstep_uses_same_batch_before_update_with_n_forwards():
    cfg = small_job("peers.0.model=cnn")  # no dropout: forward is a pure function of weights and batch
    peers, ex, _ = make(cfg)
    calls = [0, 0]
    for i, p in enumerate(peers):
        p.model.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    for step in range(3):
        lockstep(peers, ex, step)
    assert calls == [3, 3]  # one forward per peer per step: N passes, not N^2
    before = [copy.deepcopy(p.model) for p in peers]
    ids0, _x0, _ = peers[0].data.batch(3)
    ids1, x1, _ = peers[1].data.batch(3)
    assert torch.equal(ids0, ids1)  # one shared order in logits mode
    spy: dict[int, Any] = {}
    lockstep(peers, ex, 3, spy)
    with torch.no_grad():
        want_for_0 = before[1].train()(x1)  # peer 1's logits on batch 3 before its step-3 update
    assert torch.allclose(spy[0][0], want_for_0, atol=1e-6)
    assert not torch.allclose(spy[0][0], peers[1].model(x1), atol=1e-4)  # the updated model differs
    assert ex[0].stats.staleness_max == 0 and ex[0].stats.bytes_pulled > 0


def test_bounded_staleness_signal_is_exactly_s_steps_old():
    s = 2
    cfg = small_job("peers.0.model=cnn", f"exchange.staleness={s}")
    peers, ex, _board = make(cfg)
    snapshots = {}
    for step in range(6):
        snapshots[step] = copy.deepcopy(peers[1].model)
        spy: dict[int, Any] = {}
        lockstep(peers, ex, step, spy)
        if step == 5:
            _ids, x, _ = peers[1].data.batch(5)
            with torch.no_grad():
                want = snapshots[5 - s].train()(x)  # peer 1's weights at step 3 on batch 5
            assert torch.allclose(spy[0][0], want, atol=1e-5)
    assert ex[0].stats.staleness_max == s
    # lookahead forwards leave BatchNorm running statistics alone
    bn = next(m for m in peers[1].model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.num_batches_tracked is not None and int(bn.num_batches_tracked) == 6


def test_checkpoint_mode_teachers_are_frozen_copies_of_published_versions():
    P = 4
    cfg = small_job("exchange.mode=checkpoint", f"exchange.period={P}")
    peers, ex, _ = make(cfg)
    assert not torch.equal(peers[0].data.batch(0)[0], peers[1].data.batch(0)[0])  # own orders
    published = {}
    for step in range(10):
        if step % P == 0:
            published[step] = copy.deepcopy(peers[1].model.state_dict())
        lockstep(peers, ex, step)
    v = peers[0].teacher_versions()[1]
    assert v == 8
    t = peers[0].teachers[1].model
    assert not any(p.requires_grad for p in t.parameters()) and not t.training
    for k, val in published[8].items():
        assert torch.equal(t.state_dict()[k], val), k
    st = ex[0].stats
    assert st.staleness_max == P - 1 and st.teacher_updates == 2 and st.bytes_published > 0  # versions 4, 8


def test_a_teacher_ahead_of_its_student_is_not_negative_staleness():
    """Free-running peers: a fast teacher's checkpoint can be newer than the student's step."""
    st = ExchangeStats()
    for staleness in (-150, 3, 9, -20):
        st.see_staleness(staleness)
    d = st.to_dict()
    assert d["staleness_mean"] == 3.0 and d["staleness_max"] == 9 and d["teacher_lead_max"] == 150
    other = ExchangeStats()
    other.see_staleness(-400)
    st.merge(other)
    assert st.to_dict()["staleness_mean"] == 12 / 5 and st.teacher_lead_max == 400


def test_burn_in_trains_plain_ce_and_alpha_zero_exchanges_nothing():
    cfg = small_job("loss.burn_in=5")
    peers, ex, _ = make(cfg)
    spy: dict[int, Any] = {}
    for step in range(5):
        lockstep(peers, ex, step, spy)
        assert spy[0] is None
    lockstep(peers, ex, 5, spy)
    assert spy[0] is not None and len(spy[0]) == 1
    cfg = small_job("loss.alpha=0")
    peers, ex, _ = make(cfg)
    for step in range(3):
        lockstep(peers, ex, step)
    assert ex[0].stats.bytes_published == ex[0].stats.bytes_pulled == 0


def test_no_gradient_reaches_the_teacher_peer():
    cfg = small_job()
    peers, ex, _ = make(cfg)
    for p, e in zip(peers, ex):
        e.start_step(p, 0)
    peers[0].train_step(ex[0].teacher_logits(peers[0], 0))
    assert all(p.grad is None for p in peers[1].model.parameters())


def test_a_non_finite_loss_is_found_at_the_next_read_and_nothing_trained_past_it_leaves_the_peer():
    """Steps never read the device (item 7 of the LM issue); the losses of a round are read at once, and
    whatever would carry a NaN model out of the peer (evaluation, published or saved weights) reads first."""
    cfg = small_job()
    peers, _ex, _ = make(cfg)
    peers[0].forward(0)
    peers[0].train_step(None)
    peers[0].forward(1)
    peers[0].train_step([torch.full((16, 10), float("nan"))])  # returns: the NaN is still on the device
    for leave in (peers[0].weights, peers[0].evaluate, peers[0].training_state, peers[0].take_losses):
        with pytest.raises(NonFiniteLossError, match="peer0-mlp: non-finite loss nan at step 1 .*distill=nan"):
            leave()  # and again on every later read: a NaN model never gets out


def test_losses_are_read_once_per_round_in_step_order():
    cfg = small_job(steps=6)
    peers, ex, _ = make(cfg)
    for step in range(3):
        lockstep(peers, ex, step)
    assert len(peers[0]._device_losses) == 3 and not peers[0]._read_losses
    got = peers[0].take_losses()
    assert [s.step for s in got] == [0, 1, 2] and all(s.distill is not None and s.loss > 0 for s in got)
    assert peers[0].take_losses() == [] and peers[0]._device_losses == []


def test_training_state_resumes_exactly_and_loads_weights_only(tmp_path):
    cfg = small_job(steps=12)
    ref = LocalEngine(cfg)
    ref.run()
    peers, ex, _board = make(cfg)
    for step in range(6):
        lockstep(peers, ex, step)
    for p in peers:
        torch.save(p.training_state(), tmp_path / f"{p.name}.pt")
    # fresh peers (as after a crash), resumed from the files
    peers2, ex2, _ = make(cfg)
    for p in peers2:
        p.load_training_state(torch.load(tmp_path / f"{p.name}.pt", weights_only=True))
    losses: list[list[float]] = [[], []]
    for step in range(6, 12):
        for p, e in zip(peers2, ex2):
            e.start_step(p, step)
        for p, e in zip(peers2, ex2):
            p.train_step(e.teacher_logits(p, step))
    for i, p in enumerate(peers2):
        losses[i] = [s.loss for s in p.take_losses()]
    for i in range(2):
        assert losses[i] == pytest.approx(ref.step_losses[i][6:], rel=1e-5)


@pytest.mark.parametrize("dtype, tol", [("float32", 0), ("float16", 1e-3), ("bfloat16", 1e-2)])
def test_wire_encoding_roundtrip(dtype, tol):
    t = torch.randn(8, 10)
    a = encode_tensor(t, dtype)
    assert isinstance(a, np.ndarray) and a.itemsize == (4 if dtype == "float32" else 2)
    back = decode_array(a, dtype)
    assert back.dtype == torch.float32 and torch.allclose(back, t, rtol=tol, atol=tol)
    w = encode_weights({"w": t, "n": torch.tensor(7)}, 3, dtype)
    d = decode_weights(w)
    assert d["n"].item() == 7 and d["n"].dtype == torch.int64 and torch.allclose(d["w"], t, rtol=tol, atol=tol)


def test_local_engine_learns_and_ring_topology_runs():
    history = LocalEngine(small_job(steps=40)).run()
    assert history[-1].metrics["mean_peer_accuracy"] > 0.5  # 10 classes: chance is 0.1
    cfg = small_job("exchange.topology=ring", models=("mlp", "mlp", "cnn"), steps=10)
    history = LocalEngine(cfg).run()
    assert [p.exchange.teacher_updates for p in history[-1].peers] == [0, 0, 0]
    assert all(p.exchange.bytes_pulled == p.exchange.bytes_published for p in history[-1].peers)


def test_published_weights_do_not_change_when_the_publisher_trains_on():
    cfg = small_job("exchange.mode=checkpoint", "exchange.period=2")
    peers, ex, board = make(cfg)
    for step in range(2):
        lockstep(peers, ex, step)
    published = board.state.weights[1][2]
    frozen = {k: v.copy() for k, v in published.arrays.items()}
    for step in range(2, 4):
        lockstep(peers, ex, step)
    for k, v in frozen.items():
        assert np.array_equal(published.arrays[k], v), k


def test_fetching_several_teachers_waits_for_all_and_names_the_missing_one():
    board = in_memory_board(small_job(models=("mlp", "mlp", "mlp")))
    shard = lambda j: LogitShard(4, 4, np.arange(3), np.full((3, 10), float(j), np.float32), "float32")
    board.publish_logits(1, shard(1))
    with pytest.raises(TeacherUnavailable, match=r"peer\(s\) \[2\] for step 4"):
        board.fetch_logits([1, 2], 4, 0, timeout_s=0.05)
    board.publish_logits(2, shard(2))
    got = board.fetch_logits([2, 1], 4, 0, timeout_s=0.05)
    assert [float(s.logits[0, 0]) for s in got] == [2.0, 1.0]  # in the order asked


def test_the_local_engine_board_lets_taken_shards_go():
    """A LocalEngine peer is never sent back to an earlier step, so a shard every consumer took can go:
    the board once kept every shard of the run (900 MB of byte-token shards in lm_quickstart)."""
    engine = LocalEngine(small_job(steps=12))
    engine.run()
    assert len(engine.board.state.logits) <= engine.cfg.num_peers


def test_held_bytes_estimate_for_full_and_topk_shards():
    from codistill.exchange import EXCHANGES, held_bytes_warning

    full = small_job("exchange.dtype=bfloat16", steps=100)
    held_full = EXCHANGES["logits"].held_bytes(full, positions_per_batch=1024, num_classes=8192)
    # 2 publishers x (eval_every + staleness + 1) steps x 1024 positions x 8192 classes x 2 bytes
    assert held_full == 2 * (10 + 0 + 1) * 1024 * 8192 * 2
    top = small_job("exchange.dtype=bfloat16", "exchange.logits=topk", "exchange.topk=32", steps=100)
    # per position: 32 x (2-byte value + 2-byte id) + lse and lse_rest (8 bytes)
    assert EXCHANGES["logits"].held_bytes(top, 1024, 8192) == held_full // (8192 * 2) * (32 * 4 + 8)
    assert EXCHANGES["logits"].held_bytes(small_job("loss.alpha=0"), 1024, 8192) == 0
    assert EXCHANGES["checkpoint"].held_bytes(full, 1024, 8192) == 0
    assert held_bytes_warning(full, 1024, 8192) is None  # 0.37 GB
    line = held_bytes_warning(full, 1024, 100_000)  # 4.5 GB: the RayEngine prints this before any actor starts
    assert line is not None and "about 4.5 GB" in line and "exchange.logits=topk" in line
