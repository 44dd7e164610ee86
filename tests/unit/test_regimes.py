"""The small-data and noisy-label regimes (data.limit_balanced, data.label_noise, data.train_eval) without Ray: the
subset and the flipped labels are fixed by their own seeds (the same for every arm and run seed), the Parquet reader
decodes only the drawn rows, and a peer scores its training rows on the given and on the clean labels."""

import io

import numpy as np
import pytest
import torch

from codistill.api import run_job
from codistill.config import DataConfig
from codistill.data import load_dataset
from codistill.data.subsets import balanced_rows, flip_labels
from codistill.tasks import task_of
from tests.helpers import small_job


def _t(rows) -> torch.Tensor:
    """A dataset's in-memory rows as the tensor they are."""
    assert isinstance(rows, torch.Tensor)
    return rows


def _digits(**options) -> DataConfig:
    return DataConfig(name="digits", **options)


def test_label_noise_flips_exactly_p_of_the_labels_each_to_another_class():
    clean = load_dataset(_digits())
    noisy = load_dataset(_digits(label_noise=0.3))
    n = len(_t(clean.train_y))
    flipped = noisy.meta["label_noise"]["rows"]
    changed = torch.nonzero(_t(noisy.train_y) != _t(clean.train_y)).flatten().tolist()
    assert changed == flipped and len(flipped) == round(0.3 * n)  # every drawn row moved, to another class
    assert torch.equal(_t(noisy.train_y_clean), _t(clean.train_y)) and torch.equal(_t(noisy.test_y), _t(clean.test_y))
    assert noisy.meta["label_noise"] | {"rows": None, "source_rows": None, "rows_sha256": None} == {
        "rate": 0.3,
        "seed": 0,
        "flipped": round(0.3 * n),
        "of": n,
        "rows": None,
        "source_rows": None,
        "rows_sha256": None,
    }
    # the new class is uniform over the other nine: each offset 1..9 about equally often
    offsets = ((_t(noisy.train_y) - _t(clean.train_y)) % 10)[flipped]
    counts = torch.bincount(offsets, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.5 * len(flipped) / 9


def test_the_flipped_set_is_the_same_for_every_arm_and_run_seed_and_moves_with_noise_seed():
    """The run's seed, the loss and the exchange do not enter the draw: arms and seeds train on the same labels."""
    datasets = [
        load_dataset(small_job(*sets, "data.name=digits", "data.label_noise=0.2").data)
        for sets in ((), ("seed=7",), ("loss.alpha=0", "seed=3"), ("exchange.mode=checkpoint",))
    ]
    first = datasets[0]
    for ds in datasets[1:]:
        assert torch.equal(_t(ds.train_y), _t(first.train_y)) and ds.meta["label_noise"] == first.meta["label_noise"]
    other = load_dataset(_digits(label_noise=0.2, noise_seed=1))
    assert other.meta["label_noise"]["rows"] != first.meta["label_noise"]["rows"]


def test_a_balanced_subset_takes_equal_classes_from_its_seed_and_noise_follows_it():
    ds = load_dataset(_digits(limit_train=105, limit_balanced=True, label_noise=0.2))
    subset = ds.meta["subset"]
    assert len(_t(ds.train_y)) == 105 and subset["per_class"] == [11] * 5 + [10] * 5
    assert torch.bincount(_t(ds.train_y_clean), minlength=10).tolist() == subset["per_class"]
    full = load_dataset(_digits())
    rows = torch.tensor(subset["source_rows"])
    assert torch.equal(_t(full.train_x)[rows], _t(ds.train_x)) and torch.equal(
        _t(full.train_y)[rows], _t(ds.train_y_clean)
    )
    noise = ds.meta["label_noise"]
    assert noise["source_rows"] == [subset["source_rows"][r] for r in noise["rows"]]  # rows of the source named
    again = load_dataset(_digits(limit_train=105, limit_balanced=True, subset_seed=0))
    assert again.meta["subset"]["source_rows"] == subset["source_rows"]
    other = load_dataset(_digits(limit_train=105, limit_balanced=True, subset_seed=1))
    assert other.meta["subset"]["source_rows"] != subset["source_rows"]
    first_105 = load_dataset(_digits(limit_train=105))  # without limit_balanced: the first rows, as before
    assert torch.equal(_t(first_105.train_y), _t(full.train_y)[:105]) and "subset" not in first_105.meta


def test_a_balanced_draw_that_a_class_cannot_fill_is_one_line():
    labels = np.array([0] * 50 + [1] * 3)
    with pytest.raises(ValueError, match=r"data.limit_train: got 10; .*class 1 has 3 rows, 5 wanted"):
        balanced_rows(labels, 10, 2, seed=0)
    assert sorted(np.bincount(labels[balanced_rows(labels, 6, 2, seed=0)])) == [3, 3]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"label_noise": 1.0}, r"data.label_noise: got 1.0; allowed: a fraction in \[0, 1\)"),
        ({"label_noise": -0.1}, r"data.label_noise: got -0.1"),
        ({"limit_balanced": True}, r"data.limit_balanced: got True; allowed: false unless data.limit_train"),
        ({"train_eval": -1}, r"data.train_eval: got -1"),
        ({"noise_seed": -1}, r"data.noise_seed: got -1"),
    ],
)
def test_bad_regime_options_fail_in_one_line(options, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(name="digits", **options)


def test_label_noise_is_refused_for_a_language_model(tmp_path):
    from tests.helpers import lm_job

    with pytest.raises(ValueError, match=r"data.label_noise: got 0.1; allowed: false / 0 for a causal_lm dataset"):
        load_dataset(lm_job(tmp_path, "data.label_noise=0.1").data)


def _write_parquet(path, labels, rng):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows = []
    for label in labels:
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4), label * 20, dtype=np.uint8)).save(buf, format="PNG")  # pixels say the label
        rows.append({"bytes": buf.getvalue(), "path": None})
    table = pa.table({"image": rows, "label": np.asarray(labels, dtype=np.int64)})
    pq.write_table(table, path, row_group_size=7)  # several batches: the draw crosses them


