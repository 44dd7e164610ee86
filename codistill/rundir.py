"""One run per directory: a run holds a lock file in its run directory for as long as it runs.

The lock names its owner (host, pid, start time). A second run into the same directory is refused
in one line, and so is a new run into a directory that already holds a run (its job.yaml; use
--resume to continue it). A lock left by a process that is gone from this host is taken over, with a line
saying so; a lock from another host is only reported (we cannot tell whether it still runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from types import TracebackType

from codistill.errors import CodistillError, ConfigError
from codistill.storage import Storage

__all__ = ["LOCK_FILE", "RunDirBusyError", "RunLock"]

LOCK_FILE = ".codistill.lock"


class RunDirBusyError(CodistillError, RuntimeError):
    """Another run holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`with RunLock(storage, resume=...) as lock:` holds the run directory; `lock.notes` says what
    was found (a stale lock taken over)."""

    def __init__(self, storage: Storage, *, resume: bool):
        self.storage = storage
        self.resume = resume
        self.notes: list[str] = []
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._held = False

    def acquire(self) -> RunLock:
        uri = self.storage.uri
        try:
            existing = self.storage.read(LOCK_FILE)
            if existing is not None:
                self._take_over_if_stale(existing)
            if not self.resume and self.storage.read("job.yaml") is not None:  # a run's files, not a failed start
                others = [e for e in self.storage.entries() if e != LOCK_FILE]
                if others:
                    shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
                    raise ConfigError(
                        "--output",
                        message=f"{uri} already holds a run ({shown}); continue it with --resume {uri}, "
                        f"or choose an empty or new directory",
                    )
            if not self.storage.create_exclusive(LOCK_FILE, json.dumps(self.owner).encode()):
                raise RunDirBusyError(
                    f"{uri} is in use by another run that started just now; try again or choose another --output"
                )
        except OSError as e:  # pyarrow.fs raises OSError subclasses for permissions, missing buckets, ...
            raise ConfigError("--output", message=f"cannot write the run directory {uri}: {e}") from None
        self._held = True
        return self

    def _take_over_if_stale(self, existing: bytes) -> None:
        try:
            owner = json.loads(existing)
            host, pid = owner["host"], int(owner["pid"])
        except (ValueError, KeyError, TypeError):
            owner, host, pid = {}, "?", -1
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
        if host == self.owner["host"] and pid > 0 and not _alive(pid):
            self.storage.delete(LOCK_FILE)
            self.notes.append(f"took over the lock of {self.storage.uri} left by pid {pid} (gone) since {since}")
            return
        raise RunDirBusyError(
            f"{self.storage.uri} is in use by the run of pid {pid} on {host} since {since}; wait for it to end, "
            f"choose another --output, or delete {self.storage.uri}/{LOCK_FILE} if that run is gone"
        )

    def release(self) -> None:
        if self._held:
            self._held = False
            with contextlib.suppress(OSError):
                self.storage.delete(LOCK_FILE)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
