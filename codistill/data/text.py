"""The `text` dataset: a corpus, a tokenizer (codistill.data.tokenizers) and next-token windows for causal
language models. No ray, no mlflow.

Sources (`data.train`, and optionally `data.test`):

- a text file (`.txt` or any other suffix not named here), read as UTF-8;
- a folder: its `*.txt`, `*.md` and `*.py` files, recursively, in sorted order of their relative paths
  (hidden files and folders and `__pycache__` skipped), each after a header line `# ---- <path> ----`;
- a Parquet (`.parquet`) or Arrow (`.arrow`, `.feather`; IPC file or stream) file: the string column
  `data.text_column`, non-null rows joined with a blank line;
- a `.jsonl` file (one JSON object per line): the string `data.text_column` of every object, joined the same way;
- a chat corpus: a `.jsonl` file whose first object, or a Parquet/Arrow file that, has `data.messages_column`
  (`messages`): one conversation per row, rendered by the tokenizer's chat template, one row of block_size + 1
  tokens each, trained only on the assistant's turns (codistill.data.chat has the format and the mask);
- nothing (`data.train` null): the offline default corpus, the running Python's standard library
  sources (`*.py`, sorted by relative path, without site-packages, test suites, idlelib, lib2to3 and
  files over 200 KB), each after a header line as for a folder.

Each source is cut to its first `data.max_chars` characters. Without `data.test`, the last
`data.val_fraction` of the characters is held out (cut at that character). The tokenizer is built from
the training text only; the token stream of each split becomes windows of `block_size + 1` tokens with
stride `block_size` (window i = tokens[i*T : i*T + T + 1]; the incomplete tail is dropped), and
`train_y`/`test_y` are zeros (N,): the targets are the windows shifted by one. A chat corpus's `train_y`/`test_y`
are its labels (N, block_size) instead, -100 on positions no loss counts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from codistill.config import DataConfig
from codistill.data import chat
from codistill.data.dataset import Dataset, Rows
from codistill.data.tables import TABLE_SUFFIXES, column_values, jsonl_rows, open_table
from codistill.data.tokenizers import TOKENIZERS, Tokenizer
from codistill.errors import ConfigError

__all__ = [
    "FOLDER_SUFFIXES",
    "TABLE_SUFFIXES",
    "language_model_dataset",
    "read_source",
    "stdlib_corpus",
    "text",
    "windows",
]

log = logging.getLogger("codistill")

FOLDER_SUFFIXES = (".txt", ".md", ".py")
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
STDLIB_MAX_FILE_BYTES = 200_000
ROW_SEPARATOR = "\n\n"


def _header(rel: str) -> str:
    return f"# ---- {rel} ----\n"


def _join_files(root: Path, files: list[Path], max_chars: int | None, field: str) -> str:
    """Files under `root`, each after a header line and ending in a newline, until `max_chars` is reached."""
    parts: list[str] = []
    total = 0
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            body = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise ConfigError(field, message=f"cannot read {path} ({e})") from None
        if body and not body.endswith("\n"):
            body += "\n"
        parts.append(_header(rel) + body)
        total += len(parts[-1])
        if max_chars is not None and total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def stdlib_corpus(max_chars: int | None) -> tuple[str, str]:
    """(the default corpus, its source name `python-stdlib <version>`): the standard library's sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP]
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    files = sorted(
        (p for p in files if p.stat().st_size <= STDLIB_MAX_FILE_BYTES),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    return _join_files(root, files, max_chars, "data.train"), f"python-stdlib {platform.python_version()}"


def _folder(root: Path, max_chars: int | None, field: str) -> str:
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        files.extend(Path(folder) / n for n in names if n.endswith(FOLDER_SUFFIXES) and not n.startswith("."))
    if not files:
        raise ConfigError(field, message=f"folder {root} has no {'/'.join(FOLDER_SUFFIXES)} files")
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return _join_files(root, files, max_chars, field)


def _table(path: Path, column: str, max_chars: int | None, field: str) -> str:
    """The string column `column` of a Parquet or Arrow file, rows joined, read batch by batch until
    `max_chars` is reached."""
    import pyarrow as pa

    schema, batches = open_table(path, column, field)
    if column not in schema.names:
        raise ConfigError(
            "data.text_column", column, f"a column of {path}, which has {', '.join(schema.names) or 'none'}"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise ConfigError("data.text_column", column, f"a string column; in {path} it is {kind}")
    rows: list[str] = []
    total = 0
    for values in column_values(batches, column):
        for value in values:
            if value is None:
                continue
            rows.append(value)
            total += len(value) + len(ROW_SEPARATOR)
        if max_chars is not None and total >= max_chars:
            break
    return ROW_SEPARATOR.join(rows)[:max_chars]


def _jsonl(path: Path, cfg: DataConfig, field: str) -> str:
    """The string `data.text_column` of each object of a JSONL file (one JSON object per line, blank lines
    skipped), rows joined with a blank line as a table's are, read until `data.max_chars` is reached."""
    rows: list[str] = []
    total = 0
    for where, row in jsonl_rows(path, field):
        value = row.get(cfg.text_column)
        if not isinstance(value, str):
            raise ConfigError(
                field,
                message=f"{path} {where}: no string {cfg.text_column!r} (data.text_column) nor "
                f"{cfg.messages_column!r} (data.messages_column, a chat corpus) column; it has "
                f"{', '.join(map(str, row)) or 'none'}",
            )
        rows.append(value)
        total += len(value) + len(ROW_SEPARATOR)
        if cfg.max_chars is not None and total >= cfg.max_chars:
            break
    return ROW_SEPARATOR.join(rows)[: cfg.max_chars]


def read_source(path_str: str, cfg: DataConfig, field: str) -> str:
    """The text of `path_str` (a text file, folder, JSONL, Parquet or Arrow file), cut to `cfg.max_chars`."""
    path = Path(path_str).expanduser()
    if not path.exists():
        raise ConfigError(
            field,
            path_str,
            "an existing text file, folder of .txt/.md/.py files, or .jsonl/.parquet/.arrow/.feather file",
        )
    if path.is_dir():
        return _folder(path, cfg.max_chars, field)
    if path.suffix.lower() in TABLE_SUFFIXES:
        return _table(path, cfg.text_column, cfg.max_chars, field)
    if path.suffix.lower() == ".jsonl":
        return _jsonl(path, cfg, field)
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return f.read(cfg.max_chars if cfg.max_chars is not None else -1)
    except UnicodeDecodeError as e:
        raise ConfigError(field, message=f"{path} is not UTF-8 text ({e})") from None
    except OSError as e:
        raise ConfigError(field, message=f"cannot read {path} ({e})") from None


def windows(tokens: np.ndarray, block_size: int) -> torch.Tensor:
    """int64 (N, block_size + 1): window i = tokens[i*T : i*T + T + 1] with T = block_size, every full one."""
    n = (len(tokens) - 1) // block_size
    if n <= 0:
        return torch.zeros((0, block_size + 1), dtype=torch.int64)
    view = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens, dtype=np.int64), block_size + 1)
    return torch.from_numpy(view[::block_size][:n].copy())


