"""Prepared data (`python -m codistill.prepare`, run in-process here; tests/ray runs it with Ray Data): shards and a
manifest for text and images, read lazily with the guarantees of the in-memory path; a no-op re-run, an
interrupted prepare that resumes, a changed source, damaged shards and a wrong tokenizer."""

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from codistill.config import DataConfig
from codistill.data import load_dataset
from codistill.data.text import windows
from codistill.errors import ConfigError
from codistill.peer.batches import PeerData
from codistill.prepare import prepare
from codistill.prepare.output import PrepareError
from tests.helpers import ROOT, small_job


def corpus(tmp_path, n_lines: int = 3000):
    """A text corpus of varied lines (UTF-8, some multi-byte)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "délta", "epsilon", "ζeta", "eta", "theta"]
    lines = [" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(n_lines)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def text_cfg(train, **kw) -> DataConfig:
    return DataConfig(**{"name": "text", "train": str(train), "max_chars": None, "block_size": 16, **kw})


def test_text_prepares_into_shards_that_read_as_the_in_memory_windows(tmp_path):
    src = corpus(tmp_path)
    out = tmp_path / "prep"
    m = prepare(text_cfg(src), str(out), shard_mb=0.01, runner="local", say=lambda s: None)
    assert len(m.splits["train"].shards) > 3 and m.dtype == "uint16"  # several shards: windows cross them
    raw = src.read_bytes()
    # the byte tokenizer's stream is the file's bytes: train is a prefix cut at a line, test the rest
    assert m.splits["train"].count + m.splits["test"].count == len(raw)
    assert raw[m.splits["train"].count - 1 : m.splits["train"].count] == b"\n"
    assert m.splits["test"].count == pytest.approx(0.1 * len(raw), abs=200)
    ds = load_dataset(DataConfig(name="text", train=str(out), block_size=16))
    assert ds.lazy and ds.task == "causal_lm" and ds.num_classes == 256
    expected = windows(np.frombuffer(raw[: m.splits["train"].count], dtype=np.uint8), 16)
    assert ds.train_x.shape == tuple(expected.shape)
    ids = torch.tensor([0, 5, len(expected) - 1, 17, 17])
    assert torch.equal(ds.train_x[ids], expected[ids])
    assert torch.equal(ds.train_x[3:40], expected[3:40])  # evaluation reads a span at once
    test = windows(np.frombuffer(raw[m.splits["train"].count :], dtype=np.uint8), 16)
    assert torch.equal(ds.test_x[: len(test)], test)
    # the same job names the same data from its raw source: data.name text with data.train the folder
    assert load_dataset(text_cfg(out)).train_x.shape == ds.train_x.shape


def test_peers_read_lazily_with_the_same_ids_per_step_disjoint_shards_and_a_pure_order(tmp_path):
    out = tmp_path / "prep"
    prepare(text_cfg(corpus(tmp_path)), str(out), shard_mb=0.01, runner="local", say=lambda s: None)
    ds = load_dataset(DataConfig(name="text", train=str(out), block_size=16))
    cfg = DataConfig(name="text", train=str(out), block_size=16, batch_size=8)
    a, b = (PeerData(ds, cfg, order_seed=3, aug_seed=i) for i in range(2))
    for step in (0, 1, 2, 500, 501):  # lockstep peers draw the same ids; a batch is the windows of its ids
        ids, x, y = a.batch(step)
        ids_b, x_b, _ = b.batch(step)
        assert torch.equal(ids, ids_b) and torch.equal(x, x_b)
        assert torch.equal(x, ds.train_x[ids][:, :-1]) and torch.equal(y, ds.train_x[ids][:, 1:])
    first = PeerData(ds, cfg, order_seed=3, aug_seed=0).batch(501)[0]  # a fresh reader (resume) agrees
    assert torch.equal(first, a.batch(501)[0])
    epoch = torch.cat([a.batch_ids(s) for s in range(a.steps_per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch)  # an epoch visits each window at most once
    shards = [
        PeerData(ds, DataConfig(name="text", batch_size=8), order_seed=i, aug_seed=i, shard_index=i, num_shards=3)
        for i in range(3)
    ]
    seen = [set(s.sample_ids[torch.arange(len(s.sample_ids))].tolist()) for s in shards]
    assert not (seen[0] & seen[1] or seen[1] & seen[2] or seen[0] & seen[2])
    assert set().union(*seen) == set(range(len(ds.train_x)))
    assert set(shards[1].batch(7)[0].tolist()) <= seen[1]


def test_a_rerun_is_a_no_op_an_interrupted_prepare_resumes_and_a_changed_source_prepares_again(tmp_path):
    src = corpus(tmp_path)
    out = tmp_path / "prep"
    said: list[str] = []
    first = prepare(text_cfg(src), str(out), shard_mb=0.01, runner="local", say=said.append)
    shards = sorted(out.glob("train-*.tok"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    again = prepare(text_cfg(src), str(out), shard_mb=0.01, runner="local", say=said.append)
    assert again == first and "nothing to do" in said[-1]
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps
    # interrupted: the manifest was never written and the last shards never finished
    (out / "manifest.json").unlink()
    for p in shards[-2:]:
        p.unlink()
        (out / "parts" / (p.stem + ".json")).unlink()
    said.clear()
    resumed = prepare(text_cfg(src), str(out), shard_mb=0.01, runner="local", say=said.append)
    total = len(first.splits["train"].shards) + len(first.splits["test"].shards)
    assert f"resuming: {total - 2} of {total} shards are already written" in said[0], said
    assert resumed == first
    assert all(p.stat().st_mtime_ns == stamps[p] for p in shards[:-2])  # finished shards were not rewritten
    # a changed source is prepared again, and the folder no longer claims the old content
    with src.open("a", encoding="utf-8") as f:
        f.write("a new line at the end\n")
    changed = prepare(text_cfg(src), str(out), shard_mb=0.01, runner="local", say=said.append)
    assert changed.key != first.key
    assert changed.splits["train"].count + changed.splits["test"].count == src.stat().st_size


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped", "no_manifest"])
def test_a_damaged_prepared_folder_is_one_line_before_training(tmp_path, damage):
    out = tmp_path / "prep"
    prepare(text_cfg(corpus(tmp_path)), str(out), shard_mb=0.01, runner="local", say=lambda s: None)
    shard = out / "train-00001.tok"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "flipped":
        data = bytearray(shard.read_bytes())
        data[100] ^= 1
        shard.write_bytes(bytes(data))
    else:
        (out / "manifest.json").unlink()
    with pytest.raises(ConfigError) as e:
        load_dataset(DataConfig(name="prepared", train=str(out), block_size=16))
    message = str(e.value)
    assert "\n" not in message and "codistill.prepare" in message
    assert ("train-00001.tok" in message) == (damage != "no_manifest")


def test_the_tokenizer_must_be_the_manifest_s_and_a_split_must_hold_a_window(tmp_path):
    out = tmp_path / "prep"
    prepare(text_cfg(corpus(tmp_path, 40)), str(out), shard_mb=0.01, runner="local", say=lambda s: None)
    with pytest.raises(ConfigError, match=r"data.tokenizer: got 'bpe'; allowed: 'byte', the tokenizer"):
        load_dataset(DataConfig(name="text", train=str(out), tokenizer="bpe"))
    with pytest.raises(ConfigError, match=r"data.block_size: got 4096; allowed: at most .* not one window"):
        load_dataset(DataConfig(name="text", train=str(out), block_size=4096))


def test_a_file_that_is_not_utf8_fails_the_prepare_in_one_line_and_writes_no_manifest(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"good line\n" * 50 + b"\xff\xfe broken\n")
    with pytest.raises(PrepareError, match="is not UTF-8 text near byte 500"):
        prepare(text_cfg(src), str(tmp_path / "prep"), runner="local", say=lambda s: None)
    assert not (tmp_path / "prep" / "manifest.json").exists()


def test_jsonl_and_parquet_text_sources_and_a_folder(tmp_path):
    docs = [f"document {i} " + "word " * (i % 7) for i in range(400)]
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[:200])))
    pq.write_table(pa.table({"text": docs[200:]}), folder / "b.parquet", row_group_size=50)
    m = prepare(text_cfg(folder), str(tmp_path / "prep"), shard_mb=0.002, runner="local", say=lambda s: None)
    stream = b"".join(
        np.fromfile(tmp_path / "prep" / s.file, dtype="<u2").astype(np.uint8).tobytes()
        for split in ("train", "test")
        for s in m.splits[split].shards
    )
    for d in docs:  # every document is in the stream, once, whichever split holds it
        assert stream.count(d.encode() + b"\n\n") == 1


def image_parquet(path, n: int, size=(12, 10), mode="RGB", seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
        labels.append(i % 3)
    pq.write_table(pa.table({"image": images, "label": labels}), path, row_group_size=16)


def test_images_from_parquet_and_class_folders_prepare_into_uint8_shards(tmp_path):
    from PIL import Image

    image_parquet(tmp_path / "train.parquet", 40)
    image_parquet(tmp_path / "test.parquet", 10, seed=1)
    cfg = DataConfig(name="parquet", train=str(tmp_path / "train.parquet"), test=str(tmp_path / "test.parquet"))
    m = prepare(cfg, str(tmp_path / "prep"), shard_mb=0.001, runner="local", say=lambda s: None)
    assert m.shape == (3, 10, 12) and m.num_classes == 3 and len(m.splits["train"].shards) > 2
    lazy = load_dataset(DataConfig(name="parquet", train=str(tmp_path / "prep")))
    memory = load_dataset(cfg)
    assert torch.equal(lazy.train_x[torch.arange(40)], memory.train_x[:]) and torch.equal(
        lazy.test_y[:], memory.test_y[:]
    )
    assert lazy.mean == pytest.approx(memory.mean, abs=1e-3) and lazy.augment
    # class folders, resized to data.image_size
    for split, n in (("train", 9), ("test", 3)):
        for c in ("cat", "dog", "emu"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n // 3):
                Image.new("L", (20, 16), color=i * 40).save(tmp_path / split / c / f"{i}.png")
    folders = DataConfig(name="parquet", train=str(tmp_path / "train"), test=str(tmp_path / "test"), image_size=(8, 8))
    m = prepare(folders, str(tmp_path / "prep2"), runner="local", say=lambda s: None)
    assert m.shape == (1, 8, 8) and m.num_classes == 3 and m.splits["train"].count == 9
    ds = load_dataset(DataConfig(name="prepared", train=str(tmp_path / "prep2")))
    assert ds.train_y[:].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and ds.train_x[torch.tensor([4])].shape == (1, 1, 8, 8)


def test_a_run_trains_from_a_prepared_folder_through_the_front_door(tmp_path):
    out = tmp_path / "prep"
    r = subprocess.run(
        [sys.executable, "-m", "codistill.prepare", "--config", str(ROOT / "jobs" / "lm_quickstart.yaml"), "--local",
         "--set", f"data.train={corpus(tmp_path)}", "--set", "data.max_chars=null", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0 and "wrote" in r.stdout, r.stdout + r.stderr
    from codistill.api import run_job

    cfg = small_job(
        "data={name: text, block_size: 16, batch_size: 8, eval_batch_size: 64}",
        f"data.train={out}",
        "data.limit_test=64",
        "peers=[{model: gpt-tiny}, {model: gpt-tiny}]",
        steps=20,
    )
    summary = run_job(cfg, tmp_path / "run")
    assert [p["steps"] for p in summary["peers"]] == [20, 20]
    assert summary["data"]["prepared"] == str(out)


def test_a_disk_that_fills_during_a_prepare_is_one_line_and_a_rerun_keeps_the_finished_shards(tmp_path):
    """A 400 KB tmpfs takes the first shards of a 600 KB corpus: one line that says what to do, no temporary
    file and no manifest left; on a larger disk the same command goes on from the finished shards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        src = corpus(tmp_path, 40_000)
        assert src.stat().st_size > 500_000
        with pytest.raises(PrepareError) as e:
            prepare(text_cfg(src), str(disk / "prep"), shard_mb=0.05, runner="local", say=lambda s: None)
        message = str(e.value)
        assert "\n" not in message and "no space left" in message and "run the same command again" in message
        left = sorted(p.name for p in (disk / "prep").rglob("*"))
        assert not any(n.endswith(".part") for n in left) and "manifest.json" not in left, left
        finished = len(list((disk / "prep" / "parts").glob("*.json")))
        assert finished >= 1
        subprocess.run(["cp", "-a", str(disk / "prep"), str(tmp_path / "prep")], check=True)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    said: list[str] = []
    m = prepare(text_cfg(src), str(tmp_path / "prep"), shard_mb=0.05, runner="local", say=said.append)
    assert (
        f"resuming: {finished} of" in said[0] and m.splits["train"].count + m.splits["test"].count == src.stat().st_size
    )


