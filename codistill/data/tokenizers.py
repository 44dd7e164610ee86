"""Tokenizers of the `text` dataset (`data.tokenizer`): registry TOKENIZERS.

`byte` needs no files: a text's UTF-8 bytes are its tokens (256 symbols). No ray, no mlflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from codistill.registry import Registry

__all__ = ["TOKENIZERS", "Tokenizer", "ByteTokenizer"]


@dataclass
class Tokenizer:
    """Text -> token ids and back; `vocab_size` ids in [0, vocab_size)."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: np.ndarray) -> str:
        raise NotImplementedError

    def to_json(self) -> str | None:
        """What reloads this tokenizer exactly (None: nothing to save)."""
        return None


class ByteTokenizer(Tokenizer):
    def __init__(self) -> None:
        super().__init__("byte", 256)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: np.ndarray) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


TOKENIZERS: Registry[Callable[..., Tokenizer]] = Registry("tokenizer", {"byte": lambda *a, **k: ByteTokenizer()})
