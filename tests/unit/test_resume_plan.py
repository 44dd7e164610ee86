"""Where a resumed run starts (codistill.engine.resume), on real checkpoint files, without Ray."""

import json

import torch

from codistill.engine.resume import apply_resume, plan_resume
from codistill.storage import Storage, checkpoint_path
from tests.helpers import small_job


def write_run(tmp_path, steps_per_round: list[int], checkpoints: dict[str, list[int]]):
    cfg = small_job()
    storage = Storage(tmp_path)
    state = {"model": {"w": torch.zeros(2)}, "step": 0}
    for name, steps in checkpoints.items():
        for step in steps:
            storage.write_torch(checkpoint_path(name, step), {**state, "step": step})
    rounds = [
        {"round": r, "step": s, "peers": {n: {"step": s, "restarts": r} for n in ("peer0-mlp", "peer1-cnn")}}
        for r, s in enumerate(steps_per_round)
    ]
    storage.write("progress.json", json.dumps({"rounds": rounds}).encode())
    return cfg, storage


def test_the_newest_round_every_peer_can_return_to(tmp_path):
    cfg, storage = write_run(tmp_path, [10, 20, 30], {"peer0-mlp": [10, 20, 30, 37], "peer1-cnn": [20, 30, 34]})
    point = plan_resume(cfg, storage)
    assert point.steps == {"peer0-mlp": 30, "peer1-cnn": 30} and len(point.prior_rounds) == 3
    assert point.restarts == {"peer0-mlp": 2, "peer1-cnn": 2} and point.messages == []
    apply_resume(cfg, storage, point)  # a restarted peer must not find a checkpoint past the driver's round
    assert storage.checkpoint_steps("peer0-mlp") == [10, 20, 30] and storage.checkpoint_steps("peer1-cnn") == [20, 30]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_round_before(tmp_path):
    cfg, storage = write_run(tmp_path, [10, 20, 30], {"peer0-mlp": [10, 20, 30], "peer1-cnn": [10, 20, 30]})
    (tmp_path / checkpoint_path("peer1-cnn", 30)).write_bytes(b"PK\x03\x04 truncated")
    point = plan_resume(cfg, storage)
    assert point.steps == {"peer0-mlp": 20, "peer1-cnn": 20} and [r["step"] for r in point.prior_rounds] == [10, 20]
    assert len(point.messages) == 1 and point.messages[0].startswith(
        "warning: the checkpoint of peer1-cnn at step 30 cannot be used"
    )


def test_no_common_round_starts_over_and_says_so(tmp_path):
    cfg, storage = write_run(tmp_path, [10, 20], {"peer0-mlp": [10, 20], "peer1-cnn": [15]})
    point = plan_resume(cfg, storage)
    assert point.steps is None and point.prior_rounds == []
    assert point.messages[-1].startswith("no round that every peer can return to")
    apply_resume(cfg, storage, point)
    assert storage.checkpoint_steps("peer0-mlp") == [] and storage.checkpoint_steps("peer1-cnn") == []
    assert json.loads(storage.read("progress.json") or b"") == {"rounds": []}
