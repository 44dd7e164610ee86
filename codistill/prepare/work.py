"""One chunk of a prepare (codistill.prepare.sources): read it, tokenize or decode it, write its shard and the
record that says the shard is finished. Runs in Ray Data's workers (or in-process); no ray import here.

A chunk's shard is a pure function of the chunk and the prepare's spec, so a task Ray retries, or a prepare run
again after an interruption, writes the same bytes.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import numpy as np

from codistill.data.manifest import token_dtype
from codistill.data.sources import SourceError, decode_images
from codistill.data.text import ROW_SEPARATOR
from codistill.data.tokenizers import BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer
from codistill.prepare.output import Output, PrepareError

__all__ = ["part_name", "run_chunk", "shard_name"]


def shard_name(chunk: dict, suffix: str) -> str:
    return f"{chunk['split']}-{chunk['index']:05d}.{suffix}"


def part_name(chunk: dict) -> str:
    """The record written once the chunk's shard is complete (a prepare that resumes skips its chunk)."""
    return f"parts/{chunk['split']}-{chunk['index']:05d}.json"


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str, tokenizer_json: str | None) -> Tokenizer:
    """Built once per worker process (a Hugging Face tokenizer takes a second to load)."""
    if name == "byte":
        return ByteTokenizer()
    if tokenizer_json:
        return BPETokenizer.from_json(tokenizer_json)
    return HFTokenizer.load(name.removeprefix("hf:"))


def _lines(chunk: dict) -> str:
    """The text of the lines whose first byte lies in [start, end) (module docstring of sources)."""
    start, end, path = chunk["start"], chunk["end"], chunk["path"]
    out: list[bytes] = []
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line that began before `start` belongs to the chunk before
        begin = f.tell()
        while f.tell() < end:
            raw = f.readline()
            if not raw:
                break
            out.append(raw)
    data = b"".join(out)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 text near byte {begin + e.start} ({e.reason})") from None
    if path.lower().endswith(".jsonl"):
        rows: list[str] = []
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[chunk.get("column", "text")]
            except (ValueError, KeyError, TypeError) as e:
                raise PrepareError(
                    f"{path}: line {n + 1} after byte {start} is not a JSON object with the text "
                    f"column ({type(e).__name__}: {e})"
                ) from None
            if isinstance(value, str):
                rows.append(value + ROW_SEPARATOR)
        text = "".join(rows)
    return chunk["header"] + text


def _table_text(chunk: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, column = chunk["path"], chunk["column"]
    try:
        if chunk["group"] >= 0:
            table = pq.ParquetFile(path).read_row_group(chunk["group"], columns=[column])
        else:
            with pa.memory_map(path) as source:
                try:
                    table = pa.ipc.open_file(source).read_all()
                except pa.ArrowInvalid:
                    source.seek(0)
                    table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError, KeyError) as e:
        raise PrepareError(f"cannot read column {column!r} of {path} ({e})") from None
    if column not in table.column_names:
        raise PrepareError(f"{path} has no column {column!r} (data.text_column); it has {table.column_names}")
    values = table.column(column).slice(chunk["start"], chunk["end"] - chunk["start"]).to_pylist()
    return "".join(v + ROW_SEPARATOR for v in values if isinstance(v, str))


def _tokens(chunk: dict, spec: dict) -> tuple[list[bytes | memoryview], int, dict]:
    text = _lines(chunk) if chunk["kind"] == "lines" else _table_text(chunk)
    tok = spec["tokenizer"]
    ids = _tokenizer(tok["name"], tok.get("json")).encode(text)
    dtype = np.dtype(token_dtype(int(tok["vocab_size"]))).newbyteorder("<")
    arr = np.ascontiguousarray(ids, dtype=dtype)
    return [arr.data.cast("B")], len(arr), {"chars": len(text)}


def _images(chunk: dict, spec: dict) -> tuple[list[bytes | memoryview], int, dict, np.ndarray]:
    out, label_arr = decode_images(chunk, tuple(spec["shape"]))
    scaled = out.reshape(len(out), out.shape[1], -1).astype(np.float64) / 255
    stats = {
        "sum": scaled.sum(axis=(0, 2)).tolist(),
        "sumsq": (scaled**2).sum(axis=(0, 2)).tolist(),
        "pixels": int(scaled.shape[0] * scaled.shape[2]),
        "min_label": int(label_arr.min()) if len(label_arr) else 0,
        "max_label": int(label_arr.max()) if len(label_arr) else 0,
    }
    return [out.data.cast("B")], len(out), stats, label_arr


def run_chunk(chunk: dict, spec: dict) -> dict:
    """Prepare one chunk; a record of its shard (file, count, bytes, sha256, stats), or {"error": one line} for a
    failure a user can fix (it is not retried: it would fail the same way)."""
    t0 = time.perf_counter()
    out = Output(spec["out"])
    try:
        if spec["kind"] == "tokens":
            parts, count, stats = _tokens(chunk, spec)
            labels = None
        else:
            parts, count, stats, labels = _images(chunk, spec)
        file = shard_name(chunk, "tok" if spec["kind"] == "tokens" else "img")
        size, sha = out.write(file, parts)
        record: dict[str, Any] = {"file": file, "count": count, "bytes": size, "sha256": sha}
        if labels is not None:
            record["labels"] = shard_name(chunk, "lab")
            record["labels_bytes"], record["labels_sha256"] = out.write(record["labels"], [labels.data.cast("B")])
        # the plan's key: a later prepare of other sources never takes this record for one of its own shards
        done = {"key": spec["key"], "split": chunk["split"], "index": chunk["index"], "shard": record, "stats": stats}
        out.write(part_name(chunk), [json.dumps(done).encode()])
    except (PrepareError, SourceError) as e:
        return {"split": chunk["split"], "index": chunk["index"], "error": str(e)}
    return {**done, "seconds": time.perf_counter() - t0}
