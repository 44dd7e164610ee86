"""CIFAR-10/100 in the official "python version" layout: pickled dicts of numpy arrays.

A pickle runs whatever code it names, so a crafted batch in `data.root` would run in every process
that reads it. The official files are verified by their MD5 (the checksums torchvision publishes);
any other file (a mirror, a test's own) is read by an unpickler that allows only the containers and
arrays the format holds, and anything else is refused with one line. No ray, no mlflow.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codistill.errors import ConfigError

__all__ = ["OFFICIAL_MD5", "SafeUnpickler", "read_cifar_batches"]

OFFICIAL_MD5 = {  # torchvision.datasets.CIFAR10/CIFAR100 train_list and test_list
    "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
    "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
}

# What numpy needs to rebuild an array (old and new module paths, pickle protocols 2 to 5).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # protocol 2 pickles of bytes made by Python 2 (the official files)
}


class SafeUnpickler(pickle.Unpickler):
    """Dicts, lists, strings, numbers and numpy arrays; nothing that runs code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")


MAX_BATCH_BYTES = 1 << 30
"""The official batches are 31 MB (CIFAR-10) and 155 MB (CIFAR-100 train); anything past this is refused."""


def _read_once(path: Path) -> bytes:
    """The file's bytes from one open: what is hashed is what is loaded (a file swapped between a check and a
    second open cannot slip through)."""
    with open(path, "rb") as f:
        data = f.read(MAX_BATCH_BYTES + 1)
    if len(data) > MAX_BATCH_BYTES:
        raise ConfigError("data.root", message=f"{path} is larger than {MAX_BATCH_BYTES:,} bytes: not a CIFAR batch")
    return data


def _load(path: Path) -> dict:
    key = f"{path.parent.name}/{path.name}"
    data = _read_once(path)
    if OFFICIAL_MD5.get(key) == hashlib.md5(data).hexdigest():
        return pickle.loads(data, encoding="latin1")  # the official file, byte for byte
    try:
        entry = SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError("data.root", message=f"{path} is not a CIFAR python-version batch: {e}") from None
    if not isinstance(entry, dict):
        raise ConfigError("data.root", message=f"{path} holds a {type(entry).__name__}, not a CIFAR batch (a dict)")
    return entry


def read_cifar_batches(files: list[Path], label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of the batches in `files`, labels checked."""
    xs, ys = [], []
    for f in files:
        entry = _load(f)
        try:
            x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(entry[label_key], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError("data.root", message=f"{f}: not the CIFAR layout (data, {label_key}): {e}") from None
        if len(x) != len(y):
            raise ConfigError("data.root", message=f"{f}: {len(x)} images but {len(y)} labels")
        bad = np.flatnonzero((y < 0) | (y >= num_classes))
        if len(bad):
            raise ConfigError("data.root", message=f"{f}: label {int(y[bad[0]])} is outside [0, {num_classes})")
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