def test_the_parquet_reader_decodes_only_the_balanced_rows(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    _write_parquet(tmp_path / "train.parquet", labels, rng)
    _write_parquet(tmp_path / "test.parquet", [0, 1, 2], rng)
    cfg = DataConfig(
        name="parquet",
        train=str(tmp_path / "train.parquet"),
        test=str(tmp_path / "test.parquet"),
        num_classes=3,
        limit_train=12,
        limit_balanced=True,
        subset_seed=4,
    )
    ds = load_dataset(cfg)
    rows = balanced_rows(labels, 12, 3, seed=4)
    assert ds.meta["subset"]["source_rows"] == rows.tolist() and ds.meta["subset"]["per_class"] == [4, 4, 4]
    assert _t(ds.train_y).tolist() == labels[rows].tolist()
    assert torch.equal(_t(ds.train_x)[:, 0, 0, 0], _t(ds.train_y) * 20)  # each image is its own row's
    assert len(_t(ds.test_y)) == 3


def test_score_training_counts_the_given_and_the_clean_labels():
    task = task_of(load_dataset(_digits(limit_train=64)))
    logits = torch.eye(4) * 10  # predicts 0, 1, 2, 3
    given, clean = torch.tensor([0, 1, 0, 0]), torch.tensor([0, 1, 2, 3])
    scores = task.score_training(lambda x: x, [(logits[:2], given[:2], clean[:2]), (logits[2:], given[2:], clean[2:])])
    assert scores["train_accuracy"] == 0.5 and scores["train_accuracy_clean"] == 1.0
    assert scores["train_set_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, given)), 1e-5)
    assert task.score_training(lambda x: x, []) == {}
    assert "train_accuracy_clean" not in task.score_training(lambda x: x, [(logits, given, None)])


def test_a_noisy_run_reports_training_accuracy_on_given_and_clean_labels(tmp_path):
    cfg = small_job("data.name=digits", "data.label_noise=0.4", "data.limit_train=256", "data.train_eval=200", steps=60)
    summary = run_job(cfg, str(tmp_path / "run"))
    assert summary["data"]["label_noise"]["flipped"] == round(0.4 * 256)
    for peer in summary["peers"]:
        # 40% of the labels are wrong: a model that learned the digits agrees with the clean labels far more
        assert peer["train_accuracy_clean"] > peer["train_accuracy"] + 0.1
        assert peer["train_set_loss"] > 0
    record = summary["rounds"][-1]["peers"][summary["peers"][0]["name"]]
    assert record["train_accuracy"] == summary["peers"][0]["train_accuracy"]
    assert flip_labels(np.zeros(10, dtype=np.int64), 0.0, 10, 0)[1].size == 0  # no noise, nothing flipped
