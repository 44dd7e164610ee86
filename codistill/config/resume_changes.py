"""What `--resume` may change in a run's job, and the check that refuses the rest (before anything is touched).

A resumed run goes on from its peers' checkpoints: everything that decides what is trained (the peers, their
models, seeds and optimisers, the data, the loss, the exchange, the rounds) must be what the run directory's
job.yaml recorded, or the checkpoints would be continued as another job (peers renamed start over, a
different model fails to load, a changed loss silently mixes two jobs). Only what `RESUME_MAY_CHANGE` lists
may differ; `check_resume_changes` refuses anything else in one line naming the field and its old and new
value. This module imports neither torch, ray nor mlflow.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any

import yaml

from codistill.config.parse import build, flatten, to_dict
from codistill.config.schema import RunConfig
from codistill.errors import CodistillError, ConfigError

__all__ = ["RESUME_MAY_CHANGE", "changed_fields", "check_resume_changes", "recorded_job"]

RESUME_MAY_CHANGE: dict[str, str] = {
    "steps": "a longer run (more steps only)",
    "epochs": "a longer run (more epochs only)",
    "output.dir": "where the run directory is (--resume names it)",
    "output.checkpoint_every": "how often a peer also saves a checkpoint within a round",
    "tracking.*": "where results are logged",
    "resources.*": "what the peers run on, how often a peer is restarted",
    "peers.*.resources.*": "what a peer runs on",
    "exchange.timeout_s": "how long a peer waits for a teacher before the run fails",
    "exchange.inline_max_bytes": "how logit shards travel (inline or by reference), not what they hold",
    "data.download": "whether missing data files may be fetched",
}
"""Dotted fields (fnmatch patterns over `codistill.config.flatten` keys) that `--resume` may change, and why
each is safe: none changes what is trained. Fewer steps (or epochs) than the job recorded are refused: the run
may already be past the new end, and its learning-rate schedule was laid out for the recorded length."""

_ABSENT = object()


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(not set)"
    return value if isinstance(value, str) else json.dumps(value)


def recorded_job(text: bytes, where: str) -> RunConfig:
    """The job a run directory's job.yaml records (`where`: its path, for the error)."""
    try:
        return build(yaml.safe_load(text))
    except (yaml.YAMLError, CodistillError, ValueError, TypeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError("--resume", message=f"{where} is not a job codistill can read ({message})") from None


def changed_fields(recorded: RunConfig, cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (recorded value, new value) for every field that differs, in the order of the new job's
    fields. A field on one side only counts as null on the other (a peer's `resources: null` and its
    `resources: {num_cpus: 2}` differ in `peers.0.resources.num_cpus` alone)."""
    old, new = flatten(to_dict(recorded)), flatten(to_dict(cfg))
    keys = list(new) + [k for k in old if k not in new]
    return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys if old.get(k) != new.get(k)}


def _may_change(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUME_MAY_CHANGE)


def check_resume_changes(recorded: RunConfig, cfg: RunConfig) -> list[str]:
    """Refuse (`ConfigError`, one line) a resumed job `cfg` that changes what the recorded job trains; return one
    line per change it may make (`output.dir` says nothing)."""
    if recorded.num_peers != cfg.num_peers:
        raise _refused("peers", f"{recorded.num_peers} peers", f"{cfg.num_peers} peers")
    changes = changed_fields(recorded, cfg)
    refused = [key for key in changes if not _may_change(key)]
    if refused:
        old, new = changes[refused[0]]
        more = f" (and {', '.join(refused[1:4])}{', ...' if len(refused) > 4 else ''})" if len(refused) > 1 else ""
        raise _refused(refused[0], _show(old), _show(new), more)
    notes = []
    for key in ("steps", "epochs"):
        if key not in changes:
            continue
        old, new = changes[key]
        if old is None or new is None:  # steps <-> epochs: not comparable without the data
            raise ConfigError(
                key,
                message=f"{_show(old)} -> {_show(new)} on --resume: the run counts its length in "
                f"{'steps' if recorded.steps is not None else 'epochs'}; give more of those instead",
            )
        if new < old:
            raise ConfigError(
                key,
                message=f"{_show(old)} -> {_show(new)} on --resume: a resumed run can only be made longer (it may be "
                f"past the new end already, and its schedule was laid out for {_show(old)}); start a new run instead",
            )
        schedules = {recorded.peer_optim(i).schedule for i in range(recorded.num_peers)} - {"constant"}
        notes.append(
            f"{key}: {_show(old)} -> {_show(new)} (the run goes on for longer"
            + (
                f"; the learning-rate schedule ({', '.join(sorted(schedules))}) now spans the new length, so the "
                f"rate changes at the resume point)"
                if schedules
                else ")"
            )
        )
    notes += [
        f"{key}: {_show(old)} -> {_show(new)} ({_why(key)})"
        for key, (old, new) in changes.items()
        if key not in ("steps", "epochs", "output.dir")
    ]
    return notes


def _why(key: str) -> str:
    return next(why for pattern, why in RESUME_MAY_CHANGE.items() if fnmatch.fnmatchcase(key, pattern))


def _refused(key: str, old: str, new: str, more: str = "") -> ConfigError:
    shown = [p for p in RESUME_MAY_CHANGE if p not in ("steps", "epochs", "output.dir")]
    return ConfigError(
        key,
        message=f"{old} -> {new} on --resume{more}: a resumed run goes on with the job its checkpoints were "
        f"trained by, and may change only steps or epochs (more), {', '.join(shown)}; start a new run for another job",
    )
