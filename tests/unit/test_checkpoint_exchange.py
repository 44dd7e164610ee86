"""The checkpoint exchange keeps its promise (docs/design.md, "Checkpoint exchange"): no teacher younger
than burn_in and never the initial weights, bounded staleness with waiting, sync as the limit, a
warning when the bound is broken anyway."""

import threading

import numpy as np
import pytest

from codistill.config import ExchangeConfig
from codistill.data import load_dataset
from codistill.engine.report import staleness_warnings
from codistill.errors import ConfigError
from codistill.exchange import ExchangeStats, TeacherUnavailable, in_memory_board, make_exchange
from tests.helpers import make_peer, small_job


def make(*overrides):
    cfg = small_job("exchange.mode=checkpoint", *overrides)
    ds = load_dataset(cfg.data)
    board = in_memory_board(cfg)
    peers = [make_peer(cfg, i, ds) for i in range(cfg.num_peers)]
    return cfg, peers, [make_exchange(cfg, i, board) for i in range(cfg.num_peers)], board


def step(peer, ex, k):
    ex.start_step(peer, k)
    teachers = ex.teacher_logits(peer, k)
    peer.train_step(teachers)
    ex.end_step(peer, k)
    return teachers


def lockstep(peers, exchanges, k):
    """All peers' step k, phases as LocalEngine runs them; the teachers each peer got."""
    for p, e in zip(peers, exchanges):
        e.start_step(p, k)
    got = []
    for p, e in zip(peers, exchanges):
        got.append(e.teacher_logits(p, k))
        p.train_step(got[-1])
    for p, e in zip(peers, exchanges):
        e.end_step(p, k)
    return got


def test_the_initial_weights_are_never_published_or_distilled_from():
    _cfg, peers, ex, board = make("exchange.period=4")
    for k in range(4):
        assert lockstep(peers, ex, k) == [None, None]  # no teacher exists yet: plain cross-entropy
    assert board.state.newest_versions() == {0: 4, 1: 4}
    assert all(t is not None for t in lockstep(peers, ex, 4))
    assert peers[0].teacher_versions() == {1: 4}


def test_no_teacher_trained_for_fewer_than_burn_in_steps():
    _cfg, peers, ex, board = make("exchange.period=4", "loss.burn_in=6")
    assert ex[0].first_usable == 8
    for k in range(8):
        got = lockstep(peers, ex, k)
        assert got == [None, None], k  # steps 6 and 7 are past burn_in, but version 4 < 6 is never used
        assert 4 not in board.state.weights[1]  # and it is not even published
    lockstep(peers, ex, 8)
    assert peers[0].teacher_versions() == {1: 8}


def test_bounded_staleness_refuses_a_teacher_too_old():
    _cfg, peers, ex, _board = make("exchange.period=4", "exchange.max_staleness=4", "exchange.timeout_s=0.3")
    for k in range(8):
        lockstep(peers, ex, k)
    for k in range(8, 13):  # peer 0 runs ahead alone: version 8 is recent enough up to step 12
        assert step(peers[0], ex[0], k) is not None
    assert ex[0].required_version(13) == 12  # step 13 needs a version >= 9: peer 1's 12, not published yet
    with pytest.raises(TeacherUnavailable, match=r"no checkpoint of peer\(s\) \{1: 12\} .* after 0.3s"):
        step(peers[0], ex[0], 13)


def test_bounded_staleness_waits_for_a_lagging_teacher_and_goes_on():
    _cfg, peers, ex, _board = make("exchange.period=4", "exchange.max_staleness=4", "exchange.timeout_s=60")
    for k in range(8):
        lockstep(peers, ex, k)
    waited = threading.Event()

    def slow_peer() -> None:
        waited.wait(timeout=60)  # start only once the fast peer is blocked
        for k in range(8, 12):
            step(peers[1], ex[1], k)

    thread = threading.Thread(target=slow_peer)
    thread.start()
    for k in range(8, 14):
        if k == 13:
            waited.set()
        step(peers[0], ex[0], k)
    thread.join()
    assert peers[0].teacher_versions() == {1: 12}  # it waited for version 12 instead of using 8 at step 13
    assert ex[0].stats.staleness_max == 4


def test_sync_uses_exactly_the_last_multiple_of_the_period():
    _cfg, peers, ex, _board = make("exchange.period=4", "exchange.sync=true")
    for k in range(13):
        lockstep(peers, ex, k)
        if k >= 4:
            assert peers[0].teacher_versions() == {1: (k // 4) * 4}
    assert ex[0].stats.staleness_max == 3


def test_a_finished_teacher_is_not_waited_for():
    _cfg, peers, ex, _board = make("exchange.period=4", "exchange.max_staleness=4", "exchange.timeout_s=0.5")
    for k in range(8):
        lockstep(peers, ex, k)
    ex[1].finish(peers[1])  # peer 1 trained its last step (a shorter shard)
    for k in range(8, 16):
        assert step(peers[0], ex[0], k) is not None  # distills from version 8, never waits
    assert peers[0].teacher_versions() == {1: 8}


def test_a_bound_below_the_period_is_refused():
    with pytest.raises(ConfigError, match=r"^exchange.max_staleness: got 3; allowed: .*period - 1 = 9"):
        small_job("exchange.mode=checkpoint", "exchange.period=10", "exchange.max_staleness=3")
    assert ExchangeConfig(period=10, max_staleness=9).staleness_bound == 9
    assert ExchangeConfig(period=10).staleness_bound == 20


def test_a_staleness_beyond_the_job_is_one_warning_line_per_peer():
    from codistill.engine.report import PeerReport
    from codistill.peer import EvalResult

    cfg = small_job("exchange.mode=checkpoint", "exchange.period=10")
    stats = ExchangeStats()
    stats.see_staleness(35)
    nothing = np.zeros(0)
    report = PeerReport(
        0, "peer0-mlp", "mlp", 50, [1.0], EvalResult(50, 0.0, 0.0, 0, nothing, nothing, nothing), 1.0, stats
    )
    warned: set[str] = set()
    lines = staleness_warnings(cfg, [report], warned)
    assert lines == [
        "warning: peer0-mlp distilled from a teacher 35 steps old, more than the 20 this job allows "
        "(period=10, max_staleness=20)"
    ]
    assert staleness_warnings(cfg, [report], warned) == []
    ok = ExchangeStats()
    ok.see_staleness(20)
    report.exchange, report.name = ok, "peer1"
    assert staleness_warnings(cfg, [report], set()) == []
