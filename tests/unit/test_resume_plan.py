"""Where a resumed run starts (codistill.engine.resume), on real checkpoint files, without Ray: a damaged
progress.json is rebuilt from the checkpoints, nothing is deleted (what is not used is set aside), a checkpoint
of another run is never resumed from; and what --resume may change in a job (codistill.config.resume_changes),
refused before anything in the run directory is touched."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from codistill.api import run_job
from codistill.config import to_dict
from codistill.config.resume_changes import RESUME_MAY_CHANGE, check_resume_changes
from codistill.engine.resume import SET_ASIDE, apply_resume, foreign_checkpoint, plan_resume
from codistill.errors import ConfigError
from codistill.storage import Storage, checkpoint_path
from tests.helpers import ROOT, small_job

RUN = "run-a"
NAMES = ("peer0-mlp", "peer1-cnn")


def state_at(step: int, run_id: str | None = RUN, restarts: int = 0, total: int = 100) -> dict:
    """A peer's training checkpoint as PeerActor._save writes it (eval_every=10: round r ends at 10 (r + 1))."""
    state = {
        "model": {"w": torch.zeros(2)},
        "optimizer": {},
        "scheduler": {},
        "step": step,
        "board": {},
        "busy_s": 0.0,
        "exchange": {},
        "round_index": (step - 1) // 10,
        "round_losses": [],
        "lr": 0.1,
        "restarts": restarts,
        "total_steps": total,
    }
    return state if run_id is None else {**state, "run_id": run_id}


