"""Datasets as in-memory tensors, per-peer shards and deterministic batch order.

Registry: DATASETS maps a name to a loader `(cfg: DataConfig) -> Dataset`. Adding a dataset is one
function and one entry. Small datasets live on the peer's device as tensors (uint8 images are
normalised per batch), so no DataLoader workers are needed.

Batch order is a pure function of (order seed, step): epoch e uses randperm(n) seeded by
(seed, e). That makes resume exact and lets every peer in `logits` mode draw the same sample ids
at step k without talking to each other. Augmentation randomness is seeded by (peer seed, step).

This module imports neither ray nor mlflow.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from codistill.config import DataConfig

__all__ = ["Dataset", "DATASETS", "load_dataset", "PeerData", "random_crop_flip", "mix_seed"]


@dataclass(frozen=True)
class Dataset:
    """A whole dataset held in memory. Images are (N, C, H, W); uint8 images are scaled by 1/255."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, after scaling to [0, 1]
    std: tuple[float, ...]
    scale: float = 1.0 / 255  # raw value -> [0, 1]
    augment: bool = False  # default training augmentation (random crop 4 + flip)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across processes, unlike hash() of str)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _channel_stats(x: torch.Tensor, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.double() * scale
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist())


# ---------------------------------------------------------------------------------------------
# loaders


def _digits(cfg: DataConfig) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), fixed 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1)  # N, 1, 8, 8 with values 0..16
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    mean, std = _channel_stats(x[train], 1 / 16)
    return Dataset("digits", x[train], y[train], x[test], y[test], 10, mean, std, scale=1 / 16)


