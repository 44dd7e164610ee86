"""What a run will be, decided once, before anything is trained: `prepare_run(job, overrides, resume) -> RunPlan`.

Both front doors call it: `python -m codistill.run` (`--config`, `--set`, `--output`, `--resume`) and
`codistill.train(job, resume=..., **overrides)`; Tune trials and experiment arms reach it through
`run_job`. It reads the job (a job file, a bundled job's name, a raw mapping or a RunConfig; the run
directory's job.yaml for a resume), applies the overrides (config/overrides.py), validates the job
once, names the run and resolves its directory. A resume is checked here too: the directory must hold
a run codistill wrote that has not finished, and the overrides may change only what
config/resume_changes.py allows. Where in its checkpoints the run goes on (the resume step) is the
engine's to find, under the run directory's lock (engine/resume.py).

No torch, ray or mlflow: a mistake in a job costs nothing to find.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from codistill.config import RunConfig, build, bundled_jobs, job_path, read_yaml, to_dict
from codistill.config.overrides import Overrides, apply
from codistill.config.resume_changes import check_resume_changes, recorded_job
from codistill.errors import CodistillError, ConfigError
from codistill.locations import new_run_id, resolve_run_dir
from codistill.rundir import recorded_run_id
from codistill.storage import Storage

__all__ = ["RunFinishedError", "RunPlan", "prepare_run"]

Job = str | Path | Mapping[str, Any] | RunConfig | None


class RunFinishedError(CodistillError, RuntimeError):
    """--resume of a run that already finished: nothing to do, and nothing is changed."""


@dataclass(frozen=True, slots=True)
class RunPlan:
    """A validated job, its run id and its directory; `resume`: continue the run already there."""

    config: RunConfig
    run_id: str
    run_dir: str
    resume: bool = False
    changes: tuple[str, ...] = ()
    """A resume's accepted changes to the recorded job, one line each (`steps: 300 -> 600`)."""


def _raw_job(job: Job, field: str) -> dict:
    if isinstance(job, RunConfig):
        return to_dict(job)
    if isinstance(job, Mapping):
        return dict(job)
    if field == "job" and job is not None and str(job) not in bundled_jobs() and not Path(str(job)).exists():
        raise ConfigError("job", str(job), f"a job file or a bundled job: {' | '.join(bundled_jobs())}")
    return read_yaml(job_path(job))


def _recorded(run_dir: str) -> tuple[Storage, dict]:
    storage = Storage(run_dir)
    text = storage.read("job.yaml")
    if text is None:
        raise ConfigError("--resume", run_dir, "a run directory codistill wrote (it has job.yaml)")
    if storage.read("summary.json") is not None:
        raise RunFinishedError(f"{run_dir} finished already (its summary.json is there): nothing to resume")
    raw = yaml.safe_load(text)
    return storage, raw if isinstance(raw, dict) else {}


def prepare_run(
    job: Job = None,
    overrides: Overrides = (),
    resume: bool = False,
    *,
    run_dir: str | None = None,
    run_name: str | None = None,
    job_field: str = "--config",
) -> RunPlan:
    """The plan of one run (module docstring). With `resume`, `job` is the run directory to continue, or the job
    to continue it with (a RunConfig or mapping: a Tune trial's settings) and `run_dir` the directory.

    run_dir: the run directory (default: `output.dir` of the job, else a new one under the storage root);
    run_name: the run id of a new run (default `<name>-<time>-<random>`); job_field: how errors name `job`.
    A RunConfig without overrides is used as it is: it was validated when it was made."""
    pairs = _pairs(overrides)
    given = isinstance(job, (RunConfig, Mapping))
    storage: Storage | None = None
    recorded: dict = {}
    if resume:
        run_dir = str(run_dir if given and run_dir is not None else job)
        storage, recorded = _recorded(run_dir)
        if not given:  # the run directory's own job, kept where it is
            pairs.append(("output.dir", storage.uri))
    if isinstance(job, RunConfig) and not pairs:
        cfg = job
    else:
        cfg = build(apply(recorded if resume and not given else _raw_job(job, job_field), pairs))
    changes: list[str] = []
    if storage is not None:
        changes = check_resume_changes(recorded_job(storage.read("job.yaml") or b"", f"{run_dir}/job.yaml"), cfg)
    # a resumed run keeps its id (a damaged run.json: a new one)
    run_id = (recorded_run_id(storage) if storage is not None else None) or run_name or new_run_id(cfg.name)
    where = str(run_dir) if run_dir else resolve_run_dir(cfg.output.dir, run_id)
    return RunPlan(cfg, run_id, where, resume, tuple(changes))


def _pairs(overrides: Overrides) -> list[tuple[str, Any]]:
    return list(overrides.items() if isinstance(overrides, Mapping) else overrides)