def test_a_prepare_of_changed_sources_cut_short_never_keeps_the_old_sources_shards(tmp_path, monkeypatch):
    """The sources change (a line put in front shifts every shard's bytes), and the prepare of the new sources is
    cut short after its first shard: resuming it must not take the old prepare's finished shards (same names,
    same sizes) for finished shards of the new plan."""
    from codistill.prepare import pipeline

    src = corpus(tmp_path)
    out = tmp_path / "prep"
    prepare(text_cfg(src), str(out), shard_mb=0.01, runner="local", say=lambda s: None)
    src.write_bytes(b"z\n" + src.read_bytes()[:-2])  # same size: every shard boundary holds other bytes

    def cut_after_one(todo, spec):
        yield next(pipeline.RUNNERS["local"](todo, spec))
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline.RUNNERS, "cut", cut_after_one)
    with pytest.raises(KeyboardInterrupt):
        prepare(text_cfg(src), str(out), shard_mb=0.01, runner="cut", say=lambda s: None)
    said: list[str] = []
    m = prepare(text_cfg(src), str(out), shard_mb=0.01, runner="local", say=said.append)
    assert "resuming: 1 of" in said[0], said
    stream = b"".join((out / s.file).read_bytes() for split in ("train", "test") for s in m.splits[split].shards)
    assert np.frombuffer(stream, dtype="<u2").astype(np.uint8).tobytes() == src.read_bytes()


@pytest.mark.slow  # the S3 client retries a refused connection for ~8 s
def test_an_unreachable_uri_is_one_line_before_training():
    uri = "s3://bucket/prepared?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"  # nothing listens
    with pytest.raises(ConfigError) as e:
        load_dataset(DataConfig(name="text", train=uri))
    line = str(e.value)
    assert "\n" not in line and line.startswith("data.train: cannot read s3://bucket/prepared/manifest.json (")
    assert "Could not connect" in line and line.endswith("check the URI, the store's credentials and the network")
