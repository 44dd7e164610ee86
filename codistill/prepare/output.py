"""Where a prepare writes: a local folder or any `pyarrow.fs` URI, one file at a time, atomically (written under
a temporary name, then renamed), so a reader never sees half a file. No ray."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

from codistill.data.shards import is_uri
from codistill.errors import CodistillError

__all__ = ["Output", "PrepareError"]


class PrepareError(CodistillError, RuntimeError):
    """A prepare could not go on (a full disk, an unreadable source): one line that says what to do."""


class Output:
    def __init__(self, location: str):
        self.location = location.rstrip("/")
        self._fs: Any = None
        if is_uri(self.location):
            import pyarrow.fs as pafs

            self._fs, self._base = pafs.FileSystem.from_uri(self.location)
            self._fs.create_dir(self._base, recursive=True)
        else:
            self._base = str(Path(self.location).expanduser())
            Path(self._base).mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> str:
        return f"{self._base}/{name}"

    def write(self, name: str, parts: list[bytes | memoryview]) -> tuple[int, str]:
        """Write `parts` as file `name` (atomically); (its size, its SHA-256)."""
        h, size = hashlib.sha256(), sum(memoryview(part).nbytes for part in parts)
        folder, _, base = name.rpartition("/")
        tmp = self._path(f"{folder + '/' if folder else ''}.{base}.{os.getpid()}.part")
        try:
            if self._fs is None:
                Path(tmp).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") if self._fs is None else self._fs.open_output_stream(tmp) as f:
                for part in parts:
                    f.write(part)
                    h.update(part)
                if self._fs is None:  # on the disk before the rename makes it a finished shard
                    f.flush()
                    os.fsync(f.fileno())
            if self._fs is None:
                os.replace(tmp, self._path(name))
            else:
                self._fs.move(tmp, self._path(name))
        except OSError as e:
            self._remove(tmp)
            if e.errno == errno.ENOSPC:
                what = f"no space left writing {self._path(name)}: free space or choose another --out"
                raise PrepareError(what) from None
            raise PrepareError(f"cannot write {self._path(name)} ({e})") from None
        return size, h.hexdigest()

    def _remove(self, path: str) -> None:
        try:
            if self._fs is None:
                Path(path).unlink(missing_ok=True)
            else:
                self._fs.delete_file(path)
        except Exception:  # nothing to remove, or the store is gone: the next run overwrites it
            pass

    def remove(self, name: str) -> None:
        self._remove(self._path(name))

    def read_text(self, name: str) -> str | None:
        """File `name` as text, or None when it is not there."""
        try:
            if self._fs is None:
                return Path(self._path(name)).read_text(encoding="utf-8")
            with self._fs.open_input_stream(self._path(name)) as f:
                return f.read().decode("utf-8")
        except (FileNotFoundError, OSError, UnicodeDecodeError):
            return None

    def size(self, name: str) -> int | None:
        try:
            if self._fs is None:
                return Path(self._path(name)).stat().st_size
            import pyarrow.fs as pafs

            info = self._fs.get_file_info(self._path(name))
            return int(info.size) if info.type == pafs.FileType.File else None
        except OSError:
            return None
