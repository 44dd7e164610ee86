"""Tokenizers of the `text` dataset (`data.tokenizer`): registry TOKENIZERS.

An entry is a factory `make(train_text: str, cfg: DataConfig) -> Tokenizer` (`TokenizerFactory`): it
gets the training split's text (what a trained tokenizer may learn from; never the held-out text) and
the data section (`vocab_size`, `root` for caches). Entries:

- `byte`: a text's UTF-8 bytes are its tokens (256 symbols, no files).
- `bpe`: a byte-level BPE (GPT-2 style, `tokenizers` library) of `data.vocab_size` symbols trained on
  the training text, cached as `<data.root>/tokenizers/bpe-<vocab>-<sha256 of the text, 16 hex>.json`.
- `hf:<name or local path>`: a Hugging Face tokenizer (`transformers.AutoTokenizer`), encoded without
  special tokens; its vocabulary is `len(tokenizer)`.

For chat corpora (codistill.data.chat) a tokenizer also encodes with character offsets
(`encode_with_offsets`), names its pad id and, for `hf:`, renders conversations by its own chat template.

`tokenizer_from_meta(meta)` rebuilds the tokenizer a text Dataset was made with. No ray, no mlflow;
`tokenizers` and `transformers` are imported when a tokenizer that needs them is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from codistill.errors import ConfigError
from codistill.registry import Registry
from codistill.storage import Storage

if TYPE_CHECKING:
    from codistill.config import DataConfig

__all__ = [
    "TOKENIZERS",
    "BPETokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "TokenizerFactory",
    "bpe_cache_path",
    "chunks",
    "tokenizer_from_meta",
]

log = logging.getLogger("codistill")

BYTE_ALPHABET = 256
CHUNK_CHARS = 1 << 15
"""Texts are encoded in chunks of about this many characters (in parallel by `encode_batch`)."""


@dataclass
class Tokenizer:
    """Text -> token ids and back; `vocab_size` ids in [0, vocab_size)."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """int64 ids of `text` (no special tokens)."""
        raise NotImplementedError

    def decode(self, ids: np.ndarray) -> str:
        raise NotImplementedError

    def to_json(self) -> str | None:
        """What reloads this tokenizer exactly (None: nothing to save)."""
        return None

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each text, (int64 ids (n,), int64 character offsets (n, 2)): token j covers the characters
        [offsets[j, 0], offsets[j, 1]) of the text (tokens of one multi-byte character share its range). The
        ids are one encoding of the whole text, without special tokens (chat corpora: codistill.data.chat)."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        """The id that pads a row (its positions are never trained on or scored): 0 unless the tokenizer has one."""
        return 0

    def own_chat_template(self) -> str | None:
        """The tokenizer's own chat template (its text), or None: chat corpora are then rendered as ChatML."""
        return None

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        """`messages` as text by the tokenizer's own chat template (only when `own_chat_template` is not None)."""
        raise NotImplementedError

    def vocab(self) -> dict[str, int] | None:
        """token -> id for tokenizers whose tokens are strings (None: ids are the tokens, as bytes)."""
        return None


TokenizerFactory = Callable[[str, "DataConfig"], Tokenizer]
"""A TOKENIZERS entry: `make(train_text, cfg)` with the training split's text and the data section."""


class ByteTokenizer(Tokenizer):
    def __init__(self) -> None:
        super().__init__("byte", BYTE_ALPHABET)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: np.ndarray) -> str:
        return np.asarray(ids).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for text in texts:
            ids = self.encode(text)  # (n,) UTF-8 bytes
            char = np.cumsum((ids & 0xC0) != 0x80) - 1  # (n,) a byte that is no continuation (10xxxxxx) starts a char
            out.append((ids, np.stack([char, char + 1], axis=1)))
        return out


_BOUNDARY = re.compile(r"\n(?=\S)")


def chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """`text` in pieces of about `size` characters that join back to it, cut only before a newline that
    non-whitespace follows: the GPT-2 pre-tokenizer makes such a newline a word of its own, so encoding
    the pieces gives the ids of the whole text. (A text without such a newline is one piece.)"""
    start = 0
    while start < len(text):
        if len(text) - start <= size:
            yield text[start:]
            return
        m = _BOUNDARY.search(text, start + size)
        if m is None:
            yield text[start:]
            return
        yield text[start : m.start()]
        start = m.start()


def _ids_and_offsets(ids: list[int], offsets: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """int64 (n,) ids and (n, 2) character offsets."""
    return np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


def _concat(id_lists: list[list[int]]) -> np.ndarray:
    if not id_lists:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.asarray(ids, dtype=np.int64) for ids in id_lists])


def _need(package: str, tokenizer: str) -> None:
    try:
        __import__(package)
    except ImportError:
        raise ConfigError(
            "data.tokenizer", message=f"{tokenizer} needs the `{package}` package (pip install {package})"
        ) from None


def check_bpe_vocab(vocab_size: int) -> None:
    if vocab_size < BYTE_ALPHABET + 1:
        raise ConfigError(
            "data.vocab_size",
            vocab_size,
            f"an integer >= {BYTE_ALPHABET + 1} for data.tokenizer=bpe (the byte-level alphabet alone has "
            f"{BYTE_ALPHABET} symbols)",
        )


