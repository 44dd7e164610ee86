"""Ctrl-C during a sweep: Tune stops, and the sweep knows it was stopped (codistill.sweeps.tune)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["stop_signals"]


class _NoRestoreHint(logging.Filter):
    """Drops Tune's "Resume experiment with: Tuner.restore(...)": a sweep is resumed with --resume."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """The signals that stopped the sweep (empty: it ran to its end). On Ctrl-C Tune saves its state, stops the
    trials and returns from fit() as if the sweep had finished; so that the sweep knows, SIGINT comes here (Tune's
    own SIGINT handler is kept off) and is passed to the handler Tune keeps for SIGUSR1, which stops it the same
    way. A second Ctrl-C stops at once, as in Tune. Outside the main thread nothing changes (Python allows
    signal handlers there only)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        yield caught
        return

    def on_sigint(signum: int, frame: Any) -> None:
        caught.append(signum)
        tune_stop = signal.getsignal(signal.SIGUSR1)  # Tune's, while fit() runs
        if len(caught) > 1 or not callable(tune_stop):
            raise KeyboardInterrupt
        tune_stop(signum, frame)

    before, env = signal.signal(signal.SIGINT, on_sigint), os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read by each fit()
    hint = _NoRestoreHint()
    logging.getLogger("ray.tune.tune").addFilter(hint)
    try:
        yield caught
    finally:
        logging.getLogger("ray.tune.tune").removeFilter(hint)
        signal.signal(signal.SIGINT, before)
        if env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env
