"""`data.loader: ray_data` without Ray: images decoded from their sources in shuffle windows, each rank's stream a
pure function of (seed, epoch, rank); the rows are the in-memory loader's; refusals before anything starts.
tests/ray/test_ray_data_loader.py decodes the same windows with Ray Data."""

import numpy as np
import pytest
import torch

from codistill.api import run_job
from codistill.config import DataConfig
from codistill.data import load_dataset
from codistill.data.streamed import StreamedBatches, decode_here, stream_plan, window_ids
from codistill.errors import ConfigError
from codistill.prepare import prepare
from tests.helpers import small_job
from tests.unit.test_prepared_data import image_parquet


def sources(tmp_path, n_train: int = 120):
    image_parquet(tmp_path / "train.parquet", n_train)
    image_parquet(tmp_path / "test.parquet", 20, seed=1)
    return {"name": "parquet", "train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}


def test_rank_streams_are_pure_disjoint_windows_of_the_in_memory_rows(tmp_path):
    src = sources(tmp_path)
    memory = load_dataset(DataConfig(**src))
    ds = load_dataset(DataConfig(**src, loader="ray_data", shuffle_window=16))  # chunks of 2 images
    assert ds.lazy and ds.input_shape == memory.input_shape and ds.num_classes == memory.num_classes
    assert torch.equal(ds.train_y[:], memory.train_y[:]) and torch.equal(ds.test_x[:20], memory.test_x[:20])
    assert ds.mean == pytest.approx(memory.mean, abs=1e-6) and ds.augment
    plan = stream_plan(ds)
    assert plan is not None and plan.num_rows == 120

    def rank(r: int, seed: int = 7, **kw) -> StreamedBatches:
        return StreamedBatches(plan, order_seed=seed, batch_size=5, rank=r, world_size=2, **kw)

    ranks = [rank(0), rank(1)]
    epoch = [np.concatenate([window_ids(w) for w in b.windows(0)]) for b in ranks]
    assert not set(epoch[0]) & set(epoch[1]) and len(epoch[0]) + len(epoch[1]) == 120  # each image once an epoch
    assert np.array_equal(ranks[1].batch_ids(0).numpy(), epoch[1][:5])  # a rank's stream is its windows in order
    for r, b in enumerate(ranks):
        for step in (0, 1, 2, 11, 12, 30):
            ids, x, y = b.batch(step)
            assert torch.equal(ids, b.batch_ids(step))
            assert torch.equal(x, memory.train_x[ids]) and torch.equal(y, memory.train_y[ids])
        # a fresh stream (a resume, a restart) at step 31 reads what the running one reads
        assert torch.equal(rank(r).batch(31)[1], b.batch(31)[1])
    rows = [len(e) for e in epoch]
    assert not torch.equal(rank(0, seed=8).batch_ids(0), ranks[0].batch_ids(0))
    assert not torch.equal(ranks[0].batch_ids(0), ranks[0].batch_ids(rows[0] // 5 + 1))  # epochs reshuffle
    # data.shard disjoint: each peer streams the chunks dealt to it
    peers = [StreamedBatches(plan, order_seed=i, batch_size=5, shard_index=i, num_shards=2) for i in range(2)]
    mine = [set(p.mine.tolist()) for p in peers]
    assert not mine[0] & mine[1] and mine[0] | mine[1] == set(range(len(plan.chunks)))


def test_class_folders_stream_mixed_classes_and_the_decoder_thread_raises_a_bad_image(tmp_path):
    from PIL import Image

    for split, n in (("train", 48), ("test", 6)):
        for c in ("cat", "dog", "emu"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n // 3):
                Image.new("RGB", (9, 7), color=(i * 10, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    cfg = DataConfig(
        name="parquet", train=str(tmp_path / "train"), test=str(tmp_path / "test"), loader="ray_data", shuffle_window=16
    )
    ds = load_dataset(cfg)
    plan = stream_plan(ds)
    assert plan is not None and ds.input_shape == (3, 7, 9)
    first = [label for c in plan.chunks[:4] for _, label in c["items"]]
    assert len(set(first)) > 1  # the listing (by class) was shuffled once before it was cut into chunks
    stream = StreamedBatches(plan, order_seed=0, batch_size=8)
    _, x, y = stream.batch(0)
    assert x.shape == (8, 3, 7, 9) and torch.equal(y, ds.train_y[stream.batch_ids(0)])
    (tmp_path / "train" / "dog" / "0.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match="0.png: the image does not decode"):
        for w in stream.windows(0):
            list(decode_here([w]))


def test_ray_data_is_refused_where_it_cannot_keep_the_exchange_s_promise(tmp_path):
    with pytest.raises(ConfigError, match="data.loader.*exchange.mode=logits.*checkpoint"):
        small_job("data.name=parquet", "data.loader=ray_data", "exchange.mode=logits")
    with pytest.raises(ConfigError, match="data.loader.*data.name 'digits'"):
        DataConfig(loader="ray_data")
    src = sources(tmp_path, 40)
    prepare(DataConfig(**src), str(tmp_path / "prep"), runner="local", say=lambda s: None)
    with pytest.raises(ConfigError, match="data.loader.*prepared folder"):
        load_dataset(DataConfig(name="parquet", train=str(tmp_path / "prep"), loader="ray_data"))
    plan = stream_plan(load_dataset(DataConfig(**src, loader="ray_data")))
    assert plan is not None
    with pytest.raises(ConfigError, match="data.shuffle_window.*fewer than its 2 ranks"):
        StreamedBatches(plan, order_seed=0, batch_size=4, world_size=2)


def test_a_run_streams_its_images_in_checkpoint_mode(tmp_path):
    src = sources(tmp_path)
    cfg = small_job(
        f"data={{name: parquet, train: {src['train']}, test: {src['test']}, batch_size: 8, loader: ray_data, "
        "shuffle_window: 16}",
        "exchange.mode=checkpoint",
        "exchange.period=5",
        steps=20,
    )
    summary = run_job(cfg, tmp_path / "run")
    assert [p["steps"] for p in summary["peers"]] == [20, 20]
