"""Files of a run directory: a local path or any pyarrow.fs URI (s3://, gs://, hdfs://).

Training checkpoints, final weights, job.yaml, progress.json and summary.json all go through
Storage, so a run can live in object storage that every node of a cluster reaches. Checkpoints are
read with torch.load(weights_only=True): nothing untrusted is unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from codistill.errors import CodistillError

__all__ = ["Storage", "StorageFullError", "checkpoint_path", "sharded_checkpoint_dir"]


class StorageFullError(CodistillError, OSError):
    """The run directory's device is full (or over quota): nothing half-written was left behind."""


def _out_of_space(e: OSError) -> bool:
    # pyarrow raises OSError without errno set and says it in the message ("[errno 28] No space left on device")
    return e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e) or "quota" in str(e).lower()


CHECKPOINTS = "checkpoints"


def checkpoint_path(peer_name: str, step: int) -> str:
    """The run-relative path of a peer's training checkpoint at `step` (parsed by Storage.checkpoint_steps)."""
    return f"{CHECKPOINTS}/{peer_name}/step-{step}.pt"


def sharded_checkpoint_dir(peer_name: str, step: int) -> str:
    """The folder of a sharded peer's (strategy fsdp) model and optimizer shards at `step`, beside its checkpoint
    file (which is written last: a step whose file exists has all its shards)."""
    return f"{CHECKPOINTS}/{peer_name}/step-{step}.shards"


class Storage:
    """Files under a run directory, local or remote, through pyarrow.fs."""

    def __init__(self, uri: str | Path):
        from pyarrow import fs

        uri = str(uri)
        if "://" in uri:
            self.fs, self.root = fs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = fs.LocalFileSystem(), os.path.abspath(uri)
        self.uri = uri if "://" in uri else self.root

    def _path(self, rel: str) -> str:
        """`rel` under the run directory; a path that would leave it (absolute, `..`, empty parts) is a bug or
        a crafted name, never written."""
        parts = rel.split("/")
        if not rel or any(p in ("", ".", "..") or "\\" in p for p in parts):
            raise ValueError(f"{rel!r} is not a path inside the run directory {self.uri}")
        return f"{self.root.rstrip('/')}/{rel}"

    def write(self, rel: str, data: bytes) -> None:
        """Write then move: a crash never leaves half a file, and a failed write leaves no temporary file. A
        full disk is a `StorageFullError` (one line: the path, the space free and the space needed)."""
        path = self._path(rel)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            if _out_of_space(e):
                raise StorageFullError(self._full_message(path, len(data))) from None
            raise

    def _full_message(self, path: str, needed: int) -> str:
        free = ""
        if self.is_local():
            with contextlib.suppress(OSError):
                free = f"{shutil.disk_usage(self.root).free:,} bytes free, "
        return (
            f"no space left on the device of {path} ({free}{needed:,} bytes needed to write it); "
            f"free some space, then continue with --resume {self.uri}"
        )

    def read(self, rel: str) -> bytes | None:
        from pyarrow import fs

        if self.fs.get_file_info(self._path(rel)).type != fs.FileType.File:
            return None
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read()

    def files(self, rel_dir: str) -> list[str]:
        from pyarrow import fs

        info = self.fs.get_file_info(fs.FileSelector(self._path(rel_dir), allow_not_found=True))
        return sorted(i.base_name for i in info if i.type == fs.FileType.File)

    def is_local(self) -> bool:
        from pyarrow import fs

        return isinstance(self.fs, fs.LocalFileSystem)

    def entries(self) -> list[str]:
        """Names directly under the run directory (files and folders); [] when it does not exist."""
        from pyarrow import fs

        info = self.fs.get_file_info(fs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in info)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write `rel` only if it does not exist; False if it does. Atomic on a local disk (O_EXCL);
        on object stores, check-then-write (their conditional writes are not exposed by pyarrow.fs)."""
        path = self._path(rel)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if self.is_local():
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.read(rel) is not None:
            return False
        self.write(rel, data)
        return True

    def checkpoint_steps(self, peer_name: str) -> list[int]:
        """Steps of `peer_name`'s training checkpoints, oldest first."""
        steps = []
        for name in self.files(f"{CHECKPOINTS}/{peer_name}"):
            stem, dot, ext = name.partition(".")
            if stem.startswith("step-") and stem[5:].isdigit() and dot and ext == "pt":
                steps.append(int(stem[5:]))
        return sorted(steps)

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self._path(rel))

    def delete_dir(self, rel: str) -> None:
        """Delete a folder and what is in it (nothing if it is not there)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(self._path(rel))

    def exists(self, rel: str) -> bool:
        """Whether anything (a file or a folder) is at `rel`."""
        from pyarrow import fs

        return self.fs.get_file_info(self._path(rel)).type != fs.FileType.NotFound

    def move(self, rel: str, to_rel: str) -> None:
        """Move a file or folder within the run directory (what is set aside rather than deleted); it never replaces
        anything: a `FileExistsError` if `to_rel` exists."""
        if self.exists(to_rel):
            raise FileExistsError(self._path(to_rel))
        target = self._path(to_rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        self.fs.move(self._path(rel), target)

    def write_torch(self, rel: str, obj: Any) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write(rel, buf.getvalue())

    def write_sharded(self, rel_dir: str, state: dict[str, Any]) -> None:
        """Save a sharded state (DTensors) with torch.distributed.checkpoint, collective: each rank writes its own
        shards, one file per rank, and rank 0 the metadata. A local run directory is written in place; a remote
        one through a local temporary folder, each rank uploading its own files."""
        import tempfile

        import torch.distributed.checkpoint as dcp

        if self.is_local():
            dcp.save(state, checkpoint_id=self._path(rel_dir))
            return
        with tempfile.TemporaryDirectory(prefix="codistill-dcp-") as d:
            dcp.save(state, checkpoint_id=d)
            for name in sorted(os.listdir(d)):
                self.write(f"{rel_dir}/{name}", Path(d, name).read_bytes())

    def read_sharded(self, rel_dir: str, state: dict[str, Any], collective: bool = True) -> None:
        """Load a state saved by `write_sharded` into `state` in place: DCP reshards, so any number of ranks can read
        what any number wrote. collective: every rank of the process group loads its own slices together;
        else this process alone reads what its (plain) tensors need. FileNotFoundError when the folder is not there."""
        import tempfile

        import torch.distributed.checkpoint as dcp

        names = self.files(rel_dir)
        if ".metadata" not in names:
            raise FileNotFoundError(self._path(f"{rel_dir}/.metadata"))
        if self.is_local():
            dcp.load(state, checkpoint_id=self._path(rel_dir), no_dist=not collective)
            return
        with tempfile.TemporaryDirectory(prefix="codistill-dcp-") as d:
            for name in names:
                data = self.read(f"{rel_dir}/{name}")
                if data is None:
                    raise FileNotFoundError(self._path(f"{rel_dir}/{name}"))
                Path(d, name).write_bytes(data)
            dcp.load(state, checkpoint_id=d, no_dist=not collective)

    def read_torch(self, rel: str) -> Any:
        data = self.read(rel)
        return None if data is None else torch.load(io.BytesIO(data), weights_only=True)  # nothing is unpickled
