"""The files a dataset is read from: listed (a file, a folder, a glob), fingerprinted, cut into row groups; image
sources (Hugging Face image Parquet, or a folder of class folders) listed as units and decoded. Used by
`python -m codistill.prepare` (one chunk per shard) and by the streamed image loader (`data.loader: ray_data`). No ray.

A unit or chunk of images is a plain dict (it travels to Ray Data's workers):
- `image_table`: rows [start, end) of one row group of a Hugging Face image Parquet file;
- `image_files`: a list of (image path, label) of an image folder (`class/xxx.jpg`).
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from codistill.errors import CodistillError, ConfigError

__all__ = [
    "IMAGE_SUFFIXES",
    "LINE_SUFFIXES",
    "TABLE_SUFFIXES",
    "TEXT_SUFFIXES",
    "SourceError",
    "cut_image_units",
    "decode_images",
    "fingerprint",
    "image_shape",
    "image_source",
    "list_files",
    "open_image",
    "table_units",
]

LINE_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
TEXT_SUFFIXES = LINE_SUFFIXES + TABLE_SUFFIXES
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
EDGE = 1 << 20  # bytes hashed at each end of a file for its fingerprint


class SourceError(CodistillError, RuntimeError):
    """A source file cannot be read or decoded: one line naming the file (and row) and what is wrong."""


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


def list_files(location: str, field: str, suffixes: tuple[str, ...]) -> tuple[Path, list[Path]]:
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


def table_units(path: Path, field: str) -> list[tuple[int, int]]:
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


def image_source(
    location: str, field: str, class_names: list[str] | None
) -> tuple[list[dict], list[dict], list[str] | None]:
    """(units, fingerprints, class names of a folder) of one image source: Hugging Face Parquet file(s) (a unit
    per row group) or a folder of class folders (one unit of every image); `cut_image_units` makes them chunks."""
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
    _, files = list_files(location, field, (".parquet",))
    units = [
        {"kind": "image_table", "path": str(p), "group": group, "start": 0, "end": rows}
        for p in files
        for group, rows in table_units(p, field)
    ]
    return units, [fingerprint(p) for p in files], None


def cut_image_units(units: list[dict], shard_images: int) -> list[dict]:
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


def open_image(data: bytes | str, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        img.load()
        return img
    except Image.DecompressionBombError as e:
        raise SourceError(f"{where}: the image is too large to decode ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SourceError(f"{where}: the image does not decode ({e})") from None


def decode_images(chunk: dict, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, C, H, W), labels int64 (n,)) of a chunk, each converted to C channels (L or RGB) and
    resized (bilinear) to H x W where it differs. A bad image or a missing label is a SourceError naming it."""
    c, h, w = shape
    mode = "L" if c == 1 else "RGB"
    sources: list[tuple[Any, int, str]] = []
    if chunk["kind"] == "image_files":
        sources = [(path, label, path) for path, label in chunk["items"]]
    else:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(chunk["path"]).read_row_group(chunk["group"], columns=["image", "label"])
        part = table.slice(chunk["start"], chunk["end"] - chunk["start"])
        images = part.column("image").combine_chunks().field("bytes").to_pylist()
        labels = part.column("label").to_pylist()
        sources = [
            (data, label, f"{chunk['path']} row {chunk['start'] + i} of row group {chunk['group']}")
            for i, (data, label) in enumerate(zip(images, labels, strict=True))
        ]
    out = np.empty((len(sources), c, h, w), dtype=np.uint8)
    label_arr = np.empty(len(sources), dtype="<i8")
    for i, (data, label, where) in enumerate(sources):
        if data is None or label is None:
            raise SourceError(f"{where}: no image bytes or no label")
        img = open_image(data, where).convert(mode)
        if img.size != (w, h):
            img = img.resize((w, h), resample=2)  # bilinear
        pixels = np.asarray(img, dtype=np.uint8)
        out[i] = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
        label_arr[i] = int(label)
    return out, label_arr


def image_shape(first: dict, image_size: tuple[int, int] | None) -> tuple[int, int, int]:
    """(C, H, W) of a source's first unit: 1 channel if its first image is greyscale, else 3 (RGB); H, W from
    `data.image_size` or that image."""
    if first["kind"] == "image_files":
        path, _ = first["items"][0]
        img = open_image(path, path)
    else:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(first["path"]).read_row_group(first["group"], columns=["image"])
        img = open_image(table.column("image").combine_chunks().field("bytes")[0].as_py(), first["path"])
    channels = 1 if img.mode in ("1", "L", "I", "I;16", "F") else 3
    h, w = image_size if image_size is not None else (img.size[1], img.size[0])
    return channels, h, w
