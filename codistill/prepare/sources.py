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

import glob
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codistill.config import DataConfig
from codistill.errors import ConfigError

__all__ = ["IMAGE_SUFFIXES", "TEXT_SUFFIXES", "fingerprint", "plan_images", "plan_text"]

LINE_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
TEXT_SUFFIXES = LINE_SUFFIXES + TABLE_SUFFIXES
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
EDGE = 1 << 20  # bytes hashed at each end of a file for its fingerprint


def fingerprint(path: Path) -> dict[str, Any]:
    """A file's identity for `re-running is a no-op`: path, size, mtime and a hash of its first and last MiB
    (a changed file changes at least one; hashing terabytes on every run would not be a no-op)."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(EDGE))
        if st.st_size > EDGE:
            f.seek(max(EDGE, st.st_size - EDGE))
            h.update(f.read(EDGE))
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges_sha256": h.hexdigest()}


def _files(location: str, field: str, suffixes: tuple[str, ...]) -> tuple[Path, list[Path]]:
    """(root, files): a file, a folder's files with `suffixes` (recursive, sorted by relative path, hidden
    skipped) or a glob's matches (sorted)."""
    if any(c in location for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(location), recursive=True))
        files = [p for p in found if p.is_file()]
        if not files:
            raise ConfigError(field, location, "a glob that matches files")
        return Path(os.path.commonpath([str(p.parent) for p in files])), files
    path = Path(location).expanduser()
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise ConfigError(field, location, "an existing file, folder or glob (prepare reads local sources)")
    files = []
    for folder, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        files.extend(Path(folder) / n for n in names if n.lower().endswith(suffixes) and not n.startswith("."))
    if not files:
        raise ConfigError(field, message=f"{location} has no {'/'.join(suffixes)} files")
    return path, sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _table_units(path: Path, field: str) -> list[tuple[int, int]]:
    """(row group, rows) of a Parquet file; one unit (-1, rows) for an Arrow file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            md = pq.ParquetFile(path).metadata
            return [(g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        with pa.memory_map(str(path)) as source:
            try:
                return [(-1, pa.ipc.open_file(source).read_all().num_rows)]
            except pa.ArrowInvalid:
                source.seek(0)
                return [(-1, pa.ipc.open_stream(source).read_all().num_rows)]
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(field, message=f"cannot read {path} as {path.suffix[1:]} ({e})") from None


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
        root, files = _files(location, field, TEXT_SUFFIXES)
        sources[split] = [fingerprint(p) for p in files]
        line_units: list[tuple[Path, str, int]] = []  # (file, header, bytes read)
        table_units: list[tuple[Path, int, int]] = []  # (file, row group, rows)
        budget = cfg.max_chars  # bytes of text read per source (the in-memory loader's characters)
        for p in files:
            if p.suffix.lower() in TABLE_SUFFIXES:
                table_units.extend((p, g, rows) for g, rows in _table_units(p, field))
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


def _image_source(
    location: str, field: str, class_names: list[str] | None
) -> tuple[list[dict], list[dict], list[str] | None]:
    """(units, fingerprints, class names of a folder) of one image source: Hugging Face Parquet file(s) (a unit
    per row group) or a folder of class folders (one unit of every image); `_cut_units` makes them chunks."""
    path = Path(location).expanduser()
    if path.is_dir() and not any(path.glob("*.parquet")):
        names = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not names:
            raise ConfigError(field, message=f"{location} has neither Parquet files nor class folders (class/xxx.jpg)")
        if class_names is not None:  # the test folder labels by the training folder's classes
            unknown = sorted(set(names) - set(class_names))
            if unknown:
                raise ConfigError(field, message=f"{location} has class folders the training set lacks: {unknown[:5]}")
            names = class_names
        items: list[tuple[str, int]] = []
        for label, name in enumerate(names):
            folder = path / name
            if folder.is_dir():
                items.extend(
                    (str(f), label)
                    for f in sorted(folder.rglob("*"))
                    if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
                )
        # a folder's fingerprint: its file list and sizes (hashing every image would read the whole set)
        h = hashlib.sha256("\n".join(f"{f}|{os.path.getsize(f)}" for f, _ in items).encode())
        units: list[dict[str, Any]] = [{"kind": "image_files", "items": items}] if items else []
        return units, [{"path": str(path), "files": len(items), "list_sha256": h.hexdigest()}], names
    _, files = _files(location, field, (".parquet",))
    units = [
        {"kind": "image_table", "path": str(p), "group": group, "start": 0, "end": rows}
        for p in files
        for group, rows in _table_units(p, field)
    ]
    return units, [fingerprint(p) for p in files], None


def _cut_units(units: list[dict], shard_images: int) -> list[dict]:
    """Chunks of at most `shard_images` images: row ranges of a row group, or runs of a folder's files."""
    chunks: list[dict[str, Any]] = []
    for u in units:
        if u["kind"] == "image_files":
            items = u["items"]
            chunks.extend({**u, "items": items[a : a + shard_images]} for a in range(0, len(items), shard_images))
        else:
            chunks.extend(
                {**u, "start": a, "end": min(u["end"], a + shard_images)} for a in range(0, u["end"], shard_images)
            )
    return chunks


def plan_images(
    cfg: DataConfig, shard_bytes: int, shape_of: Callable[[dict], tuple[int, int, int]]
) -> tuple[list[dict], dict[str, list[dict]], list[str] | None, tuple[int, int, int]]:
    """(chunks of both splits, {split: source fingerprints}, class names of an image folder or None, the image
    shape (C, H, W) that `shape_of` gives for the first training unit; it sets how many images a shard holds)."""
    if cfg.train is None or cfg.test is None:
        field = "data.train" if cfg.train is None else "data.test"
        raise ConfigError(field, None, "a Hugging Face image Parquet file or folder, or a folder of class folders")
    train, train_sources, names = _image_source(cfg.train, "data.train", None)
    test, test_sources, _ = _image_source(cfg.test, "data.test", names)
    if not train:
        raise ConfigError("data.train", message=f"{cfg.train} holds no images")
    shape = shape_of(train[0])
    shard_images = max(1, shard_bytes // (shape[0] * shape[1] * shape[2]))
    pieces = {"train": _cut_units(train, shard_images), "test": _cut_units(test, shard_images)}
    return _numbered(pieces, "data.test", "images"), {"train": train_sources, "test": test_sources}, names, shape