def write_run(tmp_path, steps_per_round: list[int], checkpoints: dict[str, list[int]], run_id: str | None = RUN):
    cfg = small_job("engine=ray", steps=100)
    storage = Storage(tmp_path)
    storage.write("job.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    if run_id is not None:
        storage.write("run.json", json.dumps({"run_id": run_id}).encode())
    for name, steps in checkpoints.items():
        for step in steps:
            storage.write_torch(checkpoint_path(name, step), state_at(step, run_id, restarts=step // 10))
    rounds = [
        {"round": r, "step": s, "peers": {n: {"step": s, "restarts": r} for n in NAMES}}
        for r, s in enumerate(steps_per_round)
    ]
    storage.write("progress.json", json.dumps({"rounds": rounds}).encode())
    return cfg, storage


def files(root) -> dict[str, bytes]:
    """Every file under the run directory, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def set_aside(root) -> dict[str, bytes]:
    """What a resume set aside, by the relative path it had in the run directory."""
    (folder,) = (root / SET_ASIDE).iterdir()
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_newest_round_every_peer_can_return_to(tmp_path):
    cfg, storage = write_run(tmp_path, [10, 20, 30], {"peer0-mlp": [10, 20, 30, 37], "peer1-cnn": [20, 30, 34]})
    before = files(tmp_path)
    point = plan_resume(cfg, storage, RUN)
    assert point.steps == {"peer0-mlp": 30, "peer1-cnn": 30} and len(point.prior_rounds) == 3
    assert point.restarts == {"peer0-mlp": 2, "peer1-cnn": 2} and point.messages == [] and point.first_round == 3
    apply_resume(cfg, storage, point)  # a restarted peer must not find a checkpoint past the driver's round
    assert storage.checkpoint_steps("peer0-mlp") == [10, 20, 30] and storage.checkpoint_steps("peer1-cnn") == [20, 30]
    # set aside, not deleted: the files past the resume point keep their bytes and their relative paths
    moved = [checkpoint_path("peer0-mlp", 37), checkpoint_path("peer1-cnn", 34)]
    assert set_aside(tmp_path) == {rel: before[rel] for rel in moved}
    assert [m.split(" in ")[0] for m in point.messages] == [
        "set aside the checkpoints of peer0-mlp at step 37 (past the resume point)",
        "set aside the checkpoints of peer1-cnn at step 34 (past the resume point)",
    ]
    assert f"{tmp_path}/{SET_ASIDE}/resume-" in point.messages[0]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_round_before(tmp_path):
    cfg, storage = write_run(tmp_path, [10, 20, 30], {"peer0-mlp": [10, 20, 30], "peer1-cnn": [10, 20, 30]})
    (tmp_path / checkpoint_path("peer1-cnn", 30)).write_bytes(b"PK\x03\x04 truncated")
    point = plan_resume(cfg, storage, RUN)
    assert point.steps == {"peer0-mlp": 20, "peer1-cnn": 20} and [r["step"] for r in point.prior_rounds] == [10, 20]
    assert len(point.messages) == 1 and point.messages[0].startswith(
        "warning: the checkpoint of peer1-cnn at step 30 cannot be used"
    )
    apply_resume(cfg, storage, point)  # the corrupt one is set aside too: a person may still want to look at it
    assert set(set_aside(tmp_path)) == {checkpoint_path("peer0-mlp", 30), checkpoint_path("peer1-cnn", 30)}


def test_no_common_round_starts_over_and_says_so(tmp_path):
    cfg, storage = write_run(tmp_path, [10, 20], {"peer0-mlp": [10, 20], "peer1-cnn": [15]})
    before = files(tmp_path)
    point = plan_resume(cfg, storage, RUN)
    assert point.steps is None and point.prior_rounds == []
    assert point.messages[-1].startswith("no round that every peer can return to")
    apply_resume(cfg, storage, point)
    assert storage.checkpoint_steps("peer0-mlp") == [] and storage.checkpoint_steps("peer1-cnn") == []
    assert json.loads(storage.read("progress.json") or b"") == {"rounds": []}
    kept = [checkpoint_path("peer0-mlp", 10), checkpoint_path("peer0-mlp", 20), checkpoint_path("peer1-cnn", 15)]
    assert set_aside(tmp_path) == {rel: before[rel] for rel in [*kept, "progress.json"]}


DAMAGE = {
    "missing": None,
    "empty": b"",
    "truncated": b'{"rounds": [{"round": 0, "step": 10, "peers": {"peer0-mlp": {"st',
    "not a mapping": b"[]",
    "no list of rounds": b'{"rounds": 5}',
    "a round without a peer": json.dumps(
        {"rounds": [{"round": 0, "step": 10, "peers": {"peer0-mlp": {"step": 10}}}]}
    ).encode(),
    "rounds out of order": json.dumps(
        {"rounds": [{"round": r, "step": 10, "peers": {n: {"step": 10} for n in NAMES}} for r in (0, 2)]}
    ).encode(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_progress_file_is_rebuilt_from_the_checkpoints(tmp_path, damage):
    """A driver killed after round 2 (both peers' round-end checkpoints 10-30 intact, mid-round ones past it)."""
    cfg, storage = write_run(tmp_path, [10, 20, 30], {"peer0-mlp": [10, 20, 30, 37], "peer1-cnn": [20, 30, 34]})
    if DAMAGE[damage] is None:
        storage.delete("progress.json")
    else:
        (tmp_path / "progress.json").write_bytes(DAMAGE[damage])
    before = files(tmp_path)
    point = plan_resume(cfg, storage, RUN)
    assert point.steps == {"peer0-mlp": 30, "peer1-cnn": 30}
    assert point.restarts == {"peer0-mlp": 3, "peer1-cnn": 3}  # from the checkpoints themselves
    assert point.prior_rounds == [] and point.first_round == 3  # round 2 is done: the driver goes on with round 3
    found = point.messages
    assert found[0].startswith("progress.json ") and found[0].endswith(
        ": rebuilding the resume point from the checkpoints"
    )
    assert found[1].startswith("resuming after round 2 (step 30)") and "are lost" in found[1]
    assert not any("starting over" in m for m in found)
    apply_resume(cfg, storage, point)
    # nothing deleted: every file is where it was, or set aside with the same bytes
    after = files(tmp_path)
    moved = set_aside(tmp_path)
    for rel, data in before.items():
        assert after.get(rel) == data or moved.get(rel) == data, rel
    assert storage.checkpoint_steps("peer0-mlp") == [10, 20, 30] and storage.checkpoint_steps("peer1-cnn") == [20, 30]
    assert storage.read("progress.json") is None  # the driver writes it with its first round
    if DAMAGE[damage] is not None:
        assert moved["progress.json"] == DAMAGE[damage]
        assert any(m.startswith("set aside the damaged progress.json as ") for m in point.messages)


def test_a_rebuilt_point_skips_what_does_not_load_and_says_so(tmp_path):
    cfg, storage = write_run(tmp_path, [], {"peer0-mlp": [10, 20, 30], "peer1-cnn": [10, 20, 30]})
    storage.write("progress.json", b"")
    (tmp_path / checkpoint_path("peer1-cnn", 30)).write_bytes(b"\x00" * 100)
    storage.write_torch(checkpoint_path("peer0-mlp", 20), {**state_at(20), "step": 25})  # not what its name says
    point = plan_resume(cfg, storage, RUN)
    assert point.steps == {"peer0-mlp": 10, "peer1-cnn": 10} and point.first_round == 1
    assert "warning: the checkpoint of peer1-cnn at step 30 cannot be used (" in "\n".join(point.messages)
    assert (
        "warning: the checkpoint of peer0-mlp at step 20 cannot be used (it holds step 25, not the step its name says)"
        in point.messages
    )


def test_the_records_before_an_earlier_rebuild_are_not_needed(tmp_path):
    """After a resume that rebuilt its point, progress.json starts at a later round: a second resume goes on
    from its records (the first round number is theirs), or from the checkpoints before them."""
    cfg, storage = write_run(tmp_path, [], {"peer0-mlp": [30, 40, 50], "peer1-cnn": [30, 40, 50]})
    rounds = [{"round": r, "step": s, "peers": {n: {"step": s} for n in NAMES}} for r, s in ((3, 40), (4, 50))]
    storage.write("progress.json", json.dumps({"rounds": rounds}).encode())
    point = plan_resume(cfg, storage, RUN)
    assert point.steps == {"peer0-mlp": 50, "peer1-cnn": 50} and point.first_round == 5
    assert [r["round"] for r in point.prior_rounds] == [3, 4]
    for step in (40, 50):
        (tmp_path / checkpoint_path("peer1-cnn", step)).write_bytes(b"")
    point = plan_resume(cfg, storage, RUN)
    assert point.steps == {"peer0-mlp": 30, "peer1-cnn": 30} and point.first_round == 3 and point.prior_rounds == []
    apply_resume(cfg, storage, point)
    assert "progress.json" in set_aside(tmp_path)  # its rounds (3, 4) are past the point: not resumed, kept


def test_a_checkpoint_of_another_run_is_never_resumed_from(tmp_path):
    cfg, storage = write_run(tmp_path, [10, 20, 30], {"peer0-mlp": [10, 20, 30], "peer1-cnn": [10, 20]})
    storage.write_torch(checkpoint_path("peer1-cnn", 30), state_at(30, run_id="run-b"))
    storage.write_torch(checkpoint_path("peer1-cnn", 1000), state_at(1000, run_id="run-b"))
    point = plan_resume(cfg, storage, RUN)
    assert point.steps == {"peer0-mlp": 20, "peer1-cnn": 20}
    assert point.messages == [
        "warning: the checkpoint of peer1-cnn at step 30 cannot be used (written by run run-b, not by this run run-a); "
        "trying the round before"
    ]
    apply_resume(cfg, storage, point)  # and it is set aside (past the point), so a restarted peer cannot find it
    assert storage.checkpoint_steps("peer1-cnn") == [10, 20]
    assert {checkpoint_path("peer1-cnn", 30), checkpoint_path("peer1-cnn", 1000)} <= set(set_aside(tmp_path))
    # the same when the point is rebuilt from the checkpoints
    cfg, storage = write_run(tmp_path / "rebuilt", [], {"peer0-mlp": [10, 20], "peer1-cnn": [10]})
    storage.write_torch(checkpoint_path("peer1-cnn", 20), state_at(20, run_id="run-b"))
    storage.delete("progress.json")
    point = plan_resume(cfg, storage, RUN)
    assert point.steps == {"peer0-mlp": 10, "peer1-cnn": 10}
    assert point.messages[1] == (
        "warning: the checkpoint of peer1-cnn at step 20 cannot be used (written by run run-b, not by this run run-a)"
    )


def test_the_run_id_check():
    assert foreign_checkpoint(state_at(10, run_id="run-b"), "run-a") == "written by run run-b, not by this run run-a"
    assert foreign_checkpoint(state_at(10, run_id="run-a"), "run-a") is None
    unstamped = state_at(10, run_id=None)  # written before run ids were recorded: only --resume takes it
    assert foreign_checkpoint(unstamped, "run-a") == "it records no run id, so it cannot be proven this run's (run-a)"
    assert foreign_checkpoint(unstamped, "run-a", unstamped_ok=True) is None


def test_checkpoints_without_a_run_id_are_taken_by_a_resume_and_stamped(tmp_path):
    """Written before codistill recorded run ids: nothing in them can tell, and refusing them would throw away every
    run started before. --resume of the directory (its run.json says whose it is) takes those it resumes from and
    stamps them, so a peer restarted before its next checkpoint can go on from them; a restarted peer takes nothing
    else without this run's id."""
    cfg, storage = write_run(tmp_path, [10, 20], {"peer0-mlp": [10, 20], "peer1-cnn": [10, 20]}, run_id=None)
    storage.write("run.json", json.dumps({"run_id": RUN}).encode())
    point = plan_resume(cfg, storage, RUN)
    assert point.steps == {"peer0-mlp": 20, "peer1-cnn": 20} and point.adopt == dict.fromkeys(NAMES)
    assert point.messages == [
        "the checkpoints resumed from record no run id (written before codistill recorded one): taken as this run's "
        "and stamped with its id run-a"
    ]
    apply_resume(cfg, storage, point)
    for name in NAMES:
        assert storage.read_torch(checkpoint_path(name, 20))["run_id"] == RUN
        assert "run_id" not in storage.read_torch(checkpoint_path(name, 10))  # before the point: left as it was


def test_a_directory_without_its_run_id_adopts_the_checkpoints_it_resumes_from(tmp_path):
    """A Tune trial that took another trial's state (PBT) has no run.json: it goes on from that state as its own."""
    cfg, storage = write_run(tmp_path, [10, 20], {"peer0-mlp": [10, 20], "peer1-cnn": [10, 20]}, run_id="trial-1")
    storage.delete("run.json")
    point = plan_resume(cfg, storage, "trial-2")
    assert point.steps == {"peer0-mlp": 20, "peer1-cnn": 20} and point.adopt == dict.fromkeys(NAMES, "trial-1")
    assert point.messages[-1].startswith(
        "this run trial-2 adopts the checkpoints it resumes from, written by run trial-1"
    )
    apply_resume(cfg, storage, point)
    for name in NAMES:  # re-stamped: a peer restarted before its next checkpoint takes it as this run's
        state = storage.read_torch(checkpoint_path(name, 20))
        assert state["run_id"] == "trial-2" and state["adopted_from"] == "trial-1"
        assert torch.equal(state["model"]["w"], torch.zeros(2))
    assert json.loads(storage.read("run.json") or b"") == {"run_id": "trial-2"}


# -- what --resume may change ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets, refused",
    [
        (("peers.1.model=mlp", "steps=300"), "peers.1.model: cnn -> mlp on --resume: "),
        (("peers=[mlp, cnn, mlp]",), "peers: 2 peers -> 3 peers on --resume: "),
        (("seed=1",), "seed: 0 -> 1 on --resume: "),
        (
            ("loss.alpha=0.1", "optim.lr=0.2"),
            "optim.lr: 0.05 -> 0.2 on --resume (and peers.0.optim.lr, peers.1.optim.lr, loss.alpha): ",
        ),
        (("data.batch_size=32",), "data.batch_size: 16 -> 32 on --resume: "),
        (("exchange.mode=checkpoint",), "exchange.mode: logits -> checkpoint on --resume: "),
        (("eval_every=5",), "eval_every: 10 -> 5 on --resume: "),
        (("peers.0.workers=2",), "peers.0.workers: 1 -> 2 on --resume: "),
        (("steps=999",), "steps: 1000 -> 999 on --resume: a resumed run can only be made longer"),
        (("steps=null", "epochs=50"), "steps: 1000 -> null on --resume: the run counts its length in steps"),
    ],
)
def test_resume_refuses_what_changes_what_is_trained(sets, refused):
    recorded = small_job("engine=ray", steps=1000)
    with pytest.raises(ConfigError) as e:
        check_resume_changes(recorded, small_job("engine=ray", *sets, steps=1000))
    assert str(e.value).startswith(refused) and "\n" not in str(e.value)


def test_resume_may_change_what_the_list_allows_and_says_what_changed():
    recorded = small_job("engine=ray", "optim.schedule=cosine", steps=1000)
    cfg = small_job(
        "engine=ray",
        "optim.schedule=cosine",
        "tracking.uri=sqlite:///elsewhere.db",
        "resources.num_cpus=2",
        "peers.1.resources={num_gpus: 1}",
        "exchange.timeout_s=600",
        "output.dir=/somewhere/else",
        steps=3000,
    )
    assert check_resume_changes(recorded, cfg) == [
        "steps: 1000 -> 3000 (the run goes on for longer; the learning-rate schedule (cosine) now spans the new "
        "length, so the rate changes at the resume point)",
        "peers.1.resources.num_gpus: (not set) -> 1.0 (what a peer runs on)",
        "exchange.timeout_s: 60.0 -> 600.0 (how long a peer waits for a teacher before the run fails)",
        "resources.num_cpus: 1.0 -> 2.0 (what the peers run on, how often a peer is restarted)",
        "tracking.uri: null -> sqlite:///elsewhere.db (where results are logged)",
    ]
    assert check_resume_changes(recorded, recorded) == []
    assert {"steps", "epochs", "tracking.*", "resources.*", "exchange.timeout_s"} <= set(RESUME_MAY_CHANGE)


def test_an_allowed_change_is_recorded_in_job_yaml(tmp_path):
    """The next resume goes on with the longer run, not back to the recorded length."""
    _, storage = write_run(tmp_path, [10], {"peer0-mlp": [10], "peer1-cnn": [10]})
    old = storage.read("job.yaml")
    longer = small_job("engine=ray", steps=300)
    apply_resume(longer, storage, plan_resume(longer, storage, RUN))
    assert yaml.safe_load(storage.read("job.yaml") or b"")["steps"] == 300
    assert set_aside(tmp_path)["job.yaml"] == old


def test_a_refused_resume_touches_nothing(tmp_path):
    """Through run_job, the one place both front doors reach: refused before the lock, Ray or any file."""
    write_run(tmp_path, [10, 20], {"peer0-mlp": [10, 20, 25], "peer1-cnn": [10, 20, 30]})
    before = files(tmp_path)
    with pytest.raises(ConfigError, match=r"^peers\.1\.model: cnn -> mlp on --resume: "):
        run_job(small_job("engine=ray", "peers.1.model=mlp", steps=300), tmp_path, resume=True)
    assert files(tmp_path) == before


def test_the_cli_refuses_a_resume_that_changes_the_job_in_one_line(tmp_path):
    write_run(tmp_path, [10, 20], {"peer0-mlp": [10, 20], "peer1-cnn": [10, 20]})
    before = files(tmp_path)
    sets = ["--set", "peers.1.model=mlp", "--set", "steps=300"]
    r = subprocess.run(
        [sys.executable, "-m", "codistill.run", "--resume", str(tmp_path), *sets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.splitlines()[0].startswith("error: peers.1.model: cnn -> mlp on --resume: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    assert files(tmp_path) == before