class BPETokenizer(Tokenizer):
    """Byte-level BPE (the GPT-2 pre-tokenizer and byte alphabet, no special tokens): any text encodes,
    and decoding gives it back exactly."""

    def __init__(self, tokenizer: Any) -> None:  # a tokenizers.Tokenizer
        super().__init__("bpe", tokenizer.get_vocab_size(with_added_tokens=True))
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Learn `vocab_size` symbols (256 bytes + merges; fewer when the text has no more pairs) from `text`."""
        check_bpe_vocab(vocab_size)
        _need("tokenizers", "bpe")
        from tokenizers import Tokenizer as HFBackend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFBackend(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        pieces = list(chunks(text))
        tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFBackend

        return cls(HFBackend.from_str(text))

    def encode(self, text: str) -> np.ndarray:
        encodings = self.tokenizer.encode_batch_fast(list(chunks(text)), add_special_tokens=False)
        return _concat([e.ids for e in encodings])

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)  # offsets in characters
        return [_ids_and_offsets(e.ids, e.offsets) for e in encodings]

    def decode(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def vocab(self) -> dict[str, int]:
        return dict(self.tokenizer.get_vocab(with_added_tokens=True))


def bpe_cache_path(cache_dir: Path, vocab_size: int, text: str) -> Path:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return cache_dir / "tokenizers" / f"bpe-{vocab_size}-{digest}.json"


def bpe(train_text: str, cfg: DataConfig) -> BPETokenizer:
    """The BPE of `cfg.vocab_size` trained on `train_text`, from the cache under `cfg.root` when there."""
    check_bpe_vocab(cfg.vocab_size)
    path = bpe_cache_path(Path(cfg.root).expanduser(), cfg.vocab_size, train_text)
    if path.is_file():
        try:
            tok = BPETokenizer.from_json(path.read_text(encoding="utf-8"))
            log.info("tokenizer bpe: %d symbols, loaded from cache %s", tok.vocab_size, path)
            return tok
        except Exception as e:  # a damaged cache file: train again and overwrite it
            log.warning("tokenizer bpe: cache %s is unreadable (%s); training again", path, e)
    t0 = time.perf_counter()
    tok = BPETokenizer.train(train_text, cfg.vocab_size)
    log.info(
        "tokenizer bpe: trained %d symbols on %d characters in %.1f s",
        tok.vocab_size,
        len(train_text),
        time.perf_counter() - t0,
    )
    try:
        Storage(str(path.parent)).write(path.name, tok.to_json().encode("utf-8"))  # write, then move
        log.info("tokenizer bpe: cached as %s", path)
    except OSError as e:
        log.warning("tokenizer bpe: could not cache it as %s (%s)", path, e)
    return tok


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (fast or slow), used without special tokens."""

    def __init__(self, name: str, tokenizer: Any) -> None:  # a transformers PreTrainedTokenizerBase
        super().__init__(f"hf:{name}", len(tokenizer))
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, name: str) -> HFTokenizer:
        _need("transformers", f"hf:{name}")
        import transformers

        from codistill.hf_hub import hub_reachable
        from codistill.trust import remote_code_allowed

        def load(**kwargs: Any) -> Any:  # a tokenizer's own code (auto_map) only with the person's opt-in
            return transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=remote_code_allowed(), **kwargs)

        try:
            local = os.path.exists(os.path.expanduser(name))
            try:
                tok = load() if local else load(local_files_only=True)
            except (OSError, ValueError):
                if local or not hub_reachable():
                    raise
                tok = load()
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                "data.tokenizer",
                message=f"hf:{name}: no Hugging Face tokenizer could be loaded ({first}). Give a local folder "
                f"with tokenizer files or a model id in the Hugging Face cache (or reachable online).",
            ) from None
        return cls(name, tok)

    def encode(self, text: str) -> np.ndarray:
        pieces = list(chunks(text))
        if not pieces:  # no text: transformers cannot tokenize an empty batch
            return np.zeros(0, dtype=np.int64)
        out = self.tokenizer(pieces, add_special_tokens=False, verbose=False)
        return _concat(out["input_ids"])

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(
                "data.tokenizer",
                self.name,
                "a fast Hugging Face tokenizer (tokenizer.json) for a chat corpus: its assistant tokens are "
                "found from character offsets, which slow tokenizers do not give",
            )
        out = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [_ids_and_offsets(ids, offs) for ids, offs in zip(out["input_ids"], out["offset_mapping"])]

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id, else its end-of-sequence id, else 0."""
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if isinstance(token_id, int) and 0 <= token_id < self.vocab_size:
                return token_id
        return 0

    def own_chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            return None
        return template if isinstance(template, str) else json.dumps(template, sort_keys=True)  # named templates

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) gave a {type(text).__name__}, not text")
        return text

    def decode(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)

    def vocab(self) -> dict[str, int]:
        return dict(self.tokenizer.get_vocab())


def _hf(name: str) -> TokenizerFactory:
    return lambda train_text, cfg: HFTokenizer.load(name)


def _check_hf(name: str) -> None:
    """Offline: only that a name is there (whether it loads shows when the dataset is loaded)."""
    if not name.strip():
        raise ValueError("hf:<model id or local folder>, e.g. hf:gpt2")


TOKENIZERS: Registry[TokenizerFactory] = Registry(
    "tokenizer",
    {
        "byte": lambda train_text, cfg: ByteTokenizer(),
        "bpe": bpe,
    },
)
TOKENIZERS.family("hf", _hf, _check_hf)


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    """The tokenizer a text Dataset was built with, from its `meta` (`tokenizer`, `tokenizer_json`):
    `byte` and `bpe` exactly, `hf:<name>` by loading the name again."""
    name = meta["tokenizer"]
    if name == "byte":
        return ByteTokenizer()
    if meta.get("tokenizer_json"):
        return BPETokenizer.from_json(meta["tokenizer_json"])
    if name.startswith("hf:"):
        return HFTokenizer.load(name[3:])
    raise ValueError(f"cannot rebuild tokenizer {name!r} without its tokenizer_json")
