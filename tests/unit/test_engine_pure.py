"""The engine's plain-Python parts, without Ray: round assembly, failure decisions, what the CLI shows."""

import pytest

from codistill.engine import Decision, FailurePolicy, PeerFailedError, PeerFailure, RoundAssembler
from codistill.models import MODELS
from codistill.run import main
from tests.helpers import small_job


def test_rounds_complete_in_order_whatever_order_reports_arrive():
    asm: RoundAssembler[str] = RoundAssembler([3, 3])
    assert asm.add(1, 0, "b0") == []
    assert asm.add(1, 1, "b1") == []  # peer 1 is a round ahead: nothing completes without peer 0
    assert asm.add(0, 1, "a1") == []  # round 1 waits for round 0
    assert asm.add(0, 0, "a0") == [(0, ["a0", "b0"]), (1, ["a1", "b1"])]
    assert asm.add(0, 2, "a2") == [] and not asm.complete
    assert asm.add(1, 2, "b2") == [(2, ["a2", "b2"])] and asm.complete


def test_a_peer_with_fewer_rounds_stands_in_with_its_last_report():
    asm: RoundAssembler[str] = RoundAssembler([2, 3])  # peer 0's shard is shorter
    asm.add(0, 0, "a0")
    asm.add(1, 0, "b0")
    asm.add(0, 1, "a1")
    assert asm.add(1, 1, "b1") == [(1, ["a1", "b1"])]
    assert asm.add(1, 2, "b2") == [(2, ["a1", "b2"])] and asm.complete


def test_a_resumed_driver_starts_at_the_first_round_it_has_not_reported():
    asm: RoundAssembler[str] = RoundAssembler([4, 4], first_round=2)
    assert asm.add(0, 2, "a2") == [] and asm.add(1, 2, "b2") == [(2, ["a2", "b2"])]


def test_failure_policy_decisions():
    policy = FailurePolicy(small_job("resources.max_restarts=2"))
    decision, msg = policy.decide(PeerFailure("peer1-cnn", 3, "restarted", "", restarts=1))
    assert decision is Decision.CONTINUE and msg.startswith("peer1-cnn restarted (1 restart(s)")
    decision, msg = policy.decide(PeerFailure("peer1-cnn", 3, "died", "actor gone"))
    assert decision is Decision.RAISE and "max_restarts=2" in msg and "actor gone" in msg
    decision, msg = policy.decide(PeerFailure("peer0-mlp", 0, "step_failed", "non-finite loss"))
    assert decision is Decision.RAISE and msg == "peer peer0-mlp failed in round 0: non-finite loss"


def test_cli_prints_one_line_for_what_the_user_can_fix(tmp_path, capsys):
    argv = ["--output", str(tmp_path / "run")]
    for s in ("engine=local", "tracking=none", "steps=20", "peers.0.optim.lr=1e12"):
        argv += ["--set", s]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: peer ") and "non-finite loss" in err[0], err


def test_cli_lets_a_bug_show_its_traceback(tmp_path):
    def broken(input_shape, num_classes):
        raise RuntimeError("a bug in a model constructor")

    MODELS["broken"] = broken
    try:
        argv = ["--output", str(tmp_path / "run")]
        for s in ("engine=local", "tracking=none", "steps=5", "peers.0.model=broken"):
            argv += ["--set", s]
        with pytest.raises(RuntimeError, match="a bug in a model constructor"):
            main(argv)
    finally:
        del MODELS["broken"]


def test_peer_failed_error_says_peer_round_and_kind():
    policy = FailurePolicy(small_job())
    failure = PeerFailure("peer1-cnn", 4, "died", "node lost")
    decision, msg = policy.decide(failure)
    err = policy.error(failure, msg)
    assert decision is Decision.RAISE
    assert isinstance(err, PeerFailedError) and isinstance(err, RuntimeError)
    assert (err.peer, err.round, err.kind, str(err)) == ("peer1-cnn", 4, "died", msg)
