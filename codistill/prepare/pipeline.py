"""A prepare, end to end: plan the chunks, run them with Ray Data across the cluster's CPUs, write the manifest.

1. The job's sources are listed and fingerprinted, and cut into chunks (codistill.prepare.sources); the
   tokenizer is fixed first (a BPE is trained on a sample of the training text), or the image shape.
2. `key` hashes the fingerprints and the settings. A folder whose manifest has this key is already prepared:
   nothing is done. A folder whose `plan.json` has it is an interrupted prepare: chunks with a finished record
   in `parts/` are kept and only the others run.
3. The chunks run as Ray Data tasks (`from_items(...).map(run_chunk)`), streamed back as they finish, with a
   progress line of tokens (or images) per second.
4. The manifest is written last, from the records: a folder without it is never taken for a finished prepare.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from codistill.config import DataConfig
from codistill.data.manifest import FORMAT, MANIFEST, Manifest, Shard, Split, token_dtype
from codistill.data.parquet_images import declared_classes
from codistill.data.tokenizers import TOKENIZERS, HFTokenizer
from codistill.errors import ConfigError
from codistill.prepare import sources
from codistill.prepare.output import Output, PrepareError
from codistill.prepare.work import _lines, _table_text, part_name, run_chunk

__all__ = ["PREPARED_KINDS", "prepare"]

log = logging.getLogger("codistill")

PREPARED_KINDS = {"text": "tokens", "parquet": "images"}
"""What each dataset prepares into (`data.name` -> kind); the others are small and loaded in memory."""
BPE_SAMPLE_CHARS = 20_000_000  # a BPE vocabulary is trained on the first 20 M characters of the training text


def _tokenizer_spec(cfg: DataConfig, chunks: list[dict]) -> dict[str, Any]:
    if cfg.tokenizer == "byte":
        return {"name": "byte", "vocab_size": 256, "json": None}
    if cfg.tokenizer.startswith("hf:"):
        tok = HFTokenizer.load(cfg.tokenizer[3:])
        return {"name": cfg.tokenizer, "vocab_size": tok.vocab_size, "json": None}
    sample, total = [], 0
    limit = BPE_SAMPLE_CHARS if cfg.max_chars is None else min(cfg.max_chars, BPE_SAMPLE_CHARS)
    for c in chunks:
        if c["split"] != "train" or total >= limit:
            continue
        text = _lines(c) if c["kind"] == "lines" else _table_text(c)
        sample.append(text)
        total += len(text)
    trained = TOKENIZERS.get_entry(cfg.tokenizer, "data.tokenizer")("".join(sample)[:limit], cfg)
    return {"name": cfg.tokenizer, "vocab_size": trained.vocab_size, "json": trained.to_json()}


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _run_with_ray_data(todo: list[dict], spec: dict) -> Iterator[dict]:
    """Each chunk a Ray Data task anywhere in the cluster; records stream back as tasks finish."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            ray.init(include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the prepare's own progress line says tokens per second
    ctx.execution_options.preserve_order = False

    def one(row: dict) -> dict:  # chunks and records travel as JSON text: nested lists are not Arrow columns
        return {"result": json.dumps(run_chunk(json.loads(row["chunk"]), spec))}

    items = [{"chunk": json.dumps(c)} for c in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(one, num_cpus=1)
    for row in ds.iter_rows():
        yield json.loads(row["result"])


def _run_in_process(todo: list[dict], spec: dict) -> Iterator[dict]:
    for c in todo:
        yield run_chunk(c, spec)


RUNNERS: dict[str, Callable[[list[dict], dict], Iterator[dict]]] = {"ray": _run_with_ray_data, "local": _run_in_process}


class _Progress:
    """One line, rewritten in place on a terminal (a line every 10 s elsewhere): shards, elements, rate."""

    def __init__(self, total_shards: int, unit: str, say: Callable[[str], None]):
        self.total, self.unit, self.say = total_shards, unit, say
        self.done, self.count, self.t0, self.last = 0, 0, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, count: int) -> None:
        self.done += 1
        self.count += count
        now = time.perf_counter()
        line = (
            f"prepare: {self.done}/{self.total} shards, {self.count:,} {self.unit}, "
            f"{self.count / max(now - self.t0, 1e-9):,.0f} {self.unit}/s"
        )
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif now - self.last >= 10 or self.done == self.total:
            self.say(line)
            self.last = now

    def close(self) -> None:
        if self.tty and self.done:
            print(file=sys.stderr)


