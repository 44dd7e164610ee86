"""Row sources of the `text` dataset (plain text or chat): one column of a Parquet or Arrow file, read batch by
batch, and the objects of a JSONL file, read line by line. No ray, no mlflow; pyarrow is imported when a table
is opened."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from codistill.data.sources import TABLE_SUFFIXES
from codistill.errors import ConfigError

__all__ = ["TABLE_SUFFIXES", "column_values", "jsonl_rows", "open_table"]


def open_table(path: Path, column: str, field: str) -> tuple[Any, Iterable[Any]]:
    """(the file's pyarrow schema, its record batches holding `column`, read one at a time) of a Parquet
    (`.parquet`) or Arrow (`.arrow`, `.feather`; IPC file or stream) file. Nothing is read past the schema
    until the batches are iterated; there are none when the file has no such column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    batches: Iterable[Any]
    try:
        if path.suffix.lower() == ".parquet":
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            batches = pf.iter_batches(columns=[column]) if column in schema.names else iter(())
        else:
            source = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_file(source)
                schema = reader.schema
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:  # not the IPC file format: the stream format (Hugging Face datasets)
                source.seek(0)
                stream = pa.ipc.open_stream(source)
                schema = stream.schema
                batches = iter(stream)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(field, message=f"cannot read {path} as {path.suffix[1:]} ({e})") from None
    return schema, batches


def column_values(batches: Iterable[Any], column: str) -> Iterator[list[Any]]:
    """The values of `column` (Python objects: str, list, dict or None), one record batch at a time."""
    for batch in batches:
        yield batch.column(batch.schema.get_field_index(column)).to_pylist()


def jsonl_rows(path: Path, field: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`line N`, the object) for each line of a JSONL file (N from 1; blank lines skipped), read line by line;
    a line that is not UTF-8 or not a JSON object is refused in one line naming it."""
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise ConfigError(field, message=f"{path} line {n}: not UTF-8 ({e.reason})") from None
                except ValueError as e:
                    raise ConfigError(field, message=f"{path} line {n}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ConfigError(
                        field, message=f"{path} line {n}: a JSON {type(row).__name__}, not an object ({{...}})"
                    )
                yield f"line {n}", row
    except OSError as e:
        raise ConfigError(field, message=f"cannot read {path} ({e})") from None
