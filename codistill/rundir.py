"""One run per directory: a run holds a lock in its run directory for as long as it runs.

The lock file names its owner (host, pid, start time). On a local disk the lock itself is an
exclusive `flock` on that file, which the kernel drops when the owner dies, so two runs racing for a
directory (two `--resume`s of one crashed run, say) can never both win, and a stale lock is taken
over without deleting anything. On object storage (no locks there) the file's existence is the lock.

A second run into the same directory is refused in one line; so is a new run into a directory that
holds anything (another run's files, or unrelated ones: `--resume` continues a run). A lock left by
a process that is gone from this host is taken over, with a line saying so; a lock from another host
is only reported (we cannot tell whether it still runs).
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

__all__ = ["LOCK_FILE", "RunDirBusyError", "RunLock", "recorded_run_id"]

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
    was found (a stale lock taken over); `lock.created` whether this run made the directory."""

    def __init__(self, storage: Storage, *, resume: bool):
        self.storage = storage
        self.resume = resume
        self.notes: list[str] = []
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.created = False
        self._held = False
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        uri = self.storage.uri
        try:
            self.created = not self._exists()
            if self.storage.is_local():
                self._lock_local()
            else:
                self._lock_remote()
            self._held = True
            if not self.resume:
                self._refuse_if_not_empty()
        except OSError as e:  # pyarrow.fs raises OSError subclasses for permissions, missing buckets, ...
            self.release()
            raise ConfigError("--output", message=f"cannot write the run directory {uri}: {e}") from None
        except BaseException:
            self.release()
            raise
        return self

    def _exists(self) -> bool:
        from pyarrow import fs

        return self.storage.fs.get_file_info(self.storage.root).type != fs.FileType.NotFound

    def _refuse_if_not_empty(self) -> None:
        """A new run needs a directory of its own: another run's checkpoints would be taken for ours."""
        others = [e for e in self.storage.entries() if e != LOCK_FILE]
        if not others:
            return
        uri = self.storage.uri
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        if "job.yaml" in others:
            message = (
                f"{uri} already holds a run ({shown}); continue it with --resume {uri}, or choose an empty or new "
                "directory"
            )
        else:
            message = f"{uri} is not empty ({shown}); a new run needs an empty or new directory"
        raise ConfigError("--output", message=message)

    def _lock_local(self) -> None:
        """An exclusive flock on the lock file, which must still be the file at its path once we hold it (a
        run that ends unlinks it: whoever opened it before then must try again)."""
        import fcntl

        path = f"{self.storage.root}/{LOCK_FILE}"
        os.makedirs(self.storage.root, exist_ok=True)
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                existing = _read_fd(fd)
                os.close(fd)
                raise self._busy(existing) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            existing = _read_fd(fd)
            try:
                if existing:
                    self._take_over_if_stale(existing)  # no flock held on it: its owner is gone, unless it is
                    # a run of this host that locks another way (an older codistill): then its pid is alive
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(self.owner).encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return
        raise RunDirBusyError(f"{self.storage.uri} is in use: its lock keeps changing hands; try again")

    def _lock_remote(self) -> None:
        """Object storage: check, then create only if absent (pyarrow.fs exposes no conditional write)."""
        existing = self.storage.read(LOCK_FILE)
        if existing is not None:
            self._take_over_if_stale(existing)
            self.storage.delete(LOCK_FILE)
        if not self.storage.create_exclusive(LOCK_FILE, json.dumps(self.owner).encode()):
            raise RunDirBusyError(
                f"{self.storage.uri} is in use by another run that started just now; try again or choose another "
                "--output"
            )

    def _busy(self, existing: bytes) -> RunDirBusyError:
        owner = _owner(existing)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
        return RunDirBusyError(
            f"{self.storage.uri} is in use by the run of pid {owner.get('pid', '?')} on {owner.get('host', '?')} "
            f"since {since}; wait for it to end, or choose another --output"
        )

    def _take_over_if_stale(self, existing: bytes) -> None:
        owner = _owner(existing)
        host, pid = owner.get("host", "?"), owner.get("pid", -1)
        pid = pid if isinstance(pid, int) else -1
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
        if host == self.owner["host"] and pid > 0 and not _alive(pid):
            self.notes.append(f"took over the lock of {self.storage.uri} left by pid {pid} (gone) since {since}")
            return
        raise RunDirBusyError(
            f"{self.storage.uri} is in use by the run of pid {pid} on {host} since {since}; wait for it to end, "
            f"choose another --output, or delete {self.storage.uri}/{LOCK_FILE} if that run is gone"
        )

    def release(self) -> None:
        held, self._held = self._held, False
        if held:
            with contextlib.suppress(OSError):
                self.storage.delete(LOCK_FILE)  # before the flock goes: see _lock_local
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def remove_failed_start(self) -> None:
        """A run that failed before it wrote anything of its own leaves no directory behind it made (only
        files it made, and the directory itself when it made it and nothing else is there)."""
        if not self.created or not self.storage.is_local():
            return
        with contextlib.suppress(OSError):
            os.rmdir(self.storage.root)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _owner(existing: bytes) -> dict:
    try:
        owner = json.loads(existing)
        return owner if isinstance(owner, dict) else {}
    except ValueError:
        return {}


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, 1 << 16, 0)


def recorded_run_id(storage: Storage) -> str | None:
    """The run id in `run.json`; None when it is missing or damaged."""
    try:
        info = json.loads(storage.read("run.json") or b"null")
    except ValueError:
        return None
    run_id = info.get("run_id") if isinstance(info, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None
