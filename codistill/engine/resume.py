"""Where a resumed run starts again, proven from the run directory (which is untrusted data).

Rounds are recorded in `progress.json` as the driver assembles them (before anyone is told); every peer writes
a training checkpoint at the end of each of its rounds and keeps those of the last rounds the driver assembled.
A checkpoint holds the peer's state and what it was: its step, the round it ended, the peer's restarts and total
steps, and the id of the run that wrote it.

`plan_resume` finds the newest round every peer can return to:
- with a readable progress.json, it walks back from the newest recorded round to one whose checkpoints are all
  usable (each one that is not is a warning line, then the round before) and keeps the records up to it;
- with a damaged one (missing, empty, not JSON, not a list of rounds of this job's peers), it rebuilds the point
  from the checkpoints themselves: the newest round end at which every peer has a usable checkpoint. The records
  of the rounds up to it were only in progress.json: they are lost, and it says so (the summary's history starts
  after the resume point);
- with no such round, it says so and the run starts over from step 0.
A checkpoint is usable when it loads (`weights_only`), is a training checkpoint of the step its name says, and
was written by this run (the run id in `run.json`). One that records no run id was written before codistill
recorded them: a resume takes those it resumes from as this run's (a line says so). A run directory whose run.json
records no run id (a Tune trial that took another trial's state; a damaged directory) has nothing to check
against: the checkpoints it resumes from are adopted. Either way they are stamped with this run's id, so that a
restarted peer, which takes nothing but this run's checkpoints, can go on from them.

`apply_resume` removes nothing: checkpoints past the resume point (a restarted peer must not jump ahead of the
driver), a damaged or superseded progress.json and a job.yaml that the resume changed are moved to
`set-aside/resume-<time>/` under their own relative paths, with a line saying what went where.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from codistill.config import RunConfig, to_dict
from codistill.config.resume_changes import changed_fields, recorded_job
from codistill.rundir import recorded_run_id
from codistill.storage import CHECKPOINTS, Storage, checkpoint_path, sharded_checkpoint_dir

__all__ = [
    "SET_ASIDE",
    "ForeignCheckpointError",
    "ResumePoint",
    "apply_resume",
    "foreign_checkpoint",
    "plan_resume",
    "recorded_run_id",
]

SET_ASIDE = "set-aside"
"""Where a resume moves what it does not use (never listed by `Storage.checkpoint_steps`)."""

TRAINING_STATE_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "step",
    "board",
    "busy_s",
    "exchange",
    "round_index",
    "round_losses",
    "lr",
)
"""What a peer's training checkpoint must hold to be loaded (PeerActor.load_state); a sharded peer's (strategy fsdp)
holds its model and optimizer in the shards beside it (`sharded_checkpoint_dir`) instead."""
SHARDED_KEYS = ("model", "optimizer")


class ForeignCheckpointError(ValueError):
    """A training checkpoint written by another run."""


def foreign_checkpoint(state: Mapping[str, Any], run_id: str | None, *, unstamped_ok: bool = False) -> str | None:
    """Why training checkpoint `state` is not one of run `run_id` (one line naming both runs), else None. One that
    records no run id (written before codistill recorded them) is refused unless `unstamped_ok` (--resume, which
    takes those it resumes from as this run's and stamps them)."""
    theirs = state.get("run_id")
    if run_id is None or theirs == run_id:
        return None
    if theirs is None:
        return None if unstamped_ok else f"it records no run id, so it cannot be proven this run's ({run_id})"
    return f"written by run {theirs}, not by this run {run_id}"


@dataclass
class ResumePoint:
    steps: dict[str, int] | None  # peer name -> the step it starts from; None = start over
    prior_rounds: list[dict]  # the rounds kept from the earlier driver(s)
    messages: list[str] = field(default_factory=list)  # what the user should know, one line each
    restarts: dict[str, int] = field(default_factory=dict)  # restarts of each peer so far
    first_round: int = 0  # the first round this driver runs: the ones before it are done
    run_id: str | None = None  # the resuming run
    adopt: dict[str, str | None] = field(default_factory=dict)  # peer -> the run id its resume checkpoint records
    progress_damaged: bool = False  # progress.json cannot be read
    progress_kept: bool = False  # prior_rounds are progress.json's (else it is set aside: its rounds are not resumed)
    run_json_missing: bool = False  # run.json records no run id: write this run's


@dataclass(frozen=True)
class _Checked:
    why: str | None  # None: usable
    run_id: str | None = None  # the run that wrote it (None: not recorded)
    round_index: int = -1
    restarts: int = 0
    round_end: bool = False


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _check(storage: Storage, cfg: RunConfig, name: str, step: int, run_id: str | None) -> _Checked:
    """Whether peer `name`'s checkpoint at `step` can be resumed from by run `run_id` (None: any run)."""
    try:
        state = storage.read_torch(checkpoint_path(name, step))
    except Exception as e:  # a truncated or corrupt file fails inside torch/zipfile in many ways
        return _Checked(_one_line(e))
    if state is None:
        return _Checked("missing")
    if not isinstance(state, dict):
        return _Checked("not a codistill training checkpoint")
    sharded = state.get("sharded") is True
    if any(k not in state for k in TRAINING_STATE_KEYS if not (sharded and k in SHARDED_KEYS)):
        return _Checked("not a codistill training checkpoint")
    if sharded and ".metadata" not in storage.files(sharded_checkpoint_dir(name, step)):
        return _Checked(f"its shards are missing ({sharded_checkpoint_dir(name, step)}/.metadata)")
    try:
        held, round_index, restarts = int(state["step"]), int(state["round_index"]), int(state.get("restarts", 0))
        total = None if state.get("total_steps") is None else int(state["total_steps"])
    except (TypeError, ValueError):
        return _Checked("not a codistill training checkpoint")
    if held != step:
        return _Checked(f"it holds step {held}, not the step its name says")
    if (why := foreign_checkpoint(state, run_id, unstamped_ok=True)) is not None:
        return _Checked(why)
    round_end = step % cfg.eval_every == 0 or step == total
    recorded = state.get("run_id")
    return _Checked(None, None if recorded is None else str(recorded), round_index, restarts, round_end)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_progress(storage: Storage, names: list[str]) -> tuple[list[dict], str | None]:
    """progress.json's rounds, or ([], what is wrong with it)."""
    data = storage.read("progress.json")
    if data is None:
        return [], "is missing"
    if not data.strip():
        return [], "is empty"
    try:
        doc = json.loads(data)
    except ValueError as e:  # also UnicodeDecodeError
        return [], f"is not valid JSON ({_one_line(e)})"
    rounds = doc.get("rounds") if isinstance(doc, dict) else None
    if not isinstance(rounds, list):
        return [], "holds no list of rounds"
    for j, record in enumerate(rounds):
        if not isinstance(record, dict) or not _is_int(record.get("round")) or not _is_int(record.get("step")):
            return [], f"has a record {j} that is not a round"
        if record["round"] != rounds[0]["round"] + j:
            return [], f"has round {record['round']} where round {rounds[0]['round'] + j} belongs"
        peers = record["peers"] if isinstance(record.get("peers"), dict) else {}
        lacking = [n for n in names if not isinstance(peers.get(n), dict) or not _is_int(peers[n].get("step"))]
        if lacking:
            return [], f"has round {record['round']} without a step of {lacking[0]}"
    return rounds, None


def plan_resume(cfg: RunConfig, storage: Storage, run_id: str | None) -> ResumePoint:
    """Where run `run_id` goes on in `storage` (see module docstring); reads, changes nothing."""
    names = [cfg.peer_name(i) for i in range(cfg.num_peers)]
    messages: list[str] = []
    own = recorded_run_id(storage)
    checked: dict[tuple[str, int], _Checked] = {}

    def check(name: str, step: int) -> _Checked:
        if (name, step) not in checked:
            checked[name, step] = _check(storage, cfg, name, step, own)
        return checked[name, step]

    rounds, damage = _read_progress(storage, names)
    point: ResumePoint | None = None
    if damage is None:
        point = _from_progress(rounds, names, check, messages)
        if point is None and rounds and rounds[0]["round"] > 0:  # the records before were lost at an earlier resume
            point = _from_checkpoints(storage, names, check, messages, below=rounds[0]["round"])
    else:
        messages.append(f"progress.json {damage}: rebuilding the resume point from the checkpoints")
        point = _from_checkpoints(storage, names, check, messages)
    if point is None:
        messages.append("no round that every peer can return to (no usable checkpoints): starting over from step 0")
        point = ResumePoint(None, [], messages)
    point.run_id, point.progress_damaged, point.run_json_missing = run_id, damage is not None, own is None
    point.progress_kept = bool(point.prior_rounds)
    if point.steps is not None:
        used = {name: check(name, point.steps[name]) for name in names}
        point.adopt = {n: c.run_id for n, c in used.items() if run_id is not None and c.run_id != run_id}
        if None in point.adopt.values():
            messages.append(
                "the checkpoints resumed from record no run id (written before codistill recorded one): "
                f"taken as this run's and stamped with its id {run_id}"
            )
        others = sorted({r for r in point.adopt.values() if r is not None})
        if others:
            why = "run.json records no run id" if own is None else f"run.json names run {own}"
            messages.append(
                f"this run {run_id} adopts the checkpoints it resumes from, written by run {', '.join(others)} "
                f"({why}: a run directory copied from another run, as a Tune trial that takes another trial's "
                f"state, or a damaged one)"
            )
    return point


def _from_progress(
    rounds: list[dict], names: list[str], check: Callable[[str, int], _Checked], messages: list[str]
) -> ResumePoint | None:
    for index in range(len(rounds) - 1, -1, -1):
        record = rounds[index]
        steps = {name: int(record["peers"][name]["step"]) for name in names}
        broken = [(name, why) for name in names if (why := check(name, steps[name]).why) is not None]
        for k, (name, why) in enumerate(broken):
            last = "; trying the round before" if k == len(broken) - 1 else ""
            messages.append(f"warning: the checkpoint of {name} at step {steps[name]} cannot be used ({why}){last}")
        if broken:
            continue
        recorded = {name: record["peers"][name].get("restarts") for name in names}
        restarts = {name: r if _is_int(r) else check(name, steps[name]).restarts for name, r in recorded.items()}
        return ResumePoint(steps, rounds[: index + 1], messages, restarts, first_round=record["round"] + 1)
    return None


def _from_checkpoints(
    storage: Storage,
    names: list[str],
    check: Callable[[str, int], _Checked],
    messages: list[str],
    below: int | None = None,
) -> ResumePoint | None:
    """The newest round (below round `below`) at which every peer has a usable round-end checkpoint."""
    ends: dict[str, dict[int, int]] = {}  # peer -> round index -> the step its round ended at
    for name in names:
        ends[name] = {}
        for step in reversed(storage.checkpoint_steps(name)):
            c = check(name, step)
            if c.why is not None:
                messages.append(f"warning: the checkpoint of {name} at step {step} cannot be used ({c.why})")
            elif c.round_end and (below is None or c.round_index < below):
                ends[name].setdefault(c.round_index, step)
    common = set.intersection(*(set(e) for e in ends.values())) if ends else set()
    if not common:
        return None
    r = max(common)
    steps = {name: ends[name][r] for name in names}
    restarts = {name: check(name, steps[name]).restarts for name in names}
    messages.append(
        f"resuming after round {r} (step {max(steps.values())}), the newest round end at which every peer has a "
        f"usable checkpoint; the records of the rounds up to it were only in progress.json and are lost: "
        f"the history in summary.json starts at round {r + 1}"
    )
    return ResumePoint(steps, [], messages, restarts, first_round=r + 1)


def apply_resume(cfg: RunConfig, storage: Storage, point: ResumePoint) -> None:
    """Make the run directory what `point` resumes from; what it does not use is set aside, never deleted, and
    each move is a line of `point.messages`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = f"{SET_ASIDE}/resume-{stamp}"
    for k in range(2, 1000):  # two resumes within a second: never into the same folder
        if not storage.exists(folder):
            break
        folder = f"{SET_ASIDE}/resume-{stamp}-{k}"
    where = f"{storage.uri.rstrip('/')}/{folder}"
    for i in range(cfg.num_peers):
        name = cfg.peer_name(i)
        keep_until = -1 if point.steps is None else point.steps[name]
        past = [step for step in storage.checkpoint_steps(name) if step > keep_until]
        for step in past:
            storage.move(checkpoint_path(name, step), f"{folder}/{checkpoint_path(name, step)}")
            if storage.exists(shards := sharded_checkpoint_dir(name, step)):
                storage.move(shards, f"{folder}/{shards}")
        if past:
            why = "nothing is resumed" if point.steps is None else "past the resume point"
            point.messages.append(
                f"set aside the checkpoints of {name} at step{'s' if len(past) > 1 else ''} "
                f"{', '.join(map(str, past))} ({why}) in {where}/{CHECKPOINTS}/{name}/"
            )
    if not point.progress_kept and storage.read("progress.json") is not None:
        storage.move("progress.json", f"{folder}/progress.json")
        what = "the damaged progress.json" if point.progress_damaged else "progress.json (its rounds are not resumed)"
        point.messages.append(f"set aside {what} as {where}/progress.json")
    if point.steps is None:
        storage.write("progress.json", json.dumps({"rounds": []}).encode())
    for name, other in point.adopt.items():  # stamped: a restarted peer takes nothing but this run's checkpoints
        assert point.steps is not None, "only a checkpoint resumed from is adopted"
        rel = checkpoint_path(name, point.steps[name])
        state = storage.read_torch(rel)
        own: dict[str, Any] = {"run_id": point.run_id, **({"adopted_from": other} if other is not None else {})}
        storage.write_torch(rel, {**state, **own})
    if point.run_json_missing and point.run_id is not None:
        if storage.read("run.json") is not None:
            storage.move("run.json", f"{folder}/run.json")
        storage.write("run.json", json.dumps({"run_id": point.run_id}).encode())
    _record_job(cfg, storage, folder, where, point.messages)


def _record_job(cfg: RunConfig, storage: Storage, folder: str, where: str, messages: list[str]) -> None:
    """job.yaml says what the run now trains: a resume that changed what it may (more steps, tracking, ...)
    rewrites it, so the next resume goes on with the same; the one before is set aside."""
    text = storage.read("job.yaml")
    if text is None:
        return
    changes = changed_fields(recorded_job(text, "job.yaml"), cfg)
    if not set(changes) - {"output.dir"}:
        return
    storage.move("job.yaml", f"{folder}/job.yaml")
    storage.write("job.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    messages.append(f"job.yaml now records this resume's job (the one before is {where}/job.yaml)")
