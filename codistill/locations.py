"""Where results go, so that they survive the job that made them.

Under `ray job submit --working-dir .` the driver runs inside Ray's unpacked job package, which Ray
deletes after the job (and which a second node on the same host may unpack over). So nothing is ever
written relative to it: the default run directory and the default MLflow store live under a durable
storage root, `$CODISTILL_STORAGE`, else `~/codistill` on the node running the driver (the head node
under `ray job submit`), and a relative path given inside a job package is refused in one line.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime
from pathlib import Path

from codistill.errors import ConfigError

__all__ = [
    "storage_root",
    "in_job_package",
    "leave_a_deleted_working_directory",
    "new_run_id",
    "resolve_run_dir",
    "under",
    "resolve_tracking_uri",
    "artifact_location",
]


def storage_root() -> Path:
    return Path(os.environ.get("CODISTILL_STORAGE") or "~/codistill").expanduser().absolute()


def in_job_package(path: Path | None = None) -> bool:
    """Whether `path` (default: the working directory) lies in a Ray job's unpacked package."""
    parts = (path or Path.cwd()).absolute().parts
    return any(p.startswith("_ray_pkg_") for p in parts) or "runtime_resources" in parts


def leave_a_deleted_working_directory() -> None:
    """Under `ray job submit --working-dir`, Ray may delete or unpack again the job's package while the driver
    runs in it; then `os.getcwd()` fails, and MLflow calls it when it logs a model. Move to the storage root."""
    try:
        os.getcwd()
    except FileNotFoundError:
        root = storage_root()
        root.mkdir(parents=True, exist_ok=True)
        os.chdir(root)


def new_run_id(name: str) -> str:
    """`<job>-<YYYYmmdd-HHMMSS>-<4 hex>`: the run directory, the MLflow run and the actor names share it."""
    return f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def _refuse_relative_in_package(field: str, value: str, what: str) -> None:
    if in_job_package():
        raise ConfigError(
            field,
            message=f"{value!r} is relative, and this driver runs inside Ray's job package {Path.cwd()}, which Ray "
            f"deletes after the job; pass an absolute path or a URI for {what}, or set CODISTILL_STORAGE",
        )


def under(root: Path, name: str, field: str) -> Path:
    """`root / name`, refused (ConfigError naming `field`) unless it lies inside `root`: `name` came from a
    job or a command line and is made into a directory."""
    path = (root / name).absolute()
    if os.path.normpath(path).startswith(os.path.normpath(root.absolute()) + os.sep) and path.name == name:
        return path
    raise ConfigError(field, name, f"a name that stays inside {root} (one path component, no '..')")


def resolve_run_dir(given: str | None, run_id: str) -> str:
    """The run directory: `given` (a pyarrow.fs URI, or a path made absolute), else under the storage root."""
    if given is None:
        return str(under(storage_root() / "runs", run_id, "name"))
    if "://" in given:
        return given
    if not Path(given).expanduser().is_absolute():
        _refuse_relative_in_package("--output", given, "the run directory")
    return str(Path(given).expanduser().absolute())


def resolve_tracking_uri(uri: str | None) -> str:
    """`tracking.uri`, else MLFLOW_TRACKING_URI, else a SQLite store under the storage root; a SQLite file
    or local path made absolute (Tune trials and Ray workers change directory)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{storage_root() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        _refuse_relative_in_package("tracking.uri", uri, "the MLflow store")
        return "sqlite:///" + os.path.abspath(rel)
    if "://" not in uri:
        _refuse_relative_in_package("tracking.uri", uri, "the MLflow store")
        return os.path.abspath(uri)
    return uri


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where an experiment this project creates keeps its artifacts (summaries, weights, logged models).

    For a SQLite store MLflow's default is `./mlruns` in the working directory: inside Ray's job package
    under `ray job submit --working-dir` (deleted with the job), and a different place for each directory a
    user starts from. Keep them beside the database instead, in `mlartifacts/` (the folder `mlflow server`
    uses). Other stores choose for themselves: None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///") :])
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return (db.parent / "mlartifacts" / safe).as_uri()