def _too_short(split: str, source: str, n_tokens: int, block_size: int) -> ConfigError:
    return ConfigError(
        "data.block_size",
        message=f"the {split} text ({source}) has {n_tokens} tokens, fewer than one window of block_size + 1 = "
        f"{block_size + 1}: use more text, a smaller data.block_size"
        + (" or a larger data.val_fraction" if split == "held-out" else ""),
    )


def text(cfg: DataConfig) -> Dataset:
    """The `text` dataset (module docstring): token windows (N, block_size + 1), task `causal_lm`; a chat
    corpus gives one row per conversation and its labels (codistill.data.chat)."""
    t0 = time.perf_counter()
    if cfg.train is not None and chat.is_chat_source(cfg.train, cfg):
        c = chat.chat_corpus(cfg)
        log.info("text: chat corpus %s read and tokenized in %.2f s", cfg.train, time.perf_counter() - t0)
        name = Path(cfg.train).expanduser().stem or "chat"
        return language_model_dataset(name, c.train.x, c.train.y, c.test.x, c.test.y, c.vocab_size, c.meta)
    if cfg.test is not None and chat.is_chat_source(cfg.test, cfg, "data.test"):
        raise ConfigError("data.test", cfg.test, "a text source like data.train, which is not a chat corpus")
    if cfg.train is None:
        corpus, source = stdlib_corpus(cfg.max_chars)
        name = "text"
    else:
        corpus, source = read_source(cfg.train, cfg, "data.train"), str(cfg.train)
        name = Path(cfg.train).expanduser().stem or "text"
    if cfg.test is not None:
        train_text, test_text = corpus, read_source(cfg.test, cfg, "data.test")
        test_source = str(cfg.test)
    else:
        cut = len(corpus) - round(len(corpus) * cfg.val_fraction)
        train_text, test_text = corpus[:cut], corpus[cut:]
        test_source = f"last {cfg.val_fraction:g} of {source}"
    sha = hashlib.sha256(train_text.encode("utf-8"))
    sha.update(test_text.encode("utf-8"))
    log.info(
        "text: read %d + %d characters from %s in %.2f s",
        len(train_text),
        len(test_text),
        source,
        time.perf_counter() - t0,
    )

    tokenizer: Tokenizer = TOKENIZERS.get_entry(cfg.tokenizer, "data.tokenizer")(train_text, cfg)
    t1 = time.perf_counter()
    train_tokens, test_tokens = tokenizer.encode(train_text), tokenizer.encode(test_text)
    log.info(
        "text: %s tokenizer (%d symbols): encoded %d train + %d held-out tokens in %.2f s",
        cfg.tokenizer,
        tokenizer.vocab_size,
        len(train_tokens),
        len(test_tokens),
        time.perf_counter() - t1,
    )
    T = cfg.block_size
    if len(train_tokens) < T + 1:
        raise _too_short("training", source, len(train_tokens), T)
    if len(test_tokens) < T + 1:
        raise _too_short("held-out", test_source, len(test_tokens), T)
    train_x, test_x = windows(train_tokens, T), windows(test_tokens, T)
    meta = {
        "source": source,
        "test_source": test_source,
        "corpus_sha256": sha.hexdigest(),
        "num_chars": len(train_text) + len(test_text),
        "tokenizer": cfg.tokenizer,
        "vocab_size": tokenizer.vocab_size,
        "num_train_tokens": len(train_tokens),
        "num_test_tokens": len(test_tokens),
        "tokenizer_json": tokenizer.to_json(),
        "block_size": T,
    }
    zeros = (torch.zeros(len(train_x), dtype=torch.int64), torch.zeros(len(test_x), dtype=torch.int64))
    return language_model_dataset(name, train_x, zeros[0], test_x, zeros[1], tokenizer.vocab_size, meta)


def language_model_dataset(
    name: str, train_x: Rows, train_y: Rows, test_x: Rows, test_y: Rows, vocab_size: int, meta: dict
) -> Dataset:
    """A `causal_lm` Dataset of token rows (N, block_size + 1): `train_y`/`test_y` are zeros (N,) when the targets
    are the rows shifted by one, or the labels (N, block_size) (IGNORE_INDEX where no loss counts) of a chat
    corpus; token ids are stored as they are (no scaling, no normalisation)."""
    return Dataset(
        name,
        train_x,
        train_y,
        test_x,
        test_y,
        vocab_size,
        (0.0,),
        (1.0,),
        scale=1.0,
        augment=False,
        task="causal_lm",
        meta=meta,
    )
