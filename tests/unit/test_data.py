import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from codistill.config import DataConfig
from codistill.data import DATASETS, load_dataset, random_crop_flip
from codistill.peer.batches import PeerData
from tests.helpers import SHARED_DATASETS


def test_digits_fixed_split():
    a, b = load_dataset(DataConfig(name="digits")), load_dataset(DataConfig(name="digits"))
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.train_y) + len(a.test_y) == 1797 and len(a.test_y) == 359
    assert torch.equal(a.test_y[:], b.test_y[:]) and torch.equal(a.test_x[:], b.test_x[:])


def test_unknown_dataset_names_allowed():
    with pytest.raises(ValueError, match="data.name: got 'imagenet'.*digits"):
        load_dataset(DataConfig(name="imagenet"))


def _write_idx(path: Path, arr: np.ndarray) -> None:
    dims = arr.shape
    magic = 0x0800 | len(dims)  # unsigned byte data
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + arr.tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_mnist_from_real_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,), dtype=np.uint8))
    ds = load_dataset(DataConfig(name=name, root=str(tmp_path)))
    assert ds.train_x.shape == (50, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_y.shape == (20,) and ds.num_classes == 10
    labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes()[8:], dtype=np.uint8)
    assert ds.test_y[:].tolist() == labels.tolist()


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(ValueError) as e:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)))
    assert str(tmp_path) in str(e.value) and "data.download=true" in str(e.value)
    with pytest.raises(ValueError) as e:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert "cifar-10-batches-py" in str(e.value) and "data_batch_1" in str(e.value)


def _write_cifar(base: Path, files: dict[str, int], label_key: str, classes: int) -> None:
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for fname, n in files.items():
        entry = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, n).tolist(),
            "batch_label": fname,
        }
        with open(base / fname, "wb") as f:
            pickle.dump(entry, f)


def test_cifar10_and_cifar100_from_python_batches(tmp_path):
    _write_cifar(
        tmp_path / "cifar-10-batches-py",
        {**{f"data_batch_{i}": 10 for i in range(1, 6)}, "test_batch": 7},
        "labels",
        10,
    )
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert ds.train_x.shape == (50, 3, 32, 32) and ds.test_x.shape == (7, 3, 32, 32) and ds.augment
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        entry = pickle.load(f)
    assert torch.equal(ds.test_x[3], torch.from_numpy(entry["data"][3].reshape(3, 32, 32)))
    _write_cifar(tmp_path / "cifar-100-python", {"train": 30, "test": 5}, "fine_labels", 100)
    ds = load_dataset(DataConfig(name="cifar100", root=str(tmp_path)))
    assert ds.num_classes == 100 and ds.train_y.shape == (30,)


def test_parquet_hugging_face_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, n in (("train", 12), ("test", 4)):
        imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        rows = []
        for im in imgs:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            rows.append({"bytes": buf.getvalue(), "path": None})
        pq.write_table(pa.table({"image": rows, "label": rng.integers(0, 10, n)}), tmp_path / f"{split}.parquet")
        if split == "test":
            test_imgs = imgs
    ds = load_dataset(
        DataConfig(
            name="parquet", train=str(tmp_path / "train.parquet"), test=str(tmp_path / "test.parquet"), num_classes=10
        )
    )  # random labels: some of 0..9 may not occur, so the class count is given
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.augment
    assert torch.equal(ds.test_x[1], torch.from_numpy(test_imgs[1]).permute(2, 0, 1))


@pytest.mark.skipif(not (SHARED_DATASETS / "mnist" / "test.parquet").exists(), reason="shared datasets not present")
def test_real_mnist_parquet():
    ds = load_dataset(
        DataConfig(
            name="parquet",
            train=str(SHARED_DATASETS / "mnist" / "test.parquet"),
            test=str(SHARED_DATASETS / "mnist" / "test.parquet"),
            limit_train=100,
        )
    )
    assert ds.test_x.shape == (10000, 1, 28, 28) and ds.num_classes == 10 and not ds.augment


def test_batch_order_is_a_function_of_seed_and_step():
    ds = load_dataset(DataConfig(name="synthetic", synthetic_train=200))
    cfg = DataConfig(name="synthetic", batch_size=32)
    a = PeerData(ds, cfg, order_seed=5, aug_seed=1)
    b = PeerData(ds, cfg, order_seed=5, aug_seed=2)
    c = PeerData(ds, cfg, order_seed=6, aug_seed=1)
    assert a.steps_per_epoch == 6
    for step in (0, 3, 5, 6, 13):
        assert torch.equal(a.batch(step)[0], b.batch(step)[0])  # same order seed, same ids
    assert not torch.equal(a.batch(0)[0], c.batch(0)[0])
    epoch0 = torch.cat([a.batch(s)[0] for s in range(6)])
    assert len(set(epoch0.tolist())) == 192  # a permutation: no repeats within an epoch
    assert not torch.equal(a.batch(0)[0], a.batch(6)[0])  # a new order each epoch
    # going back to an earlier step (a restart) gives the same batch
    first = a.batch(2)
    a.batch(40)
    assert torch.equal(a.batch(2)[1], first[1])


def test_disjoint_shards_partition_the_training_set():
    ds = load_dataset(DataConfig(name="synthetic", synthetic_train=300))
    cfg = DataConfig(name="synthetic", batch_size=16, shard="disjoint")
    shards = [PeerData(ds, cfg, order_seed=9, aug_seed=i, shard_index=i, num_shards=3) for i in range(3)]
    ids = [set(s.sample_ids[torch.arange(len(s.sample_ids))].tolist()) for s in shards]
    assert sum(len(i) for i in ids) == 300 and len(ids[0] | ids[1] | ids[2]) == 300
    batch_ids, _x, y = shards[1].batch(0)
    assert set(batch_ids.tolist()) <= ids[1]
    assert torch.equal(y, ds.train_y[batch_ids])


def test_crop_flip_shapes_determinism_and_content():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    a = random_crop_flip(x, torch.Generator().manual_seed(0))
    b = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    many = random_crop_flip(x.repeat(32, 1, 1, 1), torch.Generator().manual_seed(1))
    assert not torch.equal(many[0], many[2])  # samples get different crops
    # each sample is a 32x32 window of the zero-padded image, flipped when its coin says so
    xs = x.repeat(32, 1, 1, 1)
    g = torch.Generator().manual_seed(1)
    di, dj = torch.randint(0, 9, (64,), generator=g), torch.randint(0, 9, (64,), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    padded = torch.nn.functional.pad(xs, (4, 4, 4, 4))
    for i in range(64):
        want = padded[i, :, di[i] : di[i] + 32, dj[i] : dj[i] + 32]
        assert torch.equal(many[i], want.flip(-1) if flip[i] else want)
    assert 0 < flip.sum() < 64 and len(set(di.tolist())) > 1


def test_every_registered_dataset_has_a_loader():
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "parquet", "synthetic"} <= set(DATASETS)
