"""Datasets as in-memory tensors, per-peer shards and deterministic batch order.

Prepared data (codistill.data.prepared) is read lazily from its shards instead.

Registry: DATASETS maps a name to a loader `(DataConfig) -> Dataset`; adding a dataset is one
function and one entry here. Small datasets live on the peer's device as tensors (uint8 images are
normalised per batch), so no DataLoader workers are needed. This package imports neither ray nor
mlflow.
"""

from __future__ import annotations

from collections.abc import Callable

from codistill.config import DataConfig
from codistill.data import prepared, streamed, text, vision
from codistill.data.dataset import Dataset, channel_stats, mix_seed
from codistill.data.order import random_crop_flip
from codistill.data.shards import PreparedFolder
from codistill.data.subsets import apply_training_options
from codistill.data.tokenizers import TOKENIZERS
from codistill.errors import ConfigError
from codistill.registry import Registry

__all__ = [
    "DATASETS",
    "TOKENIZERS",
    "Dataset",
    "channel_stats",
    "load_dataset",
    "mix_seed",
    "random_crop_flip",
]

DATASETS: Registry[Callable[[DataConfig], Dataset]] = Registry(
    "dataset",
    {
        "digits": vision.digits,
        "synthetic": vision.synthetic,
        "mnist": vision.torchvision_mnist_like("mnist", "MNIST", "MNIST"),
        "fashion_mnist": vision.torchvision_mnist_like("fashion_mnist", "FashionMNIST", "FashionMNIST"),
        "cifar10": vision.torchvision_cifar(
            "cifar10",
            "CIFAR10",
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            "labels",
            10,
        ),
        "cifar100": vision.torchvision_cifar(
            "cifar100", "CIFAR100", "cifar-100-python", ["train"], ["test"], "fine_labels", 100
        ),
        "parquet": vision.parquet,
        "text": text.text,
        "prepared": prepared.prepared,
    },
)


def load_dataset(cfg: DataConfig) -> Dataset:
    # a prepared folder (python -m codistill.prepare) is read the same way whatever source it was made from
    holds_manifest = PreparedFolder.holds_manifest(cfg.train)
    if cfg.loader == "ray_data":  # images decoded from their sources as batches need them
        if holds_manifest:
            raise ConfigError(
                "data.loader",
                cfg.loader,
                f"'auto' for the prepared folder {cfg.train} (its images are decoded already; ray_data streams "
                "image sources)",
            )
        loader: Callable[[DataConfig], Dataset] = streamed.streamed_images
    else:
        loader = prepared.prepared if holds_manifest else DATASETS.get_entry(cfg.name, "data.name")
    return apply_training_options(loader(cfg), cfg)
