"""A whole dataset held in memory, and the seed mixing every stream derives from. No ray, no mlflow."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["Dataset", "Rows", "as_tensor", "channel_stats", "mix_seed"]


class Rows(Protocol):
    """What a dataset's arrays are: a tensor held in memory, or rows of prepared shards read when indexed
    (codistill.data.shards) -- the subset of a tensor that datasets use."""

    @property
    def shape(self) -> Any: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...

    def to(self, device: Any) -> Any: ...

    def numpy(self) -> np.ndarray: ...


@dataclass(frozen=True)
class Dataset:
    """Images are (N, C, H, W); uint8 images are scaled by `scale` before normalisation.

    `task` names how batches become inputs and targets (codistill.tasks.TASKS). For `causal_lm`, `train_x`
    and `test_x` are int64 token windows (N, block_size + 1) (a model reads [:, :-1] and predicts [:, 1:]),
    `train_y`/`test_y` are zeros (N,) -- or, for a chat corpus, int64 labels (N, block_size) that replace
    [:, 1:], -100 where no loss counts (codistill.data.chat) --, `num_classes` is the vocabulary size, and `meta`
    says what the text and the tokenizer were (`tokenizer`, `vocab_size`, `corpus_sha256`, `tokenizer_json`, ...).
    """

    name: str
    train_x: Rows
    train_y: Rows  # int64 (N,); a chat corpus: (N, block_size)
    test_x: Rows
    test_y: Rows
    num_classes: int
    mean: tuple[float, ...]  # per channel, after scaling to [0, 1]
    std: tuple[float, ...]
    scale: float = 1.0 / 255  # raw value -> [0, 1]
    augment: bool = False  # default training augmentation (random crop 4 + flip)
    task: str = "classification"
    meta: dict = field(default_factory=dict)  # plain values only (it travels with the arrays)
    train_y_clean: Rows | None = None  # data.label_noise: the labels before the noise (train_y holds the noisy ones)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def test_labels(self) -> torch.Tensor:
        """The evaluation set's targets as one tensor (what the ensemble's numbers are scored against)."""
        return self.test_y[: len(self.test_y)]

    @property
    def lazy(self) -> bool:
        """Rows read from prepared shards when a batch needs them (not held in memory)."""
        return not isinstance(self.train_x, torch.Tensor)

    def to_arrays(self) -> dict:
        """The dataset as numpy arrays and plain values: what travels through Ray's object store
        (numpy comes out zero-copy; torch tensors would be copied by every reader)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.numpy() if isinstance(value, torch.Tensor) else value
        return out

    @classmethod
    def from_arrays(cls, arrays: dict) -> Dataset:
        values: dict[str, Any] = {k: as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
        return cls(**values)

    def limited(self, limit_train: int | None, limit_test: int | None) -> Dataset:
        """The first `limit_train` training and `limit_test` test examples (None = all)."""
        if limit_train is None and limit_test is None:
            return self
        clean = self.train_y_clean
        return replace(
            self,
            train_x=_head(self.train_x, limit_train),
            train_y=_head(self.train_y, limit_train),
            test_x=_head(self.test_x, limit_test),
            test_y=_head(self.test_y, limit_test),
            train_y_clean=None if clean is None else _head(clean, limit_train),
        )


def _head(rows: Rows, n: int | None) -> Rows:
    """The first `n` rows; prepared rows stay lazy."""
    head = getattr(rows, "head", None)
    return head(n) if head is not None else rows[:n]


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over a numpy array without a copy. Arrays out of Ray's object store are read-only
    views: we never write to them (PyTorch warns that it cannot tell)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(a)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across processes, unlike hash() of str)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def channel_stats(x: torch.Tensor, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of (N, C, H, W) images after scaling."""
    xf = x.double() * scale
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist())