def _synthetic(cfg: DataConfig) -> Dataset:
    """Gaussian class prototypes plus noise: learnable, any shape, instant. For tests."""
    g = torch.Generator().manual_seed(1234)
    c, h, w = cfg.synthetic_shape
    k = cfg.synthetic_classes
    prototypes = torch.randn(k, c, h, w, generator=g)
    n_train, n_test = cfg.synthetic_train, max(cfg.synthetic_train // 4, k)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, k, (n,), generator=g)
        x = prototypes[y] + 1.5 * torch.randn(n, c, h, w, generator=g)
        return x, y

    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    return Dataset("synthetic", xtr, ytr, xte, yte, k, (0.0,) * c, (1.0,) * c, scale=1.0)


def _missing(name: str, where: Path, how: str) -> ValueError:
    return ValueError(
        f"data.name={name}: files not found under {where} (data.root={where.parent if where.name else where}). "
        f"{how} Or set data.download=true (needs internet) or point data.root at a folder that has them."
    )


def _torchvision_mnist_like(name: str, cls_name: str, folder: str) -> Callable[[DataConfig], Dataset]:
    def load(cfg: DataConfig) -> Dataset:
        import torchvision

        root = Path(os.path.expanduser(cfg.root))
        cls = getattr(torchvision.datasets, cls_name)
        try:
            train = cls(str(root), train=True, download=cfg.download)
            test = cls(str(root), train=False, download=cfg.download)
        except RuntimeError as e:
            raise _missing(name, root / folder / "raw",
                           f"Expected the idx files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                           f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte ({e}).") from None
        xtr, xte = train.data.unsqueeze(1).contiguous(), test.data.unsqueeze(1).contiguous()  # uint8 N,1,28,28
        mean, std = _channel_stats(xtr[:10000], 1 / 255)
        return Dataset(name, xtr, train.targets.long(), xte, test.targets.long(), 10, mean, std)

    return load


def _read_cifar_batches(files: list[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for f in files:
        with open(f, "rb") as fh:
            # CIFAR's official "python version" is pickled dicts of numpy arrays; torchvision reads it the same way.
            entry = pickle.load(fh, encoding="latin1")
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(entry[label_key])
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.int64)


def _torchvision_cifar(name: str, cls_name: str, folder: str, train_files: list[str], test_files: list[str],
                       label_key: str, num_classes: int) -> Callable[[DataConfig], Dataset]:
    def load(cfg: DataConfig) -> Dataset:
        root = Path(os.path.expanduser(cfg.root))
        base = root / folder
        if cfg.download:
            import torchvision

            getattr(torchvision.datasets, cls_name)(str(root), train=True, download=True)
        # Read the official python-version batches directly (torchvision's own classes also demand the
        # exact md5 of each file, which files written by tests or re-packed mirrors cannot match).
        missing = [f for f in train_files + test_files if not (base / f).exists()]
        if missing:
            raise _missing(name, base, f"Missing {', '.join(missing)} (the CIFAR 'python version' archive, "
                                       f"extracted).")
        xtr, ytr = _read_cifar_batches([base / f for f in train_files], label_key)
        xte, yte = _read_cifar_batches([base / f for f in test_files], label_key)
        mean, std = _channel_stats(xtr[:10000], 1 / 255)
        return Dataset(name, xtr, ytr, xte, yte, num_classes, mean, std, augment=True)

    return load


def _decode_parquet(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face image layout: column image = {bytes, path}, column label = int."""
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(os.path.expanduser(path), columns=["image", "label"])
    images = table.column("image").combine_chunks().field("bytes").to_pylist()
    labels = torch.tensor(table.column("label").to_pylist(), dtype=torch.int64)
    first = np.asarray(Image.open(io.BytesIO(images[0])))
    out = np.empty((len(images), *first.shape), dtype=np.uint8)
    for i, b in enumerate(images):
        out[i] = np.asarray(Image.open(io.BytesIO(b)))
    x = torch.from_numpy(out)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # N,H,W(,C) -> N,C,H,W
    return x.contiguous(), labels


_PARQUET_CACHE: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]] = {}


def _parquet(cfg: DataConfig) -> Dataset:
    """Images in Parquet (Hugging Face layout), read with pyarrow and decoded with PIL."""
    parts = []
    for split, path in (("train", cfg.train), ("test", cfg.test)):
        p = Path(os.path.expanduser(str(path)))
        if not p.exists():
            raise ValueError(f"data.{split}: Parquet file {str(p)!r} does not exist")
        key = (str(p.resolve()), p.stat().st_mtime)
        if key not in _PARQUET_CACHE:
            _PARQUET_CACHE[key] = _decode_parquet(str(p))
        parts.append(_PARQUET_CACHE[key])
    (xtr, ytr), (xte, yte) = parts
    num_classes = int(max(ytr.max(), yte.max())) + 1
    mean, std = _channel_stats(xtr[:10000], 1 / 255)
    augment = xtr.shape[1] == 3  # colour images: CIFAR-style crop + flip; digits/clothes: none
    return Dataset(Path(str(cfg.train)).parent.name or "parquet", xtr, ytr, xte, yte, num_classes, mean, std,
                   augment=augment)


DATASETS: dict[str, Callable[[DataConfig], Dataset]] = {
    "digits": _digits,
    "synthetic": _synthetic,
    "mnist": _torchvision_mnist_like("mnist", "MNIST", "MNIST"),
    "fashion_mnist": _torchvision_mnist_like("fashion_mnist", "FashionMNIST", "FashionMNIST"),
    "cifar10": _torchvision_cifar("cifar10", "CIFAR10", "cifar-10-batches-py",
                                  [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": _torchvision_cifar("cifar100", "CIFAR100", "cifar-100-python", ["train"], ["test"],
                                   "fine_labels", 100),
    "parquet": _parquet,
}


def load_dataset(cfg: DataConfig) -> Dataset:
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name: got {cfg.name!r}; allowed: {' | '.join(DATASETS)}")
    ds = DATASETS[cfg.name](cfg)
    if cfg.limit_train is not None or cfg.limit_test is not None:
        ds = Dataset(ds.name, ds.train_x[: cfg.limit_train], ds.train_y[: cfg.limit_train],
                     ds.test_x[: cfg.limit_test], ds.test_y[: cfg.limit_test], ds.num_classes, ds.mean, ds.std,
                     ds.scale, ds.augment)
    return ds


# ---------------------------------------------------------------------------------------------
# augmentation and per-peer streams


def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """CIFAR augmentation on a batch: zero-pad by `pad`, random crop back, random horizontal flip.
    Random numbers come from CPU generator `g` so the result does not depend on the device."""
    b, c, h, w = x.shape
    di = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
    dj = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
    flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = di[:, None] + torch.arange(h, device=x.device)  # B, H
    cols = dj[:, None] + torch.arange(w, device=x.device)  # B, W
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class PeerData:
    """One peer's view of a dataset: its training shard on its device, its batch order and augmentation.

    `order_seed` fixes the batch order (shared by all peers in logits mode); `aug_seed` is the peer's own.
    Sample ids returned by `batch` are indices into the full training set.
    """

    def __init__(self, ds: Dataset, cfg: DataConfig, *, order_seed: int, aug_seed: int,
                 shard_index: int = 0, num_shards: int = 1, device: torch.device | str = "cpu"):
        self.ds = ds
        self.batch_size = cfg.batch_size
        self.eval_batch_size = cfg.eval_batch_size
        self.order_seed = order_seed
        self.aug_seed = aug_seed
        self.augment = ds.augment if cfg.augment is None else cfg.augment
        self.device = torch.device(device)
        n = len(ds.train_y)
        if num_shards > 1:  # Anil et al.: peers train on disjoint parts of the training set
            self.sample_ids = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(order_seed, 7)))
            self.sample_ids = self.sample_ids[shard_index::num_shards].sort().values
        else:
            self.sample_ids = torch.arange(n)
        if len(self.sample_ids) < self.batch_size:
            raise ValueError(f"data.batch_size: got {self.batch_size}; allowed: at most the shard size "
                             f"{len(self.sample_ids)} of peer shard {shard_index}")
        self.train_x = ds.train_x[self.sample_ids].to(self.device)
        self.train_y = ds.train_y[self.sample_ids].to(self.device)
        self.test_x = ds.test_x.to(self.device)
        self.test_y = ds.test_y.to(self.device)
        self._mean = torch.tensor(ds.mean, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(ds.std, device=self.device).view(1, -1, 1, 1)
        self._perms: dict[int, torch.Tensor] = {}  # epoch -> order; two kept (lookahead crosses epochs)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sample_ids) // self.batch_size  # the last partial batch is dropped

    def positions(self, step: int) -> torch.Tensor:
        """Positions (within this shard) of the batch at `step`: a pure function of (order_seed, step)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(mix_seed(self.order_seed, epoch))
            perm = self._perms[epoch] = torch.randperm(len(self.sample_ids), generator=g)
            for old in sorted(self._perms)[:-2]:
                del self._perms[old]
        return perm[k * self.batch_size:(k + 1) * self.batch_size]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.ds.scale - self._mean) / self._std

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample_ids, x, y) for `step`; x normalised and augmented with the peer's own randomness."""
        pos = self.positions(step)
        pos_dev = pos.to(self.device)
        x = self.normalize(self.train_x[pos_dev])
        if self.augment:
            x = random_crop_flip(x, torch.Generator().manual_seed(mix_seed(self.aug_seed, step)))
        return self.sample_ids[pos], x, self.train_y[pos_dev]

    def test_batches(self):
        for i in range(0, len(self.test_y), self.eval_batch_size):
            yield self.normalize(self.test_x[i:i + self.eval_batch_size]), self.test_y[i:i + self.eval_batch_size]
