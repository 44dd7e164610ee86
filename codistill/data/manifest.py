"""The manifest of a prepared data set (`python -m codistill.prepare`): what a folder of shards holds.

A prepared folder (a local path or any `pyarrow.fs` URI) holds fixed-layout shards and one `manifest.json`,
written last (a folder without it is never taken for a finished prepare):

- `kind: tokens`: each split is a flat token stream cut into shards `<split>-NNNNN.tok` of `dtype` (uint16
  when the vocabulary fits, else uint32), little-endian, memory-mappable as nanoGPT's and Megatron's `.bin`.
  Window i of a split is tokens[i*T : i*T + T + 1] of the stream (T = the job's `data.block_size`, chosen at
  training time; a window may cross shards).
- `kind: images`: each shard is `<split>-NNNNN.img`, uint8 images (n, C, H, W) one after another, and
  `<split>-NNNNN.lab`, int64 labels (n,).

Each shard is listed with its element count, byte sizes and SHA-256, so a missing, truncated or damaged
shard is found before training starts. No ray, no mlflow, no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from codistill.errors import ConfigError

__all__ = ["FORMAT", "MANIFEST", "Manifest", "Shard", "Split", "token_dtype"]

FORMAT = "codistill-prepared/1"
MANIFEST = "manifest.json"
KINDS = ("tokens", "images")
DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int) -> str:
    """The narrowest dtype that holds every token id (uint16: 2 bytes per token up to 65,536 symbols)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass(frozen=True)
class Shard:
    """One shard file (and, for images, its labels file): `count` tokens or images."""

    file: str
    count: int
    bytes: int
    sha256: str
    labels: str | None = None
    labels_bytes: int = 0
    labels_sha256: str | None = None


@dataclass(frozen=True)
class Split:
    count: int  # tokens (kind tokens) or images (kind images) in all shards
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` says. `key` is the hash of everything that decides the shards' content (the
    sources' fingerprints and the prepare settings): re-running a prepare with the same key is a no-op."""

    kind: str
    key: str
    splits: dict[str, Split]
    sources: dict[str, list[dict[str, Any]]]
    settings: dict[str, Any]
    dtype: str = "uint8"
    tokenizer: dict[str, Any] = field(default_factory=dict)  # name, vocab_size, json (bpe), hf name
    shape: tuple[int, ...] = ()  # images: (C, H, W)
    num_classes: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    format: str = FORMAT

    @property
    def element_bytes(self) -> int:
        """Bytes per token, or per image."""
        if self.kind == "tokens":
            return 2 if self.dtype == "uint16" else 4
        c, h, w = self.shape
        return c * h * w

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse and check a manifest; anything wrong is one ConfigError naming `where`."""

        def bad(what: str) -> ConfigError:
            return ConfigError(
                "data.train",
                message=f"{where} is not a codistill prepared manifest ({what}); run python -m codistill.prepare again",
            )

        try:
            raw = json.loads(text)
        except ValueError as e:
            raise bad(f"not JSON: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise bad(f"format {raw.get('format') if isinstance(raw, dict) else None!r}, expected {FORMAT!r}")
        try:
            splits = {
                name: Split(int(s["count"]), tuple(Shard(**sh) for sh in s["shards"]))
                for name, s in raw["splits"].items()
            }
            m = cls(
                kind=str(raw["kind"]),
                key=str(raw["key"]),
                splits=splits,
                sources=dict(raw.get("sources", {})),
                settings=dict(raw.get("settings", {})),
                dtype=str(raw.get("dtype", "uint8")),
                tokenizer=dict(raw.get("tokenizer") or {}),
                shape=tuple(int(d) for d in raw.get("shape", ())),
                num_classes=int(raw.get("num_classes", 0)),
                mean=tuple(float(v) for v in raw.get("mean", ())),
                std=tuple(float(v) for v in raw.get("std", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"{type(e).__name__}: {e}") from None
        if m.kind not in KINDS:
            raise bad(f"kind {m.kind!r}, expected one of {KINDS}")
        if m.kind == "tokens" and m.dtype not in DTYPES:
            raise bad(f"dtype {m.dtype!r}, expected one of {DTYPES}")
        if m.kind == "images" and (len(m.shape) != 3 or min(m.shape) < 1 or m.num_classes < 2):
            raise bad(f"image shape {m.shape} and {m.num_classes} classes")
        if set(m.splits) != {"train", "test"}:
            raise bad(f"splits {sorted(m.splits)}, expected train and test")
        for name, split in m.splits.items():
            if split.count != sum(s.count for s in split.shards) or any(s.count < 0 for s in split.shards):
                raise bad(f"split {name} counts {split.count} but its shards add up to another number")
            for s in split.shards:
                if "/" in s.file or s.file.startswith(".") or (s.labels and ("/" in s.labels or s.labels[0] == ".")):
                    raise bad(f"shard name {s.file!r} is not a plain file name")  # never read outside the folder
                if s.bytes != s.count * m.element_bytes:
                    raise bad(f"shard {s.file} has {s.count} elements but {s.bytes} bytes")
        return m
