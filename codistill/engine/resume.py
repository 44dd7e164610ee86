"""Where a resumed run starts again: the newest round every peer can return to.

Rounds are recorded in `progress.json` as the driver assembles them (before anyone is told); every
peer writes a training checkpoint at the end of each of its rounds and keeps those of the last
rounds the driver assembled. A resumed driver walks back from the newest recorded round to one
whose checkpoints all load (a corrupt or missing one is a warning line and the round before is
tried), drops later checkpoints (a restarted peer must not jump ahead of the driver) and starts
there; if no round qualifies it says so and starts over from step 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from codistill.config import RunConfig
from codistill.storage import Storage, checkpoint_path

__all__ = ["ResumePoint", "plan_resume", "apply_resume"]


@dataclass
class ResumePoint:
    steps: dict[str, int] | None  # peer name -> the step it starts from; None = start over
    prior_rounds: list[dict]  # the rounds kept from the earlier driver(s)
    messages: list[str] = field(default_factory=list)  # what the user should know, one line each
    restarts: dict[str, int] = field(default_factory=dict)  # restarts of each peer so far


def _loads(storage: Storage, rel: str) -> str | None:
    """None if the checkpoint loads, else why not."""
    try:
        state = storage.read_torch(rel)
    except Exception as e:  # a truncated or corrupt file fails inside torch/zipfile in many ways
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    if state is None:
        return "missing"
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        return "not a codistill training checkpoint"
    return None


def plan_resume(cfg: RunConfig, storage: Storage) -> ResumePoint:
    names = [cfg.peer_name(i) for i in range(cfg.num_peers)]
    rounds = json.loads((storage.read("progress.json") or b"{}").decode() or "{}").get("rounds", [])
    messages: list[str] = []
    for index in range(len(rounds) - 1, -1, -1):
        record = rounds[index]
        try:
            steps = {name: int(record["peers"][name]["step"]) for name in names}
        except (KeyError, TypeError, ValueError):
            messages.append(f"warning: round {record.get('round', index)} in progress.json lacks a peer of this job")
            continue
        broken = {name: why for name in names if (why := _loads(storage, checkpoint_path(name, steps[name])))}
        if broken:
            name, why = next(iter(broken.items()))
            messages.append(
                f"warning: the checkpoint of {name} at step {steps[name]} cannot be used ({why}); "
                f"trying the round before"
            )
            continue
        restarts = {name: int(record["peers"][name].get("restarts", 0)) for name in names}
        return ResumePoint(steps, rounds[: index + 1], messages, restarts)
    messages.append("no round that every peer can return to (no usable checkpoints): starting over from step 0")
    return ResumePoint(None, [], messages)


def apply_resume(cfg: RunConfig, storage: Storage, point: ResumePoint) -> None:
    """Remove checkpoints past the resume point (all of them when starting over)."""
    for i in range(cfg.num_peers):
        name = cfg.peer_name(i)
        keep_until = -1 if point.steps is None else point.steps[name]
        for step in storage.checkpoint_steps(name):
            if step > keep_until:
                storage.delete(checkpoint_path(name, step))
    if point.steps is None:
        storage.write("progress.json", json.dumps({"rounds": []}).encode())
