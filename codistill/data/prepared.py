"""The `prepared` dataset: a folder written by `python -m codistill.prepare`, read lazily (codistill.data.shards).

`data.train` names the folder (a local path or a `pyarrow.fs` URI); `data.name: prepared`, or `text` / `parquet`
with `data.train` pointing at a prepared folder, reads it. The folder is checked before anything starts (every
shard present with its size and checksum; the job's tokenizer is the one the shards were made with); then the
rows stay on disk and each batch reads its own. No ray, no mlflow.
"""

from __future__ import annotations

from pathlib import Path

from codistill.config import DataConfig
from codistill.data.dataset import Dataset
from codistill.data.shards import PreparedFolder, TokenWindows, ZeroRows, image_rows, label_rows
from codistill.data.text import language_model_dataset
from codistill.errors import ConfigError

__all__ = ["prepared"]


def _check_tokenizer(cfg: DataConfig, tokenizer: dict, where: str) -> None:
    name = tokenizer.get("name")
    if cfg.tokenizer != name:
        raise ConfigError(
            "data.tokenizer",
            cfg.tokenizer,
            f"{name!r}, the tokenizer {where} was prepared with (or prepare it again with this one)",
        )
    if name == "bpe" and cfg.vocab_size != tokenizer.get("vocab_size"):
        raise ConfigError(
            "data.vocab_size",
            cfg.vocab_size,
            f"{tokenizer.get('vocab_size')}, the BPE vocabulary {where} was prepared with",
        )


def prepared(cfg: DataConfig) -> Dataset:
    if cfg.train is None:
        raise ConfigError("data.train", None, "a folder written by python -m codistill.prepare")
    if cfg.test is not None and cfg.test != cfg.train:
        raise ConfigError("data.test", cfg.test, f"null: the prepared folder {cfg.train} holds its own test split")
    folder = PreparedFolder(cfg.train)
    m = folder.manifest
    folder.verify(checksums=True)
    name = Path(folder.location.split("://")[-1]).name or "prepared"
    if m.kind == "tokens":
        _check_tokenizer(cfg, m.tokenizer, folder.location)
        T = cfg.block_size
        train, test = TokenWindows(folder, "train", T), TokenWindows(folder, "test", T)
        for split, rows in (("train", train), ("test", test)):
            if len(rows) == 0:
                raise ConfigError(
                    "data.block_size",
                    T,
                    f"at most {m.splits[split].count - 1}: the prepared {split} split of {folder.location} has "
                    f"{m.splits[split].count} tokens, not one window of block_size + 1",
                )
        vocab_size = int(m.tokenizer["vocab_size"])
        meta = {
            "source": folder.location,
            "prepared": folder.location,
            "corpus_sha256": m.key,
            "tokenizer": m.tokenizer["name"],
            "vocab_size": vocab_size,
            "num_train_tokens": m.splits["train"].count,
            "num_test_tokens": m.splits["test"].count,
            "tokenizer_json": m.tokenizer.get("json"),
            "block_size": T,
        }
        return language_model_dataset(name, train, ZeroRows(len(train)), test, ZeroRows(len(test)), vocab_size, meta)
    for split in ("train", "test"):
        if m.splits[split].count == 0:
            raise ConfigError("data.train", message=f"the prepared {split} split of {folder.location} has no images")
    return Dataset(
        name,
        image_rows(folder, "train"),
        label_rows(folder, "train"),
        image_rows(folder, "test"),
        label_rows(folder, "test"),
        m.num_classes,
        m.mean,
        m.std,
        augment=m.shape[0] == 3,  # colour images: CIFAR-style crop + flip, as the Parquet loader decides
    )