def prepare(
    cfg: DataConfig,
    out: str,
    *,
    shard_mb: float = 64,
    runner: str = "ray",
    say: Callable[[str], None] = print,
) -> Manifest:
    """Prepare the sources of `cfg` into shards and a manifest at `out` (module docstring)."""
    kind = PREPARED_KINDS.get(cfg.name)
    if kind is None:
        raise ConfigError("data.name", cfg.name, f"a dataset that is prepared into shards: {', '.join(PREPARED_KINDS)}")
    if runner not in RUNNERS:
        raise ConfigError("runner", runner, f"one of {', '.join(RUNNERS)}")
    shard_bytes = max(1, int(shard_mb * (1 << 20)))
    if kind == "tokens":
        chunks, fingerprints = sources.plan_text(cfg, shard_bytes)
        tokenizer = _tokenizer_spec(cfg, chunks)
        spec: dict[str, Any] = {"kind": kind, "tokenizer": tokenizer}
        settings = {"text_column": cfg.text_column, "val_fraction": cfg.val_fraction, "max_chars": cfg.max_chars}
        settings["tokenizer_sha256"] = _key(tokenizer)
        class_names = None
    else:
        chunks, fingerprints, class_names, shape = sources.plan_images(cfg, shard_bytes)
        spec = {"kind": kind, "shape": list(shape)}
        settings = {"shape": list(shape), "num_classes": cfg.num_classes}
    settings.update(kind=kind, shard_mb=shard_mb, format=FORMAT)
    key = _key({"sources": fingerprints, "settings": settings})
    output = Output(out)
    spec.update(out=output.location, key=key)
    existing = output.read_text(MANIFEST)
    if existing is not None:
        try:
            done_before = Manifest.from_json(existing, f"{out}/{MANIFEST}")
        except ConfigError:
            done_before = None
        if done_before is not None and done_before.key == key:
            say(f"prepare: {out} is already prepared from these sources ({_describe(done_before)}); nothing to do")
            return done_before
        output.remove(MANIFEST)  # from other sources or settings: it stops describing the folder now
    plan = {"key": key, "chunks": chunks}
    records: dict[tuple[str, int], dict] = {}
    old_plan = output.read_text("plan.json")
    if old_plan is not None and json.loads(old_plan).get("key") == key:
        for c in chunks:  # an interrupted prepare: keep what finished
            text = output.read_text(part_name(c))
            if text is None:
                continue
            rec = json.loads(text)
            shard = rec["shard"]
            if (
                rec.get("key") == key
                and output.size(shard["file"]) == shard["bytes"]
                and ("labels" not in shard or output.size(shard["labels"]) == shard["labels_bytes"])
            ):
                records[(c["split"], c["index"])] = rec
        if records:
            say(f"prepare: resuming: {len(records)} of {len(chunks)} shards are already written")
    else:
        output.write("plan.json", [json.dumps(plan).encode()])
    todo = [c for c in chunks if (c["split"], c["index"]) not in records]
    unit = "tokens" if kind == "tokens" else "images"
    say(f"prepare: {len(chunks)} shards of {cfg.train}" + (f" and {cfg.test}" if cfg.test else "") + f" into {out}")
    progress = _Progress(len(todo), unit, say)
    try:
        for rec in RUNNERS[runner](todo, spec):
            if "error" in rec:
                raise PrepareError(f"{rec['error']} (finished shards are kept: fix it and run the same command again)")
            records[(rec["split"], rec["index"])] = rec
            progress.update(rec["shard"]["count"])
    finally:
        progress.close()
    manifest = _manifest(kind, key, chunks, records, fingerprints, settings, spec, cfg, class_names)
    output.write(MANIFEST, [manifest.to_json().encode()])
    say(f"prepare: wrote {out}/{MANIFEST}: {_describe(manifest)}")
    return manifest


def _manifest(
    kind: str,
    key: str,
    chunks: list[dict],
    records: dict[tuple[str, int], dict],
    fingerprints: dict,
    settings: dict,
    spec: dict,
    cfg: DataConfig,
    class_names: list[str] | None,
) -> Manifest:
    splits = {}
    for split in ("train", "test"):
        shards = tuple(Shard(**records[(c["split"], c["index"])]["shard"]) for c in chunks if c["split"] == split)
        splits[split] = Split(sum(s.count for s in shards), shards)
    common: dict[str, Any] = {"kind": kind, "key": key, "splits": splits, "sources": fingerprints, "settings": settings}
    if kind == "tokens":
        tok = spec["tokenizer"]
        return Manifest(**common, dtype=token_dtype(int(tok["vocab_size"])), tokenizer=tok)
    stats = [r["stats"] for (split, _), r in records.items() if split == "train"]
    c = spec["shape"][0]
    pixels = sum(s["pixels"] for s in stats)
    mean = [sum(s["sum"][i] for s in stats) / max(pixels, 1) for i in range(c)]
    var = [sum(s["sumsq"][i] for s in stats) / max(pixels, 1) - mean[i] ** 2 for i in range(c)]
    std = [max(v, 0.0) ** 0.5 or 1e-6 for v in var]
    lowest = min(r["stats"]["min_label"] for r in records.values())
    highest = max(r["stats"]["max_label"] for r in records.values())
    num_classes = len(class_names) if class_names else cfg.num_classes
    if num_classes is None:
        declared = [declared_classes(_schema_metadata(p["path"])) for p in fingerprints["train"]]
        num_classes = next((d for d in declared if d), highest + 1)
    if lowest < 0 or highest >= num_classes:
        raise PrepareError(f"labels lie in [{lowest}, {highest}], outside [0, {num_classes}) (set data.num_classes)")
    return Manifest(
        **common,
        shape=tuple(spec["shape"]),
        num_classes=max(2, num_classes),
        mean=tuple(mean),
        std=tuple(std),
    )


def _schema_metadata(path: str) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).schema_arrow.metadata if Path(path).suffix == ".parquet" else None


def _describe(m: Manifest) -> str:
    unit = "tokens" if m.kind == "tokens" else "images"
    what = f"tokenizer {m.tokenizer.get('name')}" if m.kind == "tokens" else "x".join(map(str, m.shape))
    return (
        f"{m.splits['train'].count:,} train + {m.splits['test'].count:,} test {unit} in "
        f"{len(m.splits['train'].shards) + len(m.splits['test'].shards)} shards, {what}"
    )
