"""Chat corpora of the `text` dataset: conversations rendered by a chat template, one row each, trained only on
the assistant's turns. No ray, no mlflow.

Format. `data.train` (and `data.test`) is a chat corpus when it is
- a `.jsonl` file (one JSON object per line, blank lines skipped) whose first object has the key
  `data.messages_column` (default `messages`), or
- a Parquet (`.parquet`) or Arrow (`.arrow`, `.feather`) file with that column.
Each row holds one conversation: a non-empty list of messages, each an object with a string `role` and a string
`content`; other keys go to the template as they are (keys whose value is null are left out: a table gives every
message every field). A row that is not that is refused in one line naming it (`line N` of a JSONL file, from 1;
`row i` of a table, from 0), before anything is tokenized.

Template. A conversation becomes text by
- the tokenizer's own chat template (`hf:<name>` with a `chat_template`): `apply_chat_template(messages,
  tokenize=False)`; the template writes any BOS and turn markers as text, and the text is encoded without adding
  special tokens;
- else (byte, bpe, an hf tokenizer without a template) ChatML, rendered as plain text, so byte and BPE
  tokenizers encode its markers as ordinary characters:

      <|im_start|>{role}\\n{content}<|im_end|>\\n     one per message
      <|im_start|>assistant\\n                       the generation prompt

A BPE tokenizer is trained on the training conversations rendered as ChatML.

Mask. Message i with role `assistant` spans the characters [len(render(messages[:i], add_generation_prompt=True)),
len(render(messages[:i + 1]).rstrip())) of render(messages): its content and the template's end-of-turn marker,
without the whitespace after the marker (what Hugging Face's `{% generation %}` assistant masks cover). Both
renderings must be prefixes of the whole conversation's; a template that rewrites earlier turns is refused,
naming the row. The whole text is encoded once, with each token's character offsets (byte: the character each
UTF-8 byte belongs to; bpe: `tokenizers` Encoding.offsets; hf: `return_offsets_mapping`, fast tokenizers only),
and a token is trained on when its characters overlap an assistant span (HF's rule: a token across a span's
boundary counts). So the ids are exactly those of the whole text and the mask is exact per token; no pieces are
encoded apart.

Rows. A conversation of n tokens is one row: x (block_size + 1,) = its first block_size + 1 tokens, then the
pad id (`Tokenizer.pad_id`: hf's pad, else eos, else 0); y (block_size,) = x[1:] where that token is trained on,
IGNORE_INDEX (-100) elsewhere (system and user turns, role headers, padding). `CausalLM.prepare` gives a model
x[:, :-1] and targets y, and every loss and metric skips -100. A conversation over block_size + 1 tokens is cut
at its end (counted: `truncated`); one left with no trained target is dropped (counted: `dropped`).

Splits. `data.test` (a chat corpus too), else the last `data.val_fraction` of the conversations (at least one
each side). `data.max_chars` stops reading a source after the conversation whose message contents reach that many
characters (conversations are never cut in the middle).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codistill.config import DataConfig
from codistill.data.tables import TABLE_SUFFIXES, column_values, jsonl_rows, open_table
from codistill.data.tokenizers import TOKENIZERS, Tokenizer
from codistill.errors import ConfigError
from codistill.losses.distill import IGNORE_INDEX  # the label no loss or metric counts

__all__ = [
    "IGNORE_INDEX",
    "ChatCorpus",
    "ChatTemplate",
    "Conversation",
    "SplitRows",
    "assistant_spans",
    "chat_corpus",
    "chat_template",
    "chatml",
    "check_conversation",
    "is_chat_source",
    "read_conversations",
    "rows",
    "trained_tokens",
]

log = logging.getLogger("codistill")

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
ASSISTANT = "assistant"

Message = dict[str, Any]


@dataclass(frozen=True)
class Conversation:
    where: str  # `<path> line N` (JSONL, from 1) or `<path> row i` (table, from 0): what an error names
    messages: list[Message]


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # `chatml` or `<tokenizer> chat_template`
    render: Callable[[list[Message], bool], str]  # (messages, add_generation_prompt) -> text
    sha256: str | None = None  # of a tokenizer's own template text


CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""`chatml` as a Jinja chat template: what an exported tokenizer of a ChatML-trained peer carries, so
`apply_chat_template` renders prompts exactly as the peer was trained on them."""


