"""Reading a prepared folder's shards lazily: rows are read when a batch asks for them, never all at once.

A local folder is read in place. A folder behind a `pyarrow.fs` URI (`s3://`, `gs://`, `hdfs://`, `file://`)
is read through a node-local cache: the first process on a node that needs a shard copies it (under a file
lock, to a temporary name, checked against the manifest's SHA-256, then renamed), and every process on the
node reads that copy. The cache lives in `$CODISTILL_DATA_CACHE` (default `~/.cache/codistill/prepared`),
one folder per manifest key, so two prepares never mix.

Reads use `os.pread` on open file descriptors instead of memory maps: a map's touched pages count in the
process's resident memory, which would grow with how much of the data set a run has visited; the page
cache the kernel keeps for `pread` does not. No ray, no mlflow.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codistill.data.manifest import MANIFEST, Manifest, Shard
from codistill.data.text import TABLE_SUFFIXES
from codistill.errors import ConfigError

__all__ = ["LazyRows", "PreparedFolder", "TokenWindows", "ZeroRows", "image_rows", "is_uri", "label_rows", "sha256_of"]

OPEN_FILES = 128  # descriptors one process keeps open per folder (least recently used are closed)
HASH_CHUNK = 8 << 20


def is_uri(location: str) -> bool:
    return "://" in location


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cache_root() -> Path:
    return Path(os.environ.get("CODISTILL_DATA_CACHE", "~/.cache/codistill/prepared")).expanduser()


def _fix(where: str, what: str) -> ConfigError:
    return ConfigError("data.train", message=f"{where}: {what}; run python -m codistill.prepare again to rebuild it")


class PreparedFolder:
    """A prepared folder (local path or URI): its manifest, and a local path for each of its files."""

    def __init__(self, location: str):
        self.location = location.rstrip("/")
        self.uri = is_uri(self.location)
        self._fs: Any = None
        self._base = self.location
        if self.uri:
            import pyarrow.fs as pafs

            try:
                self._fs, self._base = pafs.FileSystem.from_uri(self.location)
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError or its own errors for a bad URI
                raise ConfigError("data.train", self.location, f"a folder pyarrow.fs can open ({e})") from None
        self._manifest: Manifest | None = None

    @staticmethod
    def holds_manifest(location: str | None) -> bool:
        """Whether `location` is a prepared folder (cheap for a local path; a URI is taken to be one)."""
        if not location:
            return False
        if is_uri(location):  # not listed here: a name with a file's suffix is a file
            return Path(location.split("://", 1)[1]).suffix.lower() not in (*TABLE_SUFFIXES, ".txt", ".jsonl", ".json")
        return (Path(location).expanduser() / MANIFEST).is_file()

    def _remote_read(self, name: str) -> bytes:
        try:
            with self._fs.open_input_stream(f"{self._base}/{name}") as f:
                return f.read()
        except Exception as e:  # unreachable store, missing object, no permission: one line
            raise self._unreachable(name, e) from None

    def _unreachable(self, name: str, e: Exception) -> ConfigError:
        shown = self.location.split("?", 1)[0]  # the query (endpoint, region) is not part of the name
        return ConfigError(
            "data.train",
            message=f"cannot read {shown}/{name} ({e}); check the URI, the store's credentials and the network",
        )

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            where = f"{self.location}/{MANIFEST}"
            if self.uri:
                text = self._remote_read(MANIFEST).decode("utf-8", errors="replace")
            else:
                path = Path(self.location).expanduser() / MANIFEST
                if not path.is_file():
                    raise ConfigError(
                        "data.train",
                        message=f"{self.location} has no {MANIFEST} (not prepared, or its prepare did not finish); "
                        "run python -m codistill.prepare --out there",
                    )
                text = path.read_text(encoding="utf-8", errors="replace")
            self._manifest = Manifest.from_json(text, where)
        return self._manifest

    def cache_dir(self) -> Path:
        return _cache_root() / self.manifest.key[:32]

    def path(self, name: str, size: int, sha256: str) -> Path:
        """A local path holding file `name` of the folder (for a URI, the node's checked copy)."""
        if not self.uri:
            return Path(self.location).expanduser() / name
        local = self.cache_dir() / name
        if local.is_file() and local.stat().st_size == size:
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(local.parent / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per node, however many processes want it
            if local.is_file() and local.stat().st_size == size:
                return local
            tmp = local.parent / f".{name}.{os.getpid()}.part"
            h = hashlib.sha256()
            try:
                with self._fs.open_input_stream(f"{self._base}/{name}") as src, open(tmp, "wb") as dst:
                    while chunk := src.read(HASH_CHUNK):
                        h.update(chunk)
                        dst.write(chunk)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise ConfigError(
                    "data.train", message=f"cannot copy {self.location}/{name} to {local} ({e})"
                ) from None
            except Exception as e:  # pyarrow's errors for an unreachable store
                tmp.unlink(missing_ok=True)
                raise self._unreachable(name, e) from None
            if h.hexdigest() != sha256 or tmp.stat().st_size != size:
                tmp.unlink(missing_ok=True)
                raise _fix(f"{self.location}/{name}", "its content does not match the manifest's checksum")
            os.replace(tmp, local)
        return local

    def _files(self) -> list[tuple[str, int, str]]:
        out = []
        for split in self.manifest.splits.values():
            for s in split.shards:
                out.append((s.file, s.bytes, s.sha256))
                if s.labels:
                    out.append((s.labels, s.labels_bytes, s.labels_sha256 or ""))
        return out

    def verify(self, checksums: bool = True) -> None:
        """Every shard is there with its size; with `checksums`, its content matches the manifest (a local file
        once per (path, size, mtime): the node cache remembers what it has checked). One line names the first
        file that fails and says how to fix it."""
        files = self._files()
        if self.uri:
            import pyarrow.fs as pafs

            try:
                infos = self._fs.get_file_info([f"{self._base}/{name}" for name, _, _ in files])
            except Exception as e:
                raise ConfigError("data.train", message=f"cannot list {self.location} ({e})") from None
            for (name, size, _), info in zip(files, infos, strict=True):
                if info.type != pafs.FileType.File:
                    raise _fix(f"{self.location}/{name}", "the shard is missing")
                if info.size != size:
                    raise _fix(f"{self.location}/{name}", f"the shard has {info.size} bytes, the manifest says {size}")
            if checksums:  # copied (and checked) now, so training never waits on the store
                for name, size, sha in files:
                    self.path(name, size, sha)
            return
        root = Path(self.location).expanduser()
        for name, size, _ in files:
            p = root / name
            if not p.is_file():
                raise _fix(str(p), "the shard is missing")
            if p.stat().st_size != size:
                raise _fix(str(p), f"the shard has {p.stat().st_size} bytes, the manifest says {size} (truncated?)")
        if not checksums:
            return
        stamps_path = self.cache_dir() / "verified.json"
        try:
            stamps = json.loads(stamps_path.read_text())
        except (OSError, ValueError):
            stamps = {}
        changed = False
        for name, _, sha in files:
            p = (root / name).resolve()
            st = p.stat()
            stamp = f"{p}|{st.st_size}|{st.st_mtime_ns}|{sha}"
            if stamps.get(str(p)) == stamp:
                continue
            if sha256_of(p) != sha:
                raise _fix(str(p), "its content does not match the manifest's checksum (damaged)")
            stamps[str(p)], changed = stamp, True
        if changed:
            try:
                stamps_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = stamps_path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(stamps))
                os.replace(tmp, stamps_path)
            except OSError:
                pass  # a read-only home: checked again next time


class _Stream:
    """A split's shards as one stream of fixed-size elements (tokens or images), read by `pread`."""

    def __init__(self, folder: PreparedFolder, shards: tuple[Shard, ...], labels: bool, element_bytes: int):
        self.folder = folder
        self.shards = shards
        self.labels = labels
        self.element_bytes = 8 if labels else element_bytes
        self.starts = np.cumsum([0] + [s.count for s in shards])  # (num_shards + 1,) element offsets
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()  # a prefetch thread and the training thread share the descriptors

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fds, self._lock = OrderedDict(), threading.Lock()

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def _fd(self, i: int) -> int:
        with self._lock:
            fd = self._fds.get(i)
            if fd is not None:
                self._fds.move_to_end(i)
                return fd
            s = self.shards[i]
            name, size, sha = (
                (s.labels, s.labels_bytes, s.labels_sha256 or "") if self.labels else (s.file, s.bytes, s.sha256)
            )
            assert name is not None
            fd = self._fds[i] = os.open(self.folder.path(name, size, sha), os.O_RDONLY)
            if len(self._fds) > OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    @property
    def count(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, count: int, out: memoryview) -> None:
        """Elements [start, start + count) into `out` (count * element_bytes bytes), across shards."""
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < count:
            first = start + done - int(self.starts[shard])
            take = min(count - done, self.shards[shard].count - first)
            if take <= 0:
                shard += 1
                continue
            want = take * self.element_bytes
            offset = first * self.element_bytes
            fd = self._fd(shard)
            got = os.preadv(fd, [out[done * self.element_bytes : done * self.element_bytes + want]], offset)
            if got != want:
                raise _fix(f"{self.folder.location}/{self.shards[shard].file}", "the shard ended early (truncated)")
            done += take
            shard += 1


class LazyRows:
    """Rows of a prepared split: `shape`, `len()`, and indexing by an int64 tensor of row ids (a batch), a
    slice (evaluation), or (rows, rest) as a tensor would be indexed. Indexing reads just those rows."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.int64

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, ids: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def _slice(self, start: int, stop: int) -> torch.Tensor:
        return self._read(np.arange(start, stop, dtype=np.int64))

    def __getitem__(self, index: Any) -> torch.Tensor:
        rest: Any = None
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            out = self._slice(start, stop) if step == 1 else self._read(np.arange(start, stop, step, dtype=np.int64))
        elif isinstance(index, int):
            out = self._read(np.array([index], dtype=np.int64))[0]
        else:
            ids = torch.as_tensor(index).detach().cpu().to(torch.int64).numpy()
            if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
                raise IndexError(f"row ids outside [0, {len(self)})")
            out = self._read(ids.reshape(-1)).reshape(*ids.shape, *self.shape[1:])
        return out if rest is None else out[(slice(None), *rest)]

    def head(self, n: int | None) -> LazyRows:
        """The first `n` rows (data.limit_train / limit_test), still lazy (sharing this one's open files)."""
        if n is None or n >= len(self):
            return self
        out = copy.copy(self)
        out.shape = (n, *self.shape[1:])
        return out

    def to(self, device: Any) -> LazyRows:  # rows stay on disk until a batch reads them
        return self

    def numpy(self) -> np.ndarray:
        return self[: len(self)].numpy()


class TokenWindows(LazyRows):
    """Window i = tokens[i*T : i*T + T + 1] of a split's stream (int64 (N, T + 1)), as `text.windows`."""

    def __init__(self, folder: PreparedFolder, split: str, block_size: int):
        m = folder.manifest
        self.stream = _Stream(folder, m.splits[split].shards, False, m.element_bytes)
        self.np_dtype = np.dtype(m.dtype).newbyteorder("<")
        self.block_size = block_size
        self.shape = (max(0, (self.stream.count - 1) // block_size), block_size + 1)

    def _read(self, ids: np.ndarray) -> torch.Tensor:
        T = self.block_size
        buf = np.empty((len(ids), T + 1), dtype=self.np_dtype)
        view = buf.data.cast("B")
        row = (T + 1) * buf.itemsize
        for k, i in enumerate(ids.tolist()):
            self.stream.read(i * T, T + 1, view[k * row : (k + 1) * row])
        return torch.from_numpy(buf.astype(np.int64))

    def _slice(self, start: int, stop: int) -> torch.Tensor:
        """Consecutive windows overlap by one token: one read of their span, then a strided view."""
        T, n = self.block_size, stop - start
        if n <= 0:
            return torch.zeros((0, T + 1), dtype=torch.int64)
        flat = np.empty(n * T + 1, dtype=self.np_dtype)
        self.stream.read(start * T, n * T + 1, flat.data.cast("B"))
        view = np.lib.stride_tricks.sliding_window_view(flat, T + 1)[::T][:n]
        return torch.from_numpy(view.astype(np.int64))


class _ElementRows(LazyRows):
    """Row i = element i of a split's stream: an image (uint8 (C, H, W)) or a label (int64)."""

    def __init__(self, stream: _Stream, np_dtype: str, row_shape: tuple[int, ...], dtype: torch.dtype):
        self.stream, self.np_dtype, self.dtype = stream, np.dtype(np_dtype), dtype
        self.shape = (stream.count, *row_shape)

    def _read(self, ids: np.ndarray) -> torch.Tensor:
        buf = np.empty((len(ids), *self.shape[1:]), dtype=self.np_dtype)
        view, size = buf.data.cast("B"), self.stream.element_bytes
        for k, i in enumerate(ids.tolist()):
            self.stream.read(i, 1, view[k * size : (k + 1) * size])
        return torch.from_numpy(buf).to(self.dtype)

    def _slice(self, start: int, stop: int) -> torch.Tensor:
        buf = np.empty((max(0, stop - start), *self.shape[1:]), dtype=self.np_dtype)
        if len(buf):
            self.stream.read(start, len(buf), buf.data.cast("B"))
        return torch.from_numpy(buf).to(self.dtype)


def image_rows(folder: PreparedFolder, split: str) -> _ElementRows:
    """uint8 images (N, C, H, W) of a split."""
    m = folder.manifest
    return _ElementRows(_Stream(folder, m.splits[split].shards, False, m.element_bytes), "u1", m.shape, torch.uint8)


def label_rows(folder: PreparedFolder, split: str) -> _ElementRows:
    """int64 labels (N,) of a split of images."""
    return _ElementRows(_Stream(folder, folder.manifest.splits[split].shards, True, 8), "<i8", (), torch.int64)


class ZeroRows(LazyRows):
    """N zero targets (a language model's windows carry their own), without N * 8 bytes of zeros."""

    def __init__(self, n: int):
        self.shape = (n,)

    def _read(self, ids: np.ndarray) -> torch.Tensor:
        return torch.zeros(len(ids), dtype=torch.int64)
