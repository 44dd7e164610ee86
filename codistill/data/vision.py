"""Image datasets: scikit-learn's digits, torchvision's MNIST family and CIFAR, Parquet in the
Hugging Face image layout, and a synthetic set for tests. Each loader is `(DataConfig) -> Dataset`;
the registry is `codistill.data.DATASETS`. No ray, no mlflow.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from codistill.config import DataConfig
from codistill.data.budget import DecodeBudget
from codistill.data.cifar import read_cifar_batches
from codistill.data.dataset import Dataset, channel_stats
from codistill.data.parquet_images import check_labels, infer_classes, read_image_parquet
from codistill.data.subsets import balanced_rows, subset_meta
from codistill.errors import ConfigError

__all__ = ["digits", "parquet", "synthetic", "torchvision_cifar", "torchvision_mnist_like"]


def digits(cfg: DataConfig) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), fixed 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1)  # N, 1, 8, 8 with values 0..16
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    mean, std = channel_stats(x[train], 1 / 16)
    return Dataset("digits", x[train], y[train], x[test], y[test], 10, mean, std, scale=1 / 16)


def synthetic(cfg: DataConfig) -> Dataset:
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


def _missing(name: str, where: Path, how: str) -> ConfigError:
    root = where.parent if where.name else where
    return ConfigError(
        "data.root",
        message=f"{name} files not found under {where} (data.root={root}). {how} Or set data.download=true "
        f"(needs internet) or point data.root at a folder that has them.",
    )


def torchvision_mnist_like(name: str, cls_name: str, folder: str) -> Callable[[DataConfig], Dataset]:
    def load(cfg: DataConfig) -> Dataset:
        import torchvision

        root = Path(os.path.expanduser(cfg.root))
        cls = getattr(torchvision.datasets, cls_name)
        try:
            train = cls(str(root), train=True, download=cfg.download)
            test = cls(str(root), train=False, download=cfg.download)
        except RuntimeError as e:
            raise _missing(
                name,
                root / folder / "raw",
                f"Expected the idx files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte ({e}).",
            ) from None
        xtr, xte = train.data.unsqueeze(1).contiguous(), test.data.unsqueeze(1).contiguous()  # uint8 N,1,28,28
        mean, std = channel_stats(xtr[:10000], 1 / 255)
        return Dataset(name, xtr, train.targets.long(), xte, test.targets.long(), 10, mean, std)

    return load


def torchvision_cifar(
    name: str,
    cls_name: str,
    folder: str,
    train_files: list[str],
    test_files: list[str],
    label_key: str,
    num_classes: int,
) -> Callable[[DataConfig], Dataset]:
    def load(cfg: DataConfig) -> Dataset:
        root = Path(os.path.expanduser(cfg.root))
        base = root / folder
        if cfg.download:
            import torchvision

            getattr(torchvision.datasets, cls_name)(str(root), train=True, download=True)
        # Read the python-version batches ourselves: the official files by their checksum, any other by an
        # unpickler that runs no code (torchvision's own classes refuse anything but the official bytes).
        missing = [f for f in train_files + test_files if not (base / f).exists()]
        if missing:
            raise _missing(name, base, f"Missing {', '.join(missing)} (the CIFAR 'python version' archive, extracted).")
        xtr, ytr = read_cifar_batches([base / f for f in train_files], label_key, num_classes)
        xte, yte = read_cifar_batches([base / f for f in test_files], label_key, num_classes)
        mean, std = channel_stats(xtr[:10000], 1 / 255)
        return Dataset(name, xtr, ytr, xte, yte, num_classes, mean, std, augment=True)

    return load


def parquet(cfg: DataConfig) -> Dataset:
    """Images in Parquet (Hugging Face layout), checked as they are read (codistill.data.parquet_images)."""
    splits = {}
    budget = DecodeBudget(cfg.max_decoded_bytes)  # both splits together
    drawn: list[np.ndarray] = []  # data.limit_balanced: the training rows drawn (only they are decoded)

    def balanced(labels: np.ndarray, declared: int | None) -> np.ndarray:
        assert cfg.limit_train is not None  # DataConfig checks it
        k = declared or cfg.num_classes or infer_classes(labels, "data.train", str(cfg.train))
        check_labels(labels, k, "data.train", str(cfg.train))
        drawn.append(balanced_rows(labels, cfg.limit_train, k, cfg.subset_seed, f" from {cfg.train}"))
        return drawn[-1]

    for split, path, limit in (("train", cfg.train, cfg.limit_train), ("test", cfg.test, cfg.limit_test)):
        if path is None:
            raise ConfigError(f"data.{split}", None, "the path of a Parquet file when data.name is parquet")
        choose = balanced if split == "train" and cfg.limit_balanced else None
        splits[split] = read_image_parquet(str(path), f"data.{split}", limit, budget, choose)
    (xtr, ytr, declared_tr), (xte, yte, declared_te) = splits["train"], splits["test"]
    if xtr.shape[1:] != xte.shape[1:]:
        raise ConfigError("data.test", message=f"test images are {tuple(xte.shape[1:])}, train {tuple(xtr.shape[1:])}")
    num_classes = declared_tr or declared_te or cfg.num_classes
    if num_classes is None:
        num_classes = infer_classes(np.concatenate([ytr, yte]), "data.train", f"{cfg.train} and {cfg.test}")
    check_labels(ytr, num_classes, "data.train", str(cfg.train))
    check_labels(yte, num_classes, "data.test", str(cfg.test))
    mean, std = channel_stats(xtr[:10000], 1 / 255)
    augment = xtr.shape[1] == 3  # colour images: CIFAR-style crop + flip; digits/clothes: none
    name = Path(str(cfg.train)).parent.name or "parquet"
    meta = {"subset": subset_meta(drawn[0], ytr, num_classes, cfg.subset_seed)} if drawn else {}
    return Dataset(
        name, xtr, torch.from_numpy(ytr), xte, torch.from_numpy(yte), num_classes, mean, std, augment=augment, meta=meta
    )
