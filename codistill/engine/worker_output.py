"""What the driver shows of its Ray workers: a remote failure in one line, and the workers' output in the run's
log file instead of the console."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["one_line", "worker_output_to_run_log"]

log = logging.getLogger("codistill")  # the run's log file (full tracebacks) when run through codistill.api


def one_line(e: BaseException) -> str:
    """What a user needs of a remote failure: the cause's type and message, first line only."""
    cause = getattr(e, "cause", None)
    if cause is not None:
        text = str(cause).strip().splitlines()
        return f"{text[0] if text else type(cause).__name__}"
    text = [line for line in str(e).strip().splitlines() if line.strip()]
    return text[-1][:300] if text else type(e).__name__


@contextlib.contextmanager
def worker_output_to_run_log() -> Iterator[None]:
    """While a run that has a log file lasts (codistill.api), what its Ray workers print goes to that file and not
    to the console: Ray forwards every worker's stdout and stderr to the driver, and a killed rank of a worker
    group alone makes ~150 lines of gloo and Ray Train tracebacks there (the console has the run's one event line).
    Ray's cluster notices (autoscaler) still print. Ray has no public hook for this: its driver prints through a
    dispatcher whose printing handler is swapped here for the run's length and put back after."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its output stays where Ray puts it
        yield
        return
    printer = dict(getattr(dispatcher, "handlers", [])).get("ray_print_logs")  # None: log_to_driver=False
    if printer is None or not log.handlers:
        yield
        return
    workers = log.getChild("workers")

    def to_run_log(batch: dict) -> None:
        if batch.get("pid") == "autoscaler":
            printer(batch)
            return
        who = batch.get("actor_name") or batch.get("task_name") or ""
        prefix = f"({who} pid={batch.get('pid')}, ip={batch.get('ip')}) "  # as Ray prints it, with the node
        for line in batch.get("lines", []):
            workers.info("%s%s", prefix, line)

    dispatcher.add_handler("codistill_run_log", to_run_log)
    dispatcher.remove_handler("ray_print_logs")
    try:
        yield
    finally:
        dispatcher.add_handler("ray_print_logs", printer)
        dispatcher.remove_handler("codistill_run_log")
