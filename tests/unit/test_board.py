"""BoardState, the bookkeeping both boards share, driven directly (no locks, no Ray)."""

from codistill.exchange import BoardState, new_board_state
from tests.helpers import small_job


def three_peers_all() -> BoardState[str]:
    return BoardState({0: [1, 2], 1: [0, 2], 2: [0, 1]}, versions_kept=1)


def test_a_shard_goes_once_every_consumer_took_it_and_none_can_be_sent_back():
    st = three_peers_all()
    st.put_logits(0, 5, "shard-0-5")
    assert st.missing_logits([0, 1], 5) == [1]
    assert st.take_logits([0], 5, consumer=1) == ["shard-0-5"]
    assert (0, 5) in st.logits  # consumer 2 has not taken it
    st.take_logits([0], 5, consumer=2)
    assert (0, 5) in st.logits  # taken by all, but a restart could send a consumer back to step <= 5
    st.mark_durable(1, 6)
    assert (0, 5) in st.logits
    st.mark_durable(2, 5)  # durable *at* step 5 still redoes step 5
    assert (0, 5) in st.logits
    st.mark_durable(2, 9)
    assert (0, 5) not in st.logits and (0, 5) not in st.taken


def test_a_lost_shard_is_forgotten_until_published_again():
    st = three_peers_all()
    st.put_logits(1, 3, "ref")
    st.drop_logits(1, 3)
    assert st.missing_logits([1], 3) == [1]
    st.put_logits(1, 3, "ref-again")
    assert st.take_logits([1], 3, 0) == ["ref-again"]


def test_versions_kept_and_newest_selection():
    st: BoardState[str] = BoardState({0: [1], 1: [0]}, versions_kept=3)
    assert st.newest_version(0) == -1 and st.newest_versions() == {}
    dropped = [d for v in (10, 20, 30, 40) for d in st.put_weights(0, v, f"w{v}")]
    assert dropped == ["w10"] and sorted(st.weights[0]) == [20, 30, 40]
    assert st.newest_version(0) == 40 and st.newest_versions() == {0: 40}
    # newest for a consumer that has less; nothing for one that has it
    assert st.pick_weights({0: 20}, {}, exact=False) == {0: (40, "w40")}
    assert st.pick_weights({0: 40}, {}, exact=False) == {}
    # the exact schedule hands out the version asked for, even when newer ones exist
    assert st.pick_weights({0: 20}, {0: 30}, exact=True) == {0: (30, "w30")}
    assert st.pick_weights({0: 30}, {0: 30}, exact=True) == {}
    single: BoardState[int] = BoardState({0: [1], 1: [0]}, versions_kept=1)
    for v in (10, 20):
        single.put_weights(0, v, v)
    assert list(single.weights[0]) == [20]


def test_weights_ready_waits_for_a_version_unless_the_publisher_finished():
    st: BoardState[str] = BoardState({0: [1], 1: [0]}, versions_kept=1)
    st.put_weights(1, 50, "w50")
    assert st.weights_ready({1: 50}, exact=False) and st.weights_ready({1: 40}, exact=False)
    assert not st.weights_ready({1: 100}, exact=False)
    assert st.missing_weights({1: 100}, exact=False) == [1]
    assert not st.weights_ready({1: 40}, exact=True)  # only 50 is kept
    st.mark_finished(1)
    assert st.weights_ready({1: 100}, exact=False) and st.weights_ready({1: 40}, exact=True)
    assert st.pick_weights({1: -1}, {1: 100}, exact=False) == {1: (50, "w50")}


def test_a_rebuilt_board_learns_who_passed_which_step():
    """After a board restart the takes are lost; a consumer that reports its step has taken all before it."""
    st = three_peers_all()
    for step in (3, 8):
        st.put_logits(0, step, f"shard-{step}")
    for c in (1, 2):
        st.mark_durable(c, 6)
    st.restore_progress(1, 5)
    assert (0, 3) in st.logits  # consumer 2 has not said where it is
    st.restore_progress(2, 7)
    assert (0, 3) not in st.logits and (0, 8) in st.logits


def test_the_job_decides_consumers_and_versions_kept():
    ring = new_board_state(small_job("exchange.topology=ring", models=("mlp", "mlp", "mlp")))
    assert ring.consumers == {0: [1], 1: [2], 2: [0]} and ring.versions_kept == 1
    sync = new_board_state(small_job("exchange.mode=checkpoint", "exchange.sync=true"))
    assert sync.versions_kept == 3
    free = new_board_state(small_job("exchange.mode=checkpoint"))
    assert free.versions_kept == 1
