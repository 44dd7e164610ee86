"""PeerData: a peer's view of a dataset (its shard, batch order and augmentation), made by its task."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from codistill.config import DataConfig
from codistill.data.dataset import Dataset, mix_seed
from codistill.data.order import shard_sample_ids
from codistill.data.permutation import LazyPermutation
from codistill.data.sample_ids import IdMap, lazy_pool_and_validation, lazy_shard
from codistill.data.streamed import StreamedBatches, WindowDecoder, stream_plan
from codistill.errors import ConfigError
from codistill.tasks import task_of
from codistill.tasks.base import held_out_rows

__all__ = ["PeerData"]

LAZY_BLOCK_STEPS = 64  # batches whose positions in a lazy epoch order are evaluated together


class PeerData:
    """A peer's view of a dataset: its training shard on its device, its batch order and augmentation.

    `order_seed` fixes the batch order (shared by all peers when the exchange needs it); `aug_seed` is
    the peer's own. Sample ids returned by `batch` are indices into the full training set.
    """

    def __init__(
        self,
        ds: Dataset,
        cfg: DataConfig,
        *,
        order_seed: int,
        aug_seed: int,
        shard_seed: int = 0,
        shard_index: int = 0,
        num_shards: int = 1,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        decoder: WindowDecoder | None = None,
    ):
        self.ds = ds
        self.batch_size = cfg.batch_size
        self.eval_batch_size = cfg.eval_batch_size
        self.order_seed = order_seed
        self.aug_seed = aug_seed
        self.augment = ds.augment if cfg.augment is None else cfg.augment
        self.device = torch.device(device)
        self.task = task_of(ds)
        # A held-out validation split (data.validation_fraction), the same for every peer, is never trained on.
        n = len(ds.train_y)
        self.validation_seed = shard_seed
        # Data read from prepared shards stays on disk: ids are computed on demand (codistill.data.sample_ids) and
        # each batch reads its rows, the next one on a background thread while this one trains.
        self.lazy = ds.lazy
        self.sample_ids: torch.Tensor | IdMap
        self.validation_ids: torch.Tensor | IdMap
        if self.lazy:
            held_out = held_out_rows(n, cfg.validation_fraction)
            pool, self.validation_ids = lazy_pool_and_validation(
                n, held_out, mix_seed(shard_seed, 11), self.task.holds_out_the_tail
            )
            self.sample_ids = lazy_shard(pool, shard_seed, shard_index, num_shards)
        else:
            validation_ids = torch.zeros(0, dtype=torch.long)
            kept = torch.arange(n)
            if cfg.validation_fraction > 0:
                validation_ids = self.task.validation_rows(n, cfg.validation_fraction, mix_seed(shard_seed, 11))
                keep = torch.ones(n, dtype=torch.bool)
                keep[validation_ids] = False
                kept = kept[keep]
            self.validation_ids = validation_ids
            # Anil et al.: with several shards, peers train on disjoint parts of the training set
            self.sample_ids = kept[shard_sample_ids(len(kept), shard_seed, shard_index, num_shards)]
        if len(self.sample_ids) < self.batch_size:
            raise ConfigError(
                "data.batch_size",
                self.batch_size,
                f"at most the shard size {len(self.sample_ids)} of peer shard {shard_index}",
            )
        if self.lazy:  # indexed by sample id when a batch is read
            self.train_x, self.train_y, self.test_x, self.test_y = ds.train_x, ds.train_y, ds.test_x, ds.test_y
        else:  # indexed by position in this peer's shard
            assert isinstance(self.sample_ids, torch.Tensor)
            self.train_x = ds.train_x[self.sample_ids].to(self.device)
            self.train_y = ds.train_y[self.sample_ids].to(self.device)
            self.test_x = ds.test_x.to(self.device)
            self.test_y = ds.test_y.to(self.device)
        self._reader: ThreadPoolExecutor | None = None
        self._read_ahead: tuple[int, Future] | None = None  # (step, its rows being read)
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None  # images: per-channel mean, std on the device
        self._identity_normalization = ds.scale == 1.0 and all(m == 0 for m in ds.mean) and all(s == 1 for s in ds.std)
        self._perms: dict[int, torch.Tensor] = {}  # epoch -> order; two kept (lookahead crosses epochs)
        self._lazy_block: tuple[int, int, torch.Tensor] | None = None  # (epoch, first step, positions) of lazy data
        # data.loader ray_data: this rank's batches stream from decoded windows of the sources (their own order)
        plan = stream_plan(ds)
        self.streamed = (
            None
            if plan is None
            else StreamedBatches(
                plan,
                order_seed=order_seed,
                batch_size=self.batch_size // world_size,
                rank=rank,
                world_size=world_size,
                shard_index=shard_index,
                num_shards=num_shards,
                shard_seed=shard_seed,
                decoder=decoder,
            )
        )
        # data.train_eval: fixed, evenly spaced positions of this shard scored at every evaluation (in memory only)
        wanted = cfg.train_eval if cfg.train_eval is not None else self.task.default_train_eval
        count = min(wanted, len(self.sample_ids)) if self.streamed is None and not self.lazy else 0
        self.train_eval_positions = torch.linspace(0, len(self.sample_ids) - 1, count).round().long().unique()

    @property
    def steps_per_epoch(self) -> int:
        rows = self.streamed.num_rows if self.streamed is not None else len(self.sample_ids)
        return rows // self.batch_size  # the last partial batch is dropped

    def positions(self, step: int) -> torch.Tensor:
        """Positions (within this shard) of the batch at `step`: a pure function of (order_seed, step)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self.lazy:  # a permutation of the shard per epoch, evaluated for the next LAZY_BLOCK_STEPS batches at once
            first = k - k % LAZY_BLOCK_STEPS  # (one evaluation costs ~1 ms whatever its length: its rounds are calls)
            block = self._lazy_block
            if block is None or block[:2] != (epoch, first):
                order = LazyPermutation(len(self.sample_ids), mix_seed(self.order_seed, epoch))
                last = min(first + LAZY_BLOCK_STEPS, self.steps_per_epoch)
                block = self._lazy_block = (
                    epoch,
                    first,
                    order(torch.arange(first * self.batch_size, last * self.batch_size)),
                )
            return block[2][(k - first) * self.batch_size : (k - first + 1) * self.batch_size]
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(mix_seed(self.order_seed, epoch))
            perm = self._perms[epoch] = torch.randperm(len(self.sample_ids), generator=g)
            for old in sorted(self._perms)[:-2]:
                del self._perms[old]
        return perm[k * self.batch_size : (k + 1) * self.batch_size]

    def batch_ids(self, step: int) -> torch.Tensor:
        """The sample ids (indices into the full training set) of the batch at `step`."""
        if self.streamed is not None:
            return self.streamed.batch_ids(step)
        return self.sample_ids[self.positions(step)]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self._identity_normalization and x.is_floating_point():
            return x  # stored normalised already (mean 0, std 1, scale 1): three passes over the batch saved
        if self._stats is None:
            self._stats = (
                torch.tensor(self.ds.mean, device=self.device).view(1, -1, 1, 1),
                torch.tensor(self.ds.std, device=self.device).view(1, -1, 1, 1),
            )
        mean, std = self._stats
        return (x.float() * self.ds.scale - mean) / std  # as normalize(ds, x), with cached tensors

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample_ids, inputs, targets) for `step`, as the dataset's task makes them (images: normalised
        and augmented with the peer's own randomness; text: a window and the same window shifted by one)."""
        if self.streamed is not None:  # this rank's part, decoded (and read ahead) by the stream's decoder
            ids, x, y = self.streamed.batch(step)
            x, y = self.task.prepare(self, x.to(self.device, non_blocking=True), y.to(self.device), step)
            return ids, x, y
        if self.lazy:
            ahead, self._read_ahead = self._read_ahead, None
            ids, x, y = ahead[1].result() if ahead is not None and ahead[0] == step else self._read_rows(step)
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="codistill-read-ahead")
            self._read_ahead = (step + 1, self._reader.submit(self._read_rows, step + 1))
            x, y = self.task.prepare(self, x.to(self.device, non_blocking=True), y.to(self.device), step)
            return ids, x, y
        pos = self.positions(step)
        pos_dev = pos.to(self.device)
        x, y = self.task.prepare(self, self.train_x[pos_dev], self.train_y[pos_dev], step)
        return self.sample_ids[pos], x, y

    def _read_rows(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample ids, raw inputs, raw targets) of the batch at `step`, read from the shards (lazy data)."""
        ids = self.sample_ids[self.positions(step)]
        return ids, self.train_x[ids], self.train_y[ids]

    def validation_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of a batch of `batch_size` rows of the validation split drawn for `step` from the
        job's seed (the same for every peer and rank; no augmentation)."""
        if len(self.validation_ids) == 0:
            raise ConfigError("data.validation_fraction", 0, "a number in (0, 1) to draw validation batches")
        g = torch.Generator().manual_seed(mix_seed(self.validation_seed, step, 13))
        rows = self.validation_ids[torch.randint(len(self.validation_ids), (self.batch_size,), generator=g)]
        x, y = self.task.prepare(
            self, self.ds.train_x[rows].to(self.device), self.ds.train_y[rows].to(self.device), None
        )
        return x, y

    def train_eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(inputs, targets as trained on, clean targets or None) of the training rows `data.train_eval` scores,
        without augmentation; clean targets when the labels were made noisy (data.label_noise)."""
        clean = self.ds.train_y_clean
        for i in range(0, len(self.train_eval_positions), self.eval_batch_size):
            pos = self.train_eval_positions[i : i + self.eval_batch_size]
            pos_dev = pos.to(self.device)  # one copy for both gathers
            x, y = self.task.prepare(self, self.train_x[pos_dev], self.train_y[pos_dev], None)
            ids = self.sample_ids[pos]  # in-memory data: a tensor of ids
            yield x, y, None if clean is None else clean[ids].to(self.device)

    @property
    def num_test_positions(self) -> int:
        """Target positions in the evaluation set (examples, or tokens for language models)."""
        return len(self.test_y) * self.task.positions_per_row(self.ds)

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.test_y), self.eval_batch_size):
            rows = slice(i, i + self.eval_batch_size)
            x, y = self.task.prepare(self, self.test_x[rows].to(self.device), self.test_y[rows].to(self.device), None)
            yield x, y