def chatml(messages: list[Message], add_generation_prompt: bool) -> str:
    """The default template (module docstring), as plain text."""
    text = "".join(f"{CHATML_START}{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages)
    if add_generation_prompt:
        text += f"{CHATML_START}{ASSISTANT}\n"
    return text


def chat_template(tokenizer: Tokenizer) -> ChatTemplate:
    """The tokenizer's own template when it has one, else ChatML."""
    own = tokenizer.own_chat_template()
    if own is None:
        return ChatTemplate("chatml", chatml)
    return ChatTemplate(
        f"{tokenizer.name} chat_template", tokenizer.render_chat, hashlib.sha256(own.encode("utf-8")).hexdigest()
    )


# ---- reading ----


def is_chat_source(path_str: str, cfg: DataConfig, field: str = "data.train") -> bool:
    """Whether `path_str` is a chat corpus (module docstring): a JSONL file whose first object has
    `data.messages_column`, or a Parquet/Arrow file with that column. Only the first line or the schema is read."""
    path = Path(path_str).expanduser()
    if not path.is_file():
        return False
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        try:
            for _, row in jsonl_rows(path, field):
                return cfg.messages_column in row
        except ConfigError:  # not JSON: the text reader says where
            return False
        return False
    if suffix in TABLE_SUFFIXES:
        schema, _ = open_table(path, cfg.messages_column, field)
        return cfg.messages_column in schema.names
    return False


def check_conversation(value: Any, where: str, column: str) -> list[Message]:
    """The messages of one row, checked (module docstring); a ValueError naming what is wrong otherwise."""
    if value is None:
        raise ValueError(f"{where}: {column!r} (data.messages_column) is missing or null")
    if not isinstance(value, list | tuple):
        raise ValueError(f"{where}: {column!r} is a {type(value).__name__}, not a list of messages")
    if not value:
        raise ValueError(f"{where}: {column!r} is an empty list")
    messages = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {j} is a {type(m).__name__}, not an object with role and content")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "none" if m.get(key) is None else f"a {type(m[key]).__name__}"
                raise ValueError(f"{where}: message {j} has no string {key!r} (got {got})")
        messages.append({k: v for k, v in m.items() if v is not None})
    return messages


def _rows(path: Path, cfg: DataConfig, field: str) -> Iterator[tuple[str, Any]]:
    """(where, the row's messages value or None) of a JSONL file or table."""
    column = cfg.messages_column
    if path.suffix.lower() == ".jsonl":
        for where, row in jsonl_rows(path, field):
            yield where, row.get(column)
        return
    schema, batches = open_table(path, column, field)
    if column not in schema.names:
        raise ConfigError(
            "data.messages_column", column, f"a column of {path}, which has {', '.join(schema.names) or 'none'}"
        )
    i = 0
    for values in column_values(batches, column):
        for value in values:
            yield f"row {i}", value
            i += 1


def read_conversations(path_str: str, cfg: DataConfig, field: str) -> list[Conversation]:
    """The conversations of a chat corpus (a JSONL or table file), checked, until `data.max_chars` characters of
    message content are read."""
    path = Path(path_str).expanduser()
    if not path.is_file() or path.suffix.lower() not in (".jsonl", *TABLE_SUFFIXES):
        raise ConfigError(field, path_str, "a chat corpus: a .jsonl, .parquet, .arrow or .feather file")
    out: list[Conversation] = []
    chars = 0
    for where, value in _rows(path, cfg, field):
        try:
            messages = check_conversation(value, f"{path} {where}", cfg.messages_column)
        except ValueError as e:
            raise ConfigError(field, message=str(e)) from None
        out.append(Conversation(f"{path} {where}", messages))
        chars += sum(len(m["content"]) for m in messages)
        if cfg.max_chars is not None and chars >= cfg.max_chars:
            break
    if not out:
        raise ConfigError(field, message=f"{path} holds no conversation")
    return out


# ---- the mask ----


def _render(template: ChatTemplate, messages: list[Message], generation: bool, where: str) -> str:
    try:
        return template.render(messages, generation)
    except Exception as e:  # a template's own raise_exception (roles must alternate, ...) or a bad message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{where}: the chat template ({template.name}) failed: {first}") from None


def assistant_spans(conversation: Conversation, template: ChatTemplate) -> tuple[str, list[tuple[int, int]]]:
    """(the conversation's text, the [start, end) character spans of its assistant turns): module docstring."""
    messages, where = conversation.messages, conversation.where
    text = _render(template, messages, False, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != ASSISTANT:
            continue
        before = _render(template, messages[:i], True, where)
        through = _render(template, messages[: i + 1], False, where)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"{where}: the chat template ({template.name}) does not render the conversation up to message {i} "
                "as the start of the whole one, so its assistant turns cannot be located"
            )
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return text, spans


def trained_tokens(offsets: np.ndarray, spans: list[tuple[int, int]], num_chars: int) -> np.ndarray:
    """bool (n,): the tokens whose characters [offsets[j, 0], offsets[j, 1]) overlap a span (a token of no
    characters counts as covering its start); `offsets` int64 (n, 2), `num_chars` the text's length."""
    inside = np.zeros(num_chars + 1, dtype=np.int64)  # (num_chars + 1,) 1 on assistant characters
    for start, end in spans:
        inside[start:end] = 1
    before = np.concatenate([[0], np.cumsum(inside)])  # (num_chars + 2,) assistant characters before c
    start = np.clip(offsets[:, 0], 0, num_chars)
    end = np.clip(np.maximum(offsets[:, 1], offsets[:, 0] + 1), 0, num_chars + 1)
    return before[end] - before[start] > 0


@dataclass(frozen=True)
class SplitRows:
    x: torch.Tensor  # int64 (N, block_size + 1): tokens, then pad ids
    y: torch.Tensor  # int64 (N, block_size): the next token where trained on, else IGNORE_INDEX
    counts: dict[str, int]  # conversations (rows kept), dropped, truncated, tokens, trained_tokens


def rows(
    encoded: list[tuple[np.ndarray, np.ndarray]],
    texts: list[str],
    spans: list[list[tuple[int, int]]],
    block_size: int,
    pad_id: int,
) -> SplitRows:
    """One row per conversation (module docstring, "Rows") from its encoding (ids (n,), offsets (n, 2))."""
    T = block_size
    x = np.full((len(texts), T + 1), pad_id, dtype=np.int64)  # (N, T + 1)
    y = np.full((len(texts), T), IGNORE_INDEX, dtype=np.int64)  # (N, T)
    keep = np.zeros(len(texts), dtype=bool)
    truncated = tokens = 0
    for i, ((ids, offsets), text, sp) in enumerate(zip(encoded, texts, spans)):
        trained = trained_tokens(offsets, sp, len(text))  # (n,)
        if len(ids) > T + 1:
            truncated += 1
            ids, trained = ids[: T + 1], trained[: T + 1]
        if not trained[1:].any():  # token 0 is no one's target
            continue
        keep[i] = True
        tokens += len(ids)
        x[i, : len(ids)] = ids
        y[i, : len(ids) - 1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
    x, y = x[keep], y[keep]
    counts = {
        "conversations": int(keep.sum()),
        "dropped": int((~keep).sum()),
        "truncated": truncated,
        "tokens": tokens,
        "trained_tokens": int((y != IGNORE_INDEX).sum()),
    }
    return SplitRows(torch.from_numpy(x), torch.from_numpy(y), counts)


# ---- the corpus ----


@dataclass(frozen=True)
class ChatCorpus:
    train: SplitRows
    test: SplitRows
    vocab_size: int
    meta: dict[str, Any]  # plain values: what the text dataset's meta holds, and `chat`


def _split(cfg: DataConfig) -> tuple[list[Conversation], list[Conversation], str, str]:
    """(training conversations, held-out ones, the source, the held-out source)."""
    assert cfg.train is not None
    train = read_conversations(cfg.train, cfg, "data.train")
    source = str(cfg.train)
    if cfg.test is not None:
        if not is_chat_source(cfg.test, cfg, "data.test"):
            raise ConfigError(
                "data.test",
                cfg.test,
                f"a chat corpus like data.train (a .jsonl or table file with a {cfg.messages_column!r} column)",
            )
        return train, read_conversations(cfg.test, cfg, "data.test"), source, str(cfg.test)
    if len(train) < 2:
        raise ConfigError(
            "data.train", message=f"{source} holds {len(train)} conversation: at least 2 to hold out the last ones"
        )
    held = min(len(train) - 1, max(1, round(len(train) * cfg.val_fraction)))
    return train[:-held], train[-held:], source, f"last {cfg.val_fraction:g} of the conversations of {source}"


def _split_rows(
    conversations: list[Conversation], template: ChatTemplate, tokenizer: Tokenizer, cfg: DataConfig, field: str
) -> tuple[SplitRows, list[str]]:
    texts, spans = [], []
    for c in conversations:
        try:
            text, sp = assistant_spans(c, template)
            text.encode("utf-8")  # a lone surrogate (JSON "\ud800") has no bytes to train on
        except UnicodeEncodeError as e:
            raise ConfigError(field, message=f"{c.where}: text that is not valid Unicode ({e.reason})") from None
        except ValueError as e:
            raise ConfigError(field, message=str(e)) from None
        texts.append(text)
        spans.append(sp)
    out = rows(tokenizer.encode_with_offsets(texts), texts, spans, cfg.block_size, tokenizer.pad_id)
    return out, texts


def chat_corpus(cfg: DataConfig) -> ChatCorpus:
    """The rows of the chat corpus `data.train` (and `data.test`), the tokenizer's vocabulary, and meta."""
    train, test, source, test_source = _split(cfg)
    # a trained tokenizer (bpe) learns from the training conversations as ChatML; a pretrained one ignores it
    tokenizer = TOKENIZERS.get_entry(cfg.tokenizer, "data.tokenizer")(
        "".join(chatml(c.messages, False) for c in train), cfg
    )
    template = chat_template(tokenizer)
    train_rows, train_texts = _split_rows(train, template, tokenizer, cfg, "data.train")
    test_rows, test_texts = _split_rows(test, template, tokenizer, cfg, "data.test" if cfg.test else "data.train")
    for split, r, where in (("training", train_rows, source), ("held-out", test_rows, test_source)):
        c = r.counts
        log.info(
            "text: %s chat rows from %s: %d conversations, %d tokens, %d trained on (assistant turns)",
            split,
            where,
            c["conversations"],
            c["tokens"],
            c["trained_tokens"],
        )
        if c["truncated"] or c["dropped"]:
            log.warning(
                "text: %s: %d conversations cut to data.block_size + 1 = %d tokens; %d dropped with no assistant "
                "token left",
                split,
                c["truncated"],
                cfg.block_size + 1,
                c["dropped"],
            )
        if c["conversations"] == 0:
            raise ConfigError(
                "data.block_size",
                cfg.block_size,
                f"more tokens: no {split} conversation of {where} keeps an assistant token within block_size + 1",
            )
    sha = hashlib.sha256()
    for text in train_texts + test_texts:
        sha.update(text.encode("utf-8") + b"\0")
    meta = {
        "source": source,
        "test_source": test_source,
        "corpus_sha256": sha.hexdigest(),  # of the rendered conversations, training then held-out
        "num_chars": sum(map(len, train_texts)) + sum(map(len, test_texts)),
        "tokenizer": cfg.tokenizer,
        "vocab_size": tokenizer.vocab_size,
        "num_train_tokens": train_rows.counts["tokens"],
        "num_test_tokens": test_rows.counts["tokens"],
        "tokenizer_json": tokenizer.to_json(),
        "block_size": cfg.block_size,
        "chat": {
            "messages_column": cfg.messages_column,
            "template": template.name,
            "template_sha256": template.sha256,
            "pad_id": tokenizer.pad_id,
            "train": train_rows.counts,
            "test": test_rows.counts,
        },
    }
    return ChatCorpus(train_rows, test_rows, tokenizer.vocab_size, meta)
