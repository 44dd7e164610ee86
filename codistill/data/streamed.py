"""Images streamed from their sources (`data.loader: ray_data`): each peer and rank reads its own stream of
shuffle windows, decoded where the engine decodes them (Ray Data tasks anywhere in the cluster on the Ray
engine, a thread here otherwise). No ray.

The stream is a pure function of (order seed, epoch, rank): the training images are cut into chunks of
`shuffle_window / 8` images (folders: after one fixed shuffle of the file list, so a chunk mixes classes;
Parquet: row ranges of a row group); each epoch draws a permutation of the chunks, groups it into windows of 8
chunks, and gives window j to rank j mod W; a window's images come out in a permutation of their own. A rank's
step k is rows [k b, (k + 1) b) of its stream, epochs back to back (b = batch_size / W). So a rank's batches,
and a resumed run's, are the same whichever worker decoded them, but peers with different seeds, and ranks,
read different images at a step: the exchange must not need a shared batch order (config refuses `logits`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

import numpy as np
import torch

from codistill.config import DataConfig
from codistill.data.dataset import Dataset, channel_stats, mix_seed
from codistill.data.parquet_images import check_labels, declared_classes, infer_classes
from codistill.data.shards import LazyRows
from codistill.data.sources import cut_image_units, decode_images, image_shape, image_source
from codistill.errors import ConfigError

__all__ = [
    "DecodedRows",
    "StreamPlan",
    "StreamedBatches",
    "WindowDecoder",
    "decode_here",
    "decode_window",
    "stream_plan",
    "streamed_images",
    "window_ids",
]

WINDOW_CHUNKS = 8  # chunks a window mixes: a window's images come from 8 places of the source
STATS_IMAGES = 1024  # training images the channel mean and std are measured on

WindowDecoder = Callable[[list[dict]], Iterator[dict[str, np.ndarray]]]
"""Decodes windows in order: yields, for each window given, its rows as {"id", "image", "label"} arrays, in one
or more consecutive blocks (the engine's decoder runs them as Ray Data tasks, several at once)."""


def _chunk_count(chunk: dict) -> int:
    return len(chunk["items"]) if chunk["kind"] == "image_files" else chunk["end"] - chunk["start"]


def _shuffled_files(units: list[dict]) -> list[dict]:
    """An image folder's files in one fixed shuffled order (listing order is by class: a chunk of it would
    hold one class); Parquet units as they are."""
    out = []
    for u in units:
        if u["kind"] == "image_files":
            order = np.random.default_rng(0).permutation(len(u["items"]))
            u = {**u, "items": [u["items"][i] for i in order]}
        out.append(u)
    return out


def _first(chunks: list[dict], n: int | None) -> list[dict]:
    """The chunks holding the first `n` images (the last one cut short)."""
    if n is None:
        return chunks
    out: list[dict] = []
    for c in chunks:
        room = n - sum(_chunk_count(o) for o in out)
        if room <= 0:
            break
        if _chunk_count(c) > room:
            c = {**c, "items": c["items"][:room]} if c["kind"] == "image_files" else {**c, "end": c["start"] + room}
        out.append(c)
    return out


@dataclass(frozen=True)
class StreamPlan:
    """The training split as numbered chunks: chunk i holds ids [first_ids[i], first_ids[i] + counts[i])."""

    chunks: tuple[dict, ...]
    shape: tuple[int, int, int]

    @property
    def counts(self) -> np.ndarray:
        return np.array([_chunk_count(c) for c in self.chunks], dtype=np.int64)

    @property
    def first_ids(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    @property
    def num_rows(self) -> int:
        return int(self.counts.sum())

    def to_plain(self) -> dict:
        return {"chunks": list(self.chunks), "shape": list(self.shape)}

    @classmethod
    def from_plain(cls, plain: dict) -> StreamPlan:
        return cls(tuple(plain["chunks"]), tuple(plain["shape"]))


def decode_window(window: dict) -> dict[str, np.ndarray]:
    """A window's rows in its own order: {"id": int64 (n,), "image": uint8 (n, C, H, W), "label": int64 (n,)}.
    Runs where the engine decodes (a Ray Data task); a window carries everything it needs."""
    shape = tuple(window["shape"])
    parts = [decode_images(c, shape) for c in window["chunks"]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    order = _window_order(window)
    return {"id": _ids_in(window)[order], "image": images[order], "label": labels[order]}


def _ids_in(window: dict) -> np.ndarray:
    """The ids of a window's chunks, in chunk order (before the window's own permutation)."""
    return np.concatenate([np.arange(f, f + n, dtype=np.int64) for f, n in zip(window["first_ids"], window["counts"])])


def _window_order(window: dict) -> np.ndarray:
    return np.random.default_rng(window["seed"]).permutation(int(sum(window["counts"])))


def window_ids(window: dict) -> np.ndarray:
    """The ids `decode_window` gives, without decoding."""
    return _ids_in(window)[_window_order(window)]


def decode_here(windows: list[dict]) -> Iterator[dict[str, np.ndarray]]:
    """The decoder without an engine's workers: one window ahead on a thread of this process."""
    q: Queue = Queue(maxsize=1)
    stop = threading.Event()

    def work() -> None:
        try:
            for w in windows:
                if stop.is_set():
                    return
                q.put(decode_window(w))
        except BaseException as e:  # handed to the consumer, which raises it
            q.put(e)
        q.put(None)

    threading.Thread(target=work, daemon=True, name="codistill-decode").start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # a stream restarted elsewhere: the thread stops after the window it is on
        stop.set()
        while not q.empty():
            q.get_nowait()


class StreamedBatches:
    """One rank's training batches from a StreamPlan (module docstring): `batch(step)` is rows
    [step b, (step + 1) b) of this rank's stream; asking for a step other than the next restarts the stream
    there (resume, restart), skipping whole windows without decoding them."""

    def __init__(
        self,
        plan: StreamPlan,
        *,
        order_seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shard_index: int = 0,
        num_shards: int = 1,
        shard_seed: int = 0,
        decoder: WindowDecoder | None = None,
    ):
        counts, first_ids = plan.counts, plan.first_ids
        chunk_order = np.random.default_rng(mix_seed(shard_seed, 23)).permutation(len(plan.chunks))
        # data.shard disjoint: peer i trains on the chunks dealt to it (a fixed deal, the same every epoch)
        self.mine = np.sort(chunk_order[shard_index::num_shards])
        self.plan, self.counts, self.first_ids = plan, counts, first_ids
        self.order_seed, self.batch_size, self.rank, self.world_size = order_seed, batch_size, rank, world_size
        self.decoder = decoder or decode_here
        windows = -(-len(self.mine) // WINDOW_CHUNKS)
        if windows < world_size:
            raise ConfigError(
                "data.shuffle_window",
                message=f"{len(self.mine)} chunks of this peer's images make {windows} shuffle windows, fewer than "
                f"its {world_size} ranks: lower data.shuffle_window",
            )
        self._epoch_rows: list[int] = []  # rows of this rank's stream in each epoch, as far as computed
        self._rows: Iterator[dict[str, np.ndarray]] | None = None
        self._next_step: int | None = None
        self._held: list[dict[str, np.ndarray]] = []  # decoded blocks not yet handed out in full
        self._offset = 0  # rows of the first held block handed out already

    @property
    def num_rows(self) -> int:
        return int(self.counts[self.mine].sum())

    def windows(self, epoch: int) -> list[dict]:
        """This rank's windows of `epoch`, in stream order, each a self-contained dict for `decode_window`."""
        perm = self.mine[np.random.default_rng(mix_seed(self.order_seed, epoch, 29)).permutation(len(self.mine))]
        groups = [perm[a : a + WINDOW_CHUNKS] for a in range(0, len(perm), WINDOW_CHUNKS)]
        return [
            {
                "chunks": [self.plan.chunks[i] for i in g],
                "first_ids": [int(self.first_ids[i]) for i in g],
                "counts": [int(self.counts[i]) for i in g],
                "seed": mix_seed(self.order_seed, epoch, j, 31),
                "shape": list(self.plan.shape),
            }
            for j, g in enumerate(groups)
            if j % self.world_size == self.rank
        ]

    def _rows_in(self, epoch: int) -> int:
        while len(self._epoch_rows) <= epoch:
            self._epoch_rows.append(sum(sum(w["counts"]) for w in self.windows(len(self._epoch_rows))))
        return self._epoch_rows[epoch]

    def _locate(self, row: int) -> tuple[int, int, int]:
        """(epoch, window, row within it) of this rank's `row`-th streamed row."""
        epoch = 0
        while row >= self._rows_in(epoch):
            row -= self._rows_in(epoch)
            epoch += 1
        for w, window in enumerate(self.windows(epoch)):
            n = sum(window["counts"])
            if row < n:
                return epoch, w, row
            row -= n
        raise AssertionError("a row inside an epoch lies in one of its windows")

    def batch_ids(self, step: int) -> torch.Tensor:
        """The ids of `step`'s batch, from the plan alone (nothing decoded)."""
        out, need = [], self.batch_size
        epoch, w, offset = self._locate(step * self.batch_size)
        while need:
            windows = self.windows(epoch)
            if w >= len(windows):
                epoch, w = epoch + 1, 0
                continue
            ids = window_ids(windows[w])[offset:][:need]
            out.append(ids)
            need -= len(ids)
            w, offset = w + 1, 0
        return torch.from_numpy(np.concatenate(out))

    def _stream_from(self, epoch: int, w: int, offset: int) -> Iterator[dict[str, np.ndarray]]:
        while True:
            windows = self.windows(epoch)[w:]
            for block in self.decoder(windows):
                if offset:  # a restart inside a window: its first rows were read before
                    cut = min(offset, len(block["id"]))
                    block, offset = {k: v[cut:] for k, v in block.items()}, offset - cut
                if len(block["id"]):
                    yield block
            epoch, w = epoch + 1, 0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample ids, uint8 images (b, C, H, W), labels) of this rank's batch at `step`."""
        if step != self._next_step or self._rows is None:
            self._rows = self._stream_from(*self._locate(step * self.batch_size))
            self._held, self._offset = [], 0
        pieces: list[dict[str, np.ndarray]] = []
        need = self.batch_size
        while need:  # rows from the front of the held blocks; only this batch's rows are copied
            if not self._held:
                self._held.append(next(self._rows))
            block = self._held[0]
            take = min(need, len(block["id"]) - self._offset)
            pieces.append({k: v[self._offset : self._offset + take] for k, v in block.items()})
            self._offset += take
            need -= take
            if self._offset == len(block["id"]):
                self._held.pop(0)
                self._offset = 0
        self._next_step = step + 1
        ids, images, labels = (np.concatenate([p[k] for p in pieces]) for k in ("id", "image", "label"))
        return torch.from_numpy(ids), torch.from_numpy(images), torch.from_numpy(labels)


class DecodedRows(LazyRows):
    """uint8 images (N, C, H, W) decoded from their chunks when indexed (evaluation reads spans: the chunk
    decoded last is kept, so a pass over the split decodes each chunk once)."""

    dtype = torch.uint8

    def __init__(self, plan: StreamPlan):
        self.plan, self.first_ids = plan, plan.first_ids
        self.shape = (plan.num_rows, *plan.shape)
        self._last: tuple[int, np.ndarray] | None = None

    def _chunk(self, i: int) -> np.ndarray:
        if self._last is None or self._last[0] != i:
            self._last = (i, decode_images(self.plan.chunks[i], self.plan.shape)[0])
        return self._last[1]

    def _read(self, ids: np.ndarray) -> torch.Tensor:
        out = np.empty((len(ids), *self.shape[1:]), dtype=np.uint8)
        where = np.searchsorted(self.first_ids, ids, side="right") - 1
        for i in np.unique(where).tolist():
            rows = np.flatnonzero(where == i)
            out[rows] = self._chunk(i)[ids[rows] - self.first_ids[i]]
        return torch.from_numpy(out)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_last": None}  # a decoded chunk never travels


def _labels(units: list[dict]) -> np.ndarray:
    import pyarrow.parquet as pq

    parts = []
    for u in units:
        if u["kind"] == "image_files":
            parts.append(np.array([label for _, label in u["items"]], dtype=np.int64))
        else:
            table = pq.ParquetFile(u["path"]).read_row_group(u["group"], columns=["label"])
            parts.append(table.column("label").to_numpy().astype(np.int64)[u["start"] : u["end"]])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _declared(units: list[dict]) -> int | None:
    import pyarrow.parquet as pq

    for path in dict.fromkeys(u["path"] for u in units if u["kind"] == "image_table"):
        found = declared_classes(pq.ParquetFile(path).schema_arrow.metadata)
        if found:
            return found
    return None


def streamed_images(cfg: DataConfig) -> Dataset:
    """The images of `data.train` / `data.test` (Hugging Face image Parquet, or folders of class folders) as a
    plan of chunks: only labels are read now; images are decoded when batches need them. The channel mean and
    std are measured on the first STATS_IMAGES training images."""
    if cfg.train is None or cfg.test is None:
        field = "data.train" if cfg.train is None else "data.test"
        raise ConfigError(field, None, "a Hugging Face image Parquet file or folder, or a folder of class folders")
    train_units, _, names = image_source(cfg.train, "data.train", None)
    test_units, _, _ = image_source(cfg.test, "data.test", names)
    if not train_units or not test_units:
        raise ConfigError("data.train" if not train_units else "data.test", message="holds no images")
    shape = image_shape(train_units[0], cfg.image_size)
    chunk = max(1, cfg.shuffle_window // WINDOW_CHUNKS)
    train_units = _shuffled_files(train_units)
    plans = {
        "train": StreamPlan(tuple(_first(cut_image_units(train_units, chunk), cfg.limit_train)), shape),
        "test": StreamPlan(tuple(_first(cut_image_units(test_units, chunk), cfg.limit_test)), shape),
    }
    labels = {split: _labels(list(plan.chunks)) for split, plan in plans.items()}
    num_classes = len(names) if names else (_declared(train_units) or cfg.num_classes)
    if num_classes is None:
        num_classes = infer_classes(np.concatenate(list(labels.values())), "data.train", f"{cfg.train} and {cfg.test}")
    check_labels(labels["train"], num_classes, "data.train", str(cfg.train))
    check_labels(labels["test"], num_classes, "data.test", str(cfg.test))
    train_x = DecodedRows(plans["train"])
    mean, std = channel_stats(train_x[: min(STATS_IMAGES, len(train_x))], 1 / 255)
    return Dataset(
        Path(str(cfg.train)).parent.name or "images",
        train_x,
        torch.from_numpy(labels["train"]),
        DecodedRows(plans["test"]),
        torch.from_numpy(labels["test"]),
        max(2, num_classes),
        mean,
        std,
        augment=shape[0] == 3,  # colour images: CIFAR-style crop + flip, as the Parquet loader decides
        meta={"loader": "ray_data", "stream": plans["train"].to_plain(), "source": str(cfg.train)},
    )


def stream_plan(ds: Dataset) -> StreamPlan | None:
    plain: Any = ds.meta.get("stream")
    return StreamPlan.from_plain(plain) if plain else None
