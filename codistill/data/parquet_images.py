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
from pathlib import Path

import numpy as np
import torch

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
    """max + 1, but only when that is plausible (at most twice the number of distinct labels): an outlier
    such as 100000 among ten classes is a data error, not a 100001-class problem."""
    if len(labels) == 0:
        raise ConfigError(field, message=f"{where} has no rows")
    top = int(labels.max())
    distinct = len(np.unique(labels))
    if int(labels.min()) < 0 or top + 1 > 2 * distinct:
        raise ConfigError(
            "data.num_classes",
            message=f"{where} declares no classes and its labels run from {int(labels.min())} to {top} with only "
            f"{distinct} distinct values; set data.num_classes (labels must lie in [0, num_classes))",
        )
    return top + 1


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False, disable=not sys.stderr.isatty())


def read_image_parquet(path: str, field: str, limit: int | None) -> tuple[torch.Tensor, np.ndarray, int | None]:
    """(images uint8 (N, C, H, W), labels int64 (N,), declared class count or None) of the first
    `limit` rows (all when None). Raises ConfigError naming `field` for anything a user can fix."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, UnidentifiedImageError

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
    rows = pf.metadata.num_rows if limit is None else min(limit, pf.metadata.num_rows)
    images: list[bytes] = []
    labels: list[np.ndarray] = []
    try:
        for batch in pf.iter_batches(batch_size=8192, columns=["image", "label"]):
            take = min(len(batch), rows - len(images))
            images.extend(batch.column("image").field("bytes").to_pylist()[:take])
            labels.append(batch.column("label").to_numpy(zero_copy_only=False)[:take].astype(np.int64))
            if len(images) >= rows:
                break
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(field, message=f"{p} could not be read ({e})") from None
    out: np.ndarray | None = None
    with _progress(rows, f"decoding {p.name}") as bar:
        for i, data in enumerate(images):
            try:
                if data is None:
                    raise ValueError("no image bytes")
                img = np.asarray(Image.open(io.BytesIO(data)))
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise ConfigError(field, message=f"{p}: the image at row {i} does not decode ({e})") from None
            if out is None:
                out = np.empty((rows, *img.shape), dtype=np.uint8)
            if img.shape != out.shape[1:]:
                raise ConfigError(
                    field, message=f"{p}: the image at row {i} is {img.shape}, the first is {out.shape[1:]}: one shape"
                )
            out[i] = img
            bar.update(1)
    if out is None:
        raise ConfigError(field, message=f"{p} has no rows")
    x = torch.from_numpy(out)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, H, W[, C]) -> (N, C, H, W)
    return x.contiguous(), np.concatenate(labels), declared_classes(pf.schema_arrow.metadata)
