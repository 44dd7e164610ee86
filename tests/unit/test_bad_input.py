"""Bad input costs nothing: each row is refused by the driver before Ray starts, in one `error:` line
that names the field, and without a traceback."""

import io
import json
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from codistill.run import main


def write_parquet(path: Path, images: list, labels: list, declared: int | None = None) -> None:
    rows = []
    for im in images:
        if isinstance(im, bytes):
            rows.append({"bytes": im, "path": None})
            continue
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        rows.append({"bytes": buf.getvalue(), "path": None})
    table = pa.table({"image": rows, "label": labels})
    if declared is not None:  # the Hugging Face datasets metadata a ClassLabel column carries
        names = [str(i) for i in range(declared)]
        meta = {"info": {"features": {"label": {"names": names, "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
    pq.write_table(table, path)


def grey(n: int, size: int = 8, seed: int = 0) -> list:
    return list(np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8))


@pytest.fixture
def good_parquet(tmp_path):
    write_parquet(tmp_path / "train.parquet", grey(40), [i % 10 for i in range(40)])
    write_parquet(tmp_path / "test.parquet", grey(10, seed=1), list(range(10)))
    return tmp_path


def parquet_sets(d: Path, train: str = "train.parquet", test: str = "test.parquet") -> list[str]:
    return ["data.name=parquet", f"data.train={d / train}", f"data.test={d / test}", "data.batch_size=8"]


def refuse(tmp_path, capsys, sets: list[str], field: str, *, code: int = 2, extra: list[str] | None = None) -> str:
    import ray

    argv = ["--output", str(tmp_path / "run"), *(extra or [])]
    for s in ["tracking=none", "steps=5", *sets]:
        argv += ["--set", s]
    was_up = ray.is_initialized()  # a Ray another test started: then no actor of ours may appear in it
    before = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)} if was_up else set()
    assert main(argv) == code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {field}"), lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert ray.is_initialized() == was_up  # nothing started
    if was_up:
        assert {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)} == before
    return lines[0]


@pytest.mark.parametrize(
    "sets, field",
    [
        (["peers.0.model=resnet9000"], "peers.0.model"),
        (["peers.1.model=torchvision:nonet"], "peers.1.model"),
        (["data.name=imagenet"], "data.name"),
        (["steps=1000000000000"], "steps"),
        (["steps=null", "epochs=.nan"], "epochs"),
        (["resources.num_cpus=.inf"], "resources.num_cpus"),
        (["resources.num_gpus=.nan"], "resources.num_gpus"),
        (["peers.0.name=../../x"], "peers.0.name"),
        (["data.limit_train=20", "data.batch_size=64"], "data.batch_size"),
        (
            ["exchange.mode=checkpoint", "data.shard=disjoint", "data.limit_train=100", "data.batch_size=64"],
            "data.batch_size",
        ),
    ],
)
def test_bad_values(tmp_path, capsys, sets, field):
    refuse(tmp_path, capsys, sets, field)
    assert not (tmp_path / "run" / "x").exists() and not (tmp_path / "x").exists()


def test_parquet_files(tmp_path, capsys, good_parquet):
    d = good_parquet
    refuse(tmp_path, capsys, parquet_sets(d, train="nope.parquet"), "data.train")
    (d / "junk.parquet").write_bytes(b"not parquet at all" * 10)
    msg = refuse(tmp_path, capsys, parquet_sets(d, train="junk.parquet"), "data.train")
    assert "not a readable Parquet file" in msg
    write_parquet(d / "broken.parquet", [*grey(3), b"\x89PNG garbage"], [0, 1, 2, 3])
    assert "row 3 does not decode" in refuse(tmp_path, capsys, parquet_sets(d, train="broken.parquet"), "data.train")
    write_parquet(d / "shapes.parquet", [*grey(3), *grey(1, size=9)], [0, 1, 2, 3])
    assert "row 3 is (9, 9)" in refuse(tmp_path, capsys, parquet_sets(d, train="shapes.parquet"), "data.train")


def test_labels_outside_the_classes(tmp_path, capsys, good_parquet):
    d = good_parquet
    write_parquet(d / "declared.parquet", grey(12), [*range(10), 0, 12], declared=10)
    msg = refuse(tmp_path, capsys, parquet_sets(d, train="declared.parquet"), "data.train")
    assert "label 12 at row 11 is outside [0, 10)" in msg
    write_parquet(d / "outlier.parquet", grey(12), [*range(10), 0, 100000])
    msg = refuse(tmp_path, capsys, parquet_sets(d, train="outlier.parquet"), "data.num_classes")
    assert "100000" in msg
    # the same file with the class count given: the outlier is named
    msg = refuse(tmp_path, capsys, [*parquet_sets(d, train="outlier.parquet"), "data.num_classes=10"], "data.train")
    assert "label 100000 at row 11" in msg


def test_malformed_yaml_and_unwritable_output(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nloss: {alpha: 0.5\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --config:") and "not valid YAML (line" in err[0]
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    refuse(tmp_path, capsys, ["engine=local"], "--output", extra=["--output", str(blocker / "run")])


def test_a_crafted_cifar_batch_is_refused_and_never_runs(tmp_path, capsys):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    good = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump(good, f)
    with open(base / "data_batch_3", "wb") as f:
        pickle.dump({"data": Payload(), "labels": [0]}, f)
    msg = refuse(tmp_path, capsys, ["data.name=cifar10", f"data.root={tmp_path}", "data.batch_size=2"], "data.root")
    assert "system is not allowed" in msg and not marker.exists()


def test_one_run_per_directory(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "job.yaml").write_text("name: earlier\n")
    argv = ["--output", str(out), "--set", "engine=local", "--set", "tracking=none", "--set", "steps=5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --output:") and "--resume" in err[0]
    busy = tmp_path / "busy"
    busy.mkdir()
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "started": 0}  # a live process holds it
    (busy / ".codistill.lock").write_text(json.dumps(lock))
    argv[1] = str(busy)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by the run of pid {os.getpid()}" in err[0]
    assert sorted(p.name for p in busy.iterdir()) == [".codistill.lock"]  # nothing written
    # a lock left by a process that is gone is taken over
    lock["pid"] = 2**22 + 12345
    (busy / ".codistill.lock").write_text(json.dumps(lock))
    assert main(argv) == 0
    out_text = capsys.readouterr().out
    assert "took over the lock" in out_text and (busy / "summary.json").exists()
    assert not (busy / ".codistill.lock").exists()  # released at the end
