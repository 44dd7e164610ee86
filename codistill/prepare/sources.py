"""What a prepare reads: the job's sources listed, fingerprinted and cut into chunks, one shard each. No ray.

A chunk is a plain dict (it travels to Ray Data's workers) naming its split, its shard index and what to read:
- `lines`: bytes [start, end) of a text or JSON-lines file, by lines (a line belongs to the chunk its first byte
  is in, so chunks cut anywhere neither lose nor repeat a line); `header` is written before it (a folder's
  file header, as the in-memory text loader writes it);
- `table`: rows [start, end) of one row group of a Parquet file, or of an Arrow file (text column);
- `image_table`: rows [start, end) of one row group of a Hugging Face image Parquet file;
- `image_files`: a list of (image path, label) of an image folder (`class/xxx.jpg`).

Without `data.test`, text holds out the last `data.val_fraction` of each kind of unit (bytes of text files,
rows of tables), cut inside the unit that crosses it; images need a test source.
"""

from __future__ import annotations

from pathlib import Path

from codistill.config import DataConfig
from codistill.data.chat import is_chat_source
from codistill.data.sources import (
    TABLE_SUFFIXES,
    TEXT_SUFFIXES,
    cut_image_units,
    fingerprint,
    image_shape,
    image_source,
    list_files,
)
from codistill.data.sources import (
    table_units as row_groups,
)
from codistill.errors import ConfigError

__all__ = ["plan_images", "plan_text"]


def _cut(total: int, fraction: float) -> int:
    return round(total * (1 - fraction))


def plan_text(cfg: DataConfig, shard_bytes: int) -> tuple[list[dict], dict[str, list[dict]]]:
    """(chunks of both splits, numbered per split; {split: source fingerprints}) for a text job."""
    if cfg.train is None:
        raise ConfigError("data.train", None, "the corpus to prepare (a file, folder or glob)")
    pieces: dict[str, list[dict]] = {"train": [], "test": []}
    sources: dict[str, list[dict]] = {}
    plans = [("train", cfg.train, "data.train")] + ([("test", cfg.test, "data.test")] if cfg.test else [])
    for split, location, field in plans:
        root, files = list_files(location, field, TEXT_SUFFIXES)
        for p in files:
            if is_chat_source(str(p), cfg, field):  # a chat row is a conversation with its own labels, not a stream
                raise ConfigError(
                    field,
                    message=f"{p} is a chat corpus ({cfg.messages_column!r} rows): prepare writes token streams; "
                    "train on it without a prepare (data.name text reads it in memory)",
                )
        sources[split] = [fingerprint(p) for p in files]
        line_units: list[tuple[Path, str, int]] = []  # (file, header, bytes read)
        table_units: list[tuple[Path, int, int]] = []  # (file, row group, rows)
        budget = cfg.max_chars  # bytes of text read per source (the in-memory loader's characters)
        for p in files:
            if p.suffix.lower() in TABLE_SUFFIXES:
                table_units.extend((p, g, rows) for g, rows in row_groups(p, field))
                continue
            size = p.stat().st_size if budget is None else min(p.stat().st_size, budget)
            header = f"# ---- {p.relative_to(root).as_posix()} ----\n" if len(files) > 1 else ""
            if size > 0:
                line_units.append((p, header, size))
            if budget is not None:
                budget -= size
                if budget <= 0:
                    break
        # the training source also gives the test split (its last val_fraction) when there is no test source
        hold_out = split == "train" and not cfg.test
        total = sum(size for _, _, size in line_units)
        cut = _cut(total, cfg.val_fraction) if hold_out else total
        offset = 0
        for p, header, size in line_units:
            mid = min(size, max(0, cut - offset))  # bytes before mid go to `split`, the rest to test
            for target, lo, hi in ((split, 0, mid), ("test", mid, size)):
                for a in range(lo, hi, shard_bytes):
                    b = min(hi, a + shard_bytes)
                    pieces[target].append(
                        {"kind": "lines", "path": str(p), "header": header if a == 0 else "", "start": a, "end": b}
                    )
            offset += size
        rows_total = sum(rows for _, _, rows in table_units)
        cut = _cut(rows_total, cfg.val_fraction) if hold_out else rows_total
        offset = 0
        for p, group, rows in table_units:
            mid = min(rows, max(0, cut - offset))
            for target, lo, hi in ((split, 0, mid), ("test", mid, rows)):
                if hi > lo:
                    pieces[target].append(
                        {
                            "kind": "table",
                            "path": str(p),
                            "group": group,
                            "start": lo,
                            "end": hi,
                            "column": cfg.text_column,
                        }
                    )
            offset += rows
    return _numbered(pieces, "data.val_fraction" if not cfg.test else "data.test", "text"), sources


def _numbered(pieces: dict[str, list[dict]], test_field: str, what: str) -> list[dict]:
    for split in ("train", "test"):
        if not pieces[split]:
            raise ConfigError(
                "data.train" if split == "train" else test_field,
                message=f"the {split} split of the prepared data would hold no {what}",
            )
    return [{**c, "split": split, "index": i} for split in ("train", "test") for i, c in enumerate(pieces[split])]


def plan_images(
    cfg: DataConfig, shard_bytes: int
) -> tuple[list[dict], dict[str, list[dict]], list[str] | None, tuple[int, int, int]]:
    """(chunks of both splits, {split: source fingerprints}, class names of an image folder or None, the image
    shape (C, H, W) that `shape_of` gives for the first training unit; it sets how many images a shard holds)."""
    if cfg.train is None or cfg.test is None:
        field = "data.train" if cfg.train is None else "data.test"
        raise ConfigError(field, None, "a Hugging Face image Parquet file or folder, or a folder of class folders")
    train, train_sources, names = image_source(cfg.train, "data.train", None)
    test, test_sources, _ = image_source(cfg.test, "data.test", names)
    if not train:
        raise ConfigError("data.train", message=f"{cfg.train} holds no images")
    shape = image_shape(train[0], cfg.image_size)
    shard_images = max(1, shard_bytes // (shape[0] * shape[1] * shape[2]))
    pieces = {"train": cut_image_units(train, shard_images), "test": cut_image_units(test, shard_images)}
    return _numbered(pieces, "data.test", "images"), {"train": train_sources, "test": test_sources}, names, shape
