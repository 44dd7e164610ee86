"""Training sets for the small-data and noisy-label regimes: a class-balanced subset (`data.limit_balanced`) and
symmetric label noise (`data.label_noise`). Both are drawn from their own seeds (`data.subset_seed`,
`data.noise_seed`), never from the run's seed, so every arm and every seed of an experiment trains on the same
examples with the same wrong labels; test labels are never touched.

Symmetric noise as in the noisy-label literature the regimes come from (co-teaching, Han et al., NeurIPS 2018;
JoCoR, Wei et al., CVPR 2020): a fraction p of the training labels, chosen uniformly, each moved to a class drawn
uniformly from the *other* K - 1 classes (so exactly round(p N) labels are wrong). No ray, no mlflow.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch

from codistill.config import DataConfig
from codistill.data.dataset import Dataset
from codistill.errors import ConfigError

__all__ = ["apply_training_options", "balanced_rows", "flip_labels", "subset_meta"]


def balanced_rows(labels: np.ndarray, size: int, num_classes: int, seed: int, where: str = "") -> np.ndarray:
    """`size` row indices (sorted) drawn without replacement with the classes as equal as `size` allows: size // K
    of each class and one more of the first size % K classes. Raises ConfigError when a class has too few rows."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    quota = np.full(num_classes, size // num_classes, dtype=np.int64)
    quota[: size % num_classes] += 1
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    short = np.flatnonzero(counts < quota)
    if size > len(labels) or len(short):
        c = int(short[0]) if len(short) else 0
        raise ConfigError(
            "data.limit_train",
            size,
            f"at most what a class-balanced draw can take{where}: class {c} has {int(counts[c])} rows, "
            f"{int(quota[c])} wanted (lower data.limit_train or set data.limit_balanced: false)",
        )
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), int(quota[c]), replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def flip_labels(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped rows sorted): round(rate N) rows drawn uniformly, each moved to a uniformly drawn
    other class."""
    labels = np.asarray(labels).astype(np.int64)
    n = len(labels)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, round(rate * n), replace=False))
    noisy = labels.copy()
    noisy[rows] = (labels[rows] + rng.integers(1, num_classes, size=len(rows))) % num_classes  # never itself
    return noisy, rows


def _sha256(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


def subset_meta(source_rows: np.ndarray, labels: np.ndarray, num_classes: int, seed: int) -> dict:
    """What summary.json says about a balanced subset: its size, seed, examples per class and source rows."""
    return {
        "size": len(source_rows),
        "balanced": True,
        "seed": seed,
        "per_class": np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist(),
        "source_rows": [int(r) for r in source_rows],
        "source_rows_sha256": _sha256(source_rows),
    }


def apply_training_options(ds: Dataset, cfg: DataConfig) -> Dataset:
    """The dataset as the job trains on it: the balanced subset (unless the loader drew it while reading), the
    first `limit_train` / `limit_test` examples, then the label noise."""
    if not cfg.limit_balanced and cfg.label_noise == 0:
        return ds.limited(cfg.limit_train, cfg.limit_test)
    option = "limit_balanced" if cfg.limit_balanced else "label_noise"
    value = cfg.limit_balanced if cfg.limit_balanced else cfg.label_noise
    if ds.task != "classification":
        raise ConfigError(f"data.{option}", value, f"false / 0 for a {ds.task} dataset (classification only)")
    if ds.lazy:
        raise ConfigError(
            f"data.{option}",
            value,
            "false / 0 with a prepared folder (its rows are read from disk as batches need them); point data.train "
            "at the source instead",
        )
    if cfg.limit_balanced and "subset" not in ds.meta:  # the Parquet reader draws it before decoding
        assert cfg.limit_train is not None  # DataConfig checks it
        rows = balanced_rows(ds.train_y.numpy(), cfg.limit_train, ds.num_classes, cfg.subset_seed)
        index = torch.from_numpy(rows)
        meta = {**ds.meta, "subset": subset_meta(rows, ds.train_y[index].numpy(), ds.num_classes, cfg.subset_seed)}
        ds = dataclasses.replace(ds, train_x=ds.train_x[index], train_y=ds.train_y[index], meta=meta)
    ds = ds.limited(cfg.limit_train, cfg.limit_test)
    if cfg.label_noise == 0:
        return ds
    clean = ds.train_y
    noisy, flipped = flip_labels(clean.numpy(), cfg.label_noise, ds.num_classes, cfg.noise_seed)
    subset = ds.meta.get("subset")
    source = np.asarray(subset["source_rows"]) if subset else np.arange(len(noisy))
    noise = {
        "rate": cfg.label_noise,
        "seed": cfg.noise_seed,
        "flipped": len(flipped),
        "of": len(noisy),
        "rows": [int(r) for r in flipped],  # indices into the training set trained on
        "source_rows": [int(r) for r in source[flipped]],  # rows of the source file
        "rows_sha256": _sha256(flipped),
    }
    return dataclasses.replace(
        ds, train_y=torch.from_numpy(noisy), train_y_clean=clean, meta={**ds.meta, "label_noise": noise}
    )
