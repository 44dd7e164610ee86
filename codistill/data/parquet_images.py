"""Images in Parquet, in the Hugging Face layout: column `image` = struct<bytes, path>, column `label`
= int. Read with pyarrow (only the first `limit` rows when a limit is set), decoded with PIL, checked
before anything trains: the file is readable, every image decodes and all have one shape, and every
label lies in [0, num_classes) where num_classes is the classes the file declares (Hugging Face
`ClassLabel` metadata), else `data.num_classes`, else inferred when the labels are dense.
No ray, no mlflow.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codistill.data.budget import DecodeBudget
from codistill.errors import ConfigError

__all__ = ["check_labels", "declared_classes", "read_image_parquet"]


def declared_classes(schema_metadata: dict[bytes, bytes] | None, column: str = "label") -> int | None:
    """The number of classes a Hugging Face dataset declares for `column` (its ClassLabel names)."""
    raw = (schema_metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
        names = features[column].get("names")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return len(names) if isinstance(names, list) and names else None


def check_labels(labels: np.ndarray, num_classes: int, field: str, where: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise ConfigError(
            field,
            message=f"{where}: label {int(labels[bad[0]])} at row {int(bad[0])} is outside [0, {num_classes}) "
            f"({len(bad)} such rows); fix the labels or set data.num_classes",
        )


def infer_classes(labels: np.ndarray, field: str, where: str) -> int:
    """max + 1, but only when every label in [0, max] occurs: an outlier such as 15 among the ten classes
    0..9, or 100000, is a data error, not a 16- or 100001-class problem."""
    if len(labels) == 0:
        raise ConfigError(field, message=f"{where} has no rows")
    top, bottom = int(labels.max()), int(labels.min())
    distinct = np.unique(labels)
    if bottom < 0 or top + 1 > 2 * len(distinct):
        raise ConfigError(
            "data.num_classes",
            message=f"{where} declares no classes and its labels run from {bottom} to {top} with only "
            f"{len(distinct)} distinct values; set data.num_classes (labels must lie in [0, num_classes))",
        )
    missing = np.setdiff1d(np.arange(top + 1), distinct)
    if len(missing):
        shown = ", ".join(str(int(m)) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        rows = np.flatnonzero(labels == top)
        raise ConfigError(
            "data.num_classes",
            message=f"{where} declares no classes and its labels run from 0 to {top} but {shown} never occur "
            f"(label {top} is on {len(rows)} row(s), the first {int(rows[0])}); set data.num_classes if there are "
            f"{top + 1} classes, else fix the labels",
        )
    return top + 1


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False, disable=not sys.stderr.isatty())


_BYTES_PER_BAND = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "1": 1}


def _declared(img: Any) -> tuple[tuple[int, ...], int]:
    """(the array shape np.asarray gives, its bytes as uint8) of an opened, not yet decoded, image."""
    width, height = img.size
    bands = len(img.getbands())
    shape = (height, width) if bands == 1 else (height, width, bands)
    return shape, width * height * bands * _BYTES_PER_BAND.get(img.mode, 1)


def _batch_rows(pf: Any, budget: DecodeBudget) -> int:
    """Rows per read batch: Parquet stores a repeated value once, so a batch can hold many copies of the
    largest value of a row group's image column (at most its uncompressed size); keep a batch's copies
    within a tenth of the budget."""
    largest = 0
    for g in range(pf.metadata.num_row_groups):
        group = pf.metadata.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            if column.path_in_schema.startswith("image"):
                largest = max(largest, column.total_uncompressed_size)
    return int(max(1, min(256, budget.limit // 10 // max(largest, 1))))


def read_image_parquet(
    path: str,
    field: str,
    limit: int | None,
    budget: DecodeBudget | None = None,
    choose: Callable[[np.ndarray, int | None], np.ndarray] | None = None,
) -> tuple[torch.Tensor, np.ndarray, int | None]:
    """(images uint8 (N, C, H, W), labels int64 (N,), declared class count or None) of the first
    `limit` rows (all when None), or of the sorted rows `choose(all labels, declared class count)` picks
    (a balanced subset: only those images are decoded). Each image's declared size is checked before it is
    decoded, and the whole array is taken from `budget` before it is allocated. Raises ConfigError naming
    `field` for anything a user can fix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    budget = budget or DecodeBudget(None)
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise ConfigError(field, message=f"Parquet file {str(p)!r} does not exist")
    try:
        pf = pq.ParquetFile(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(field, message=f"{p} is not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if "image" not in names or "label" not in names:
        raise ConfigError(
            field, message=f"{p} has columns {names}; the Hugging Face image layout needs image and label"
        )
    declared = declared_classes(pf.schema_arrow.metadata)
    chosen: np.ndarray | None = None
    if choose is not None:
        try:
            every_label = pf.read(columns=["label"]).column("label").to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, OSError) as e:
            raise ConfigError(field, message=f"{p} could not be read ({e})") from None
        chosen = choose(every_label.astype(np.int64), declared)
    rows = pf.metadata.num_rows if limit is None else min(limit, pf.metadata.num_rows)
    rows = rows if chosen is None else len(chosen)
    labels: list[np.ndarray] = []
    out: np.ndarray | None = None
    i = offset = 0  # rows kept, rows of the file passed
    with _progress(rows, f"decoding {p.name}") as bar:
        try:
            batches = pf.iter_batches(batch_size=_batch_rows(pf, budget), columns=["image", "label"])
            for batch in batches:
                if chosen is None:
                    keep = np.arange(min(len(batch), rows - i))
                else:  # the chosen rows inside this batch
                    keep = chosen[(chosen >= offset) & (chosen < offset + len(batch))] - offset
                start, offset = offset, offset + len(batch)
                labels.append(batch.column("label").to_numpy(zero_copy_only=False)[keep].astype(np.int64))
                images = batch.column("image").field("bytes")
                for k in keep:  # this batch's only
                    row = start + int(k)  # in the file (what an error names)
                    img = _open(images[int(k)].as_py(), p, row, field)
                    shape, nbytes = _declared(img)
                    if out is None:
                        budget.take(rows * nbytes, field, f"{p}: {rows:,} rows of {_dims(shape)} images")
                        out = np.empty((rows, *shape), dtype=np.uint8)
                    if shape != out.shape[1:]:
                        first = out.shape[1:]
                        raise ConfigError(
                            field, message=f"{p}: the image at row {row} is {shape}, the first is {first}"
                        )
                    try:
                        out[i] = np.asarray(img)
                    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt pixel data
                        raise ConfigError(field, message=f"{p}: the image at row {row} does not decode ({e})") from None
                    i += 1
                    bar.update(1)
                if i >= rows:
                    break
        except (pa.ArrowInvalid, OSError) as e:
            raise ConfigError(field, message=f"{p} could not be read ({e})") from None
    if out is None:
        raise ConfigError(field, message=f"{p} has no rows")
    x = torch.from_numpy(out)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, H, W[, C]) -> (N, C, H, W)
    return x.contiguous(), np.concatenate(labels), declared


def _open(data: bytes | None, p: Path, row: int, field: str) -> Any:
    """The image of `row`, opened (its header read), not decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        if data is None:
            raise ValueError("no image bytes")
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own limit on declared pixels, checked in open()
        raise ConfigError(field, message=f"{p}: the image at row {row} is too large to decode ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ConfigError(field, message=f"{p}: the image at row {row} does not decode ({e})") from None


def _dims(shape: tuple[int, ...]) -> str:
    """`W x H` or `W x H x C` of an np.asarray shape (H, W[, C])."""
    return " x ".join(str(d) for d in (shape[1], shape[0], *shape[2:]))
