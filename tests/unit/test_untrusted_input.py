"""A job file, a data file and a run directory are untrusted data: none of them can run code, allocate
without a bound checked first, or make a run write outside its root (issue 20). Each test here failed on
the code before its fix."""

import json
from pathlib import Path
from typing import Any

import pytest

from codistill import trust
from codistill.config import build
from codistill.errors import ConfigError
from codistill.models import build_model
from tests.helpers import tiny_text
from tests.unit.test_bad_input import grey, parquet_sets, refuse, write_parquet


@pytest.fixture
def good_parquet(tmp_path: Path) -> Path:
    write_parquet(tmp_path / "train.parquet", grey(40), [i % 10 for i in range(40)])
    write_parquet(tmp_path / "test.parquet", grey(10, seed=1), list(range(10)))
    return tmp_path


@pytest.fixture
def no_opt_in(monkeypatch):
    monkeypatch.delenv(trust.TRUST_ENV, raising=False)


def remote_code_model(tmp_path: Path, model_type: str = "gpt2") -> tuple[Path, Path]:
    """A Hugging Face model folder whose config.json names its own Python file (auto_map); importing that
    file leaves a marker. (model folder, marker)"""
    folder, marker = tmp_path / "remote", tmp_path / "remote-code-ran"
    folder.mkdir()
    config = {
        "model_type": model_type,
        "auto_map": {"AutoConfig": "remote_config.RemoteConfig", "AutoModelForCausalLM": "remote_config.RemoteLM"},
        "vocab_size": 256,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 8,
        "n_positions": 64,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "remote_config.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n\n\n"
        f"class RemoteConfig(GPT2Config):\n    model_type = {model_type!r}\n\n\n"
        "class RemoteLM(GPT2LMHeadModel):\n    config_class = RemoteConfig\n"
    )
    return folder, marker


def text_sets(tmp_path: Path) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny_text())
    return [
        "engine=local",
        "data.name=text",
        f"data.train={corpus}",
        "data.block_size=16",
        "data.batch_size=8",
        "peers.0.model=gpt-tiny",
    ]


def test_a_job_cannot_turn_on_remote_model_code(tmp_path, capsys, no_opt_in):
    folder, marker = remote_code_model(tmp_path)
    sets = [*text_sets(tmp_path), f"peers.1.model=hf:{folder}", "peers.1.model_args={trust_remote_code: true}"]
    msg = refuse(tmp_path, capsys, sets, "peers.1.model")
    assert "--trust-remote-code" in msg and trust.TRUST_ENV in msg
    assert not marker.exists()


def test_a_model_that_needs_its_own_code_is_refused_without_it(tmp_path, capsys, no_opt_in):
    folder, marker = remote_code_model(tmp_path, model_type="not-in-transformers")
    msg = refuse(tmp_path, capsys, [*text_sets(tmp_path), f"peers.1.model=hf:{folder}"], "peers.1.model")
    assert "auto_map" in msg and "--trust-remote-code" in msg
    assert not marker.exists()


def test_loader_options_are_not_job_fields(no_opt_in, tmp_path):
    folder, marker = remote_code_model(tmp_path)
    for key, value in [("revision", "main"), ("code_revision", "x"), ("cache_dir", str(tmp_path)), ("_x", 1)]:
        with pytest.raises(ValueError, match=f"'{key}' is not an attribute"):
            build_model(f"hf:{folder}", (16,), 256, model_args={key: value})
    assert not marker.exists()


def test_remote_model_code_runs_with_the_opt_in(tmp_path, monkeypatch):
    folder, marker = remote_code_model(tmp_path)
    monkeypatch.setenv(trust.TRUST_ENV, "1")
    model = build_model(f"hf:{folder}", (16,), 256, model_args={"trust_remote_code": True})
    hf_model: Any = model.hf_model
    assert marker.exists() and type(hf_model.config).__name__ == "RemoteConfig"


def test_an_import_path_outside_the_installed_packages_needs_the_opt_in(tmp_path, monkeypatch, no_opt_in):
    marker = tmp_path / "module-ran"
    (tmp_path / "job_nets.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n\n\n"
        "def tiny(input_shape, num_classes):\n    import torch.nn as nn\n\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # like a job's working directory
    raw = {"engine": "local", "peers": [{"model": "job_nets:tiny"}, {"model": "mlp"}]}
    with pytest.raises(ConfigError, match="job_nets is not an installed package.*--trust-remote-code") as e:
        build(raw)
    assert str(e.value).startswith("peers.0.model:") and not marker.exists()
    # installed packages are the machine's own code: no opt-in
    assert build({"engine": "local", "peers": [{"model": "codistill.models.vision:mlp"}]}).peers[0].model
    monkeypatch.setenv(trust.TRUST_ENV, "1")
    assert build(raw).peers[0].model == "job_nets:tiny" and marker.exists()


def test_the_command_line_opt_in_reaches_the_environment(no_opt_in, monkeypatch):
    from codistill.run import parse_args

    assert not parse_args([]).trust_remote_code and not trust.remote_code_allowed()
    assert parse_args(["--trust-remote-code"]).trust_remote_code
    trust.allow_remote_code()
    assert trust.remote_code_allowed() and trust.runtime_env_vars() == {trust.TRUST_ENV: "1"}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` grey pixels and holds one row of them: what PIL's open() reads."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_a_tiny_parquet_file_cannot_exhaust_the_node(tmp_path, capsys, good_parquet):
    import io

    from PIL import Image

    d = good_parquet
    buf = io.BytesIO()
    Image.new("L", (9400, 9400)).save(buf, format="PNG")  # under PIL's pixel warning; ~90 KB of PNG
    write_parquet(d / "bomb.parquet", [buf.getvalue()] * 300, [0] * 300)  # Parquet stores the value once
    assert (d / "bomb.parquet").stat().st_size < 100_000
    # 300 x 9400 x 9400 bytes = 24.7 GiB: more than half of any machine this runs on, refused before allocation
    msg = refuse(tmp_path, capsys, parquet_sets(d, train="bomb.parquet"), "data.train")
    assert "bomb.parquet: 300 rows of 9400 x 9400 images decode to 24.69 GiB" in msg and "allowed" in msg
    # a budget of our own, shared by both splits
    sets = [*parquet_sets(d), "data.max_decoded_bytes=2600"]  # train: 40 x 64 = 2560 bytes, test 640 more
    msg = refuse(tmp_path, capsys, sets, "data.test")
    assert "test.parquet: 10 rows of 8 x 8 images decode to 640 bytes, more than the 40 bytes left of the 2,600 " in msg
    assert "(data.max_decoded_bytes)" in msg
    write_parquet(d / "huge.parquet", [png_header_only(20_000, 20_000)], [0])
    msg = refuse(tmp_path, capsys, parquet_sets(d, train="huge.parquet"), "data.train")
    assert "row 0 is too large to decode" in msg
    # a later row that declares another size is refused from its header, before it is decoded
    write_parquet(d / "later.parquet", [*grey(3), png_header_only(30_000, 30_000)], [0, 1, 2, 3])
    msg = refuse(tmp_path, capsys, parquet_sets(d, train="later.parquet"), "data.train")
    assert "row 3" in msg


def test_a_stray_label_is_not_a_new_class(tmp_path, capsys, good_parquet):
    d = good_parquet
    write_parquet(d / "stray.parquet", grey(41), [*(i % 10 for i in range(40)), 15])
    msg = refuse(tmp_path, capsys, parquet_sets(d, train="stray.parquet"), "data.num_classes")
    assert "10, 11, 12, 13, 14 never occur" in msg and "label 15 is on 1 row(s), the first 40" in msg
    msg = refuse(tmp_path, capsys, [*parquet_sets(d, train="stray.parquet"), "data.num_classes=10"], "data.train")
    assert "label 15 at row 40" in msg


def test_a_name_cannot_leave_the_storage_root(tmp_path, capsys, monkeypatch):
    from codistill.locations import under
    from codistill.run import main
    from codistill.storage import Storage
    from codistill.sweeps.settings import SweepConfig

    root = tmp_path / "a" / "b" / "store"
    monkeypatch.setenv("CODISTILL_STORAGE", str(root))
    for name in ["../../../x", "a/b", "..", "x..y/"]:
        assert main(["--set", f"name={name}", "--set", "engine=local", "--set", "tracking=none"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: name:"), err
    assert list(tmp_path.rglob("*")) == []  # nothing was made, inside the root or out
    with pytest.raises(ConfigError, match="tune.name"):
        SweepConfig(name="../up")
    with pytest.raises(ConfigError, match="stays inside"):
        under(root, "../x", "name")
    storage = Storage(tmp_path / "run")
    for rel in ["../x", "checkpoints/../../x", "/etc/x", "a//b", ""]:
        with pytest.raises(ValueError, match="not a path inside the run directory"):
            storage.write(rel, b"x")
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.timeout(60)
def test_a_hub_id_that_cannot_be_had_fails_in_the_preflight(tmp_path, capsys):
    """Before: the preflight let it pass (any error of a model builder was taken for 'needs real tensors'),
    then Ray started and every peer failed after five hub retries (79 s)."""
    sets = [*text_sets(tmp_path), "peers.1.model=hf:nobody-has/this-model"]
    msg = refuse(tmp_path, capsys, sets, "peers.1.model")
    assert "hf:nobody-has/this-model" in msg
    msg = refuse(tmp_path, capsys, [*text_sets(tmp_path), "data.tokenizer=hf:nobody-has/this-model"], "data.tokenizer")
    assert "hf:nobody-has/this-model" in msg


def run_argv(out: Path, *sets: str) -> list[str]:
    argv = ["--output", str(out)]
    for s in ["engine=local", "tracking=none", "steps=5", "eval_every=5", *sets]:
        argv += ["--set", s]
    return argv


def test_a_new_run_needs_an_empty_directory(tmp_path, capsys):
    from codistill.run import main

    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("not a run")
    assert main(run_argv(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --output:") and "is not empty (todo.txt)" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["todo.txt"]  # untouched, no lock left


def test_a_failed_start_leaves_no_directory(tmp_path, capsys):
    from codistill.run import main

    out = tmp_path / "new" / "run"
    assert main(run_argv(out, "data.batch_size=100000")) == 2  # the data check fails after the lock is taken
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.batch_size:")
    assert not out.exists()
    assert main(run_argv(out)) == 0  # and the same directory takes the corrected job


def test_two_runs_racing_for_a_stale_lock_never_both_win(tmp_path):
    """Before: a stale lock was deleted and re-created, so a second run that had read the stale lock too
    deleted the first one's new lock and took the directory as well."""
    import socket
    import threading

    from codistill.rundir import LOCK_FILE, RunDirBusyError, RunLock
    from codistill.storage import Storage

    dead = {"host": socket.gethostname(), "pid": 2**22 + 4321, "started": 0}
    for attempt in range(20):
        out = tmp_path / f"run{attempt}"
        out.mkdir()
        (out / LOCK_FILE).write_text(json.dumps(dead))
        start = threading.Barrier(6)
        won: list[RunLock] = []
        busy: list[str] = []

        def race(out: Path = out, start: threading.Barrier = start, won=won, busy=busy) -> None:
            lock = RunLock(Storage(out), resume=True)
            start.wait()
            try:
                won.append(lock.acquire())
            except RunDirBusyError as e:
                busy.append(str(e))

        threads = [threading.Thread(target=race) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(busy) == 5, (attempt, len(won), busy)
        assert "took over the lock" in won[0].notes[0]
        won[0].release()
        assert not (out / LOCK_FILE).exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KB filesystem (tmpfs), where the machine lets us mount one."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(small_disk, capsys):
    """Before: 137 lines of `--- Logging error ---` blocks, a traceback from closing the log, no `error:` line
    and a `.tmp-*` file left behind."""
    from codistill.run import main

    out = small_disk / "run"
    assert main(run_argv(out, "steps=20", "eval_every=10")) == 1  # the peers' final weights (600 KB) do not fit
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1, captured.err
    assert err[0].startswith("error: no space left on the device of ") and "bytes needed to write it" in err[0]
    assert "bytes free" in err[0] and f"--resume {out}" in err[0] and "Logging error" not in captured.err
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_a_valid_job_cannot_plan_a_billion_rounds(tmp_path, capsys):
    """Before: steps=10**9 at eval_every=1 passed validation, started Ray and its actors, then the driver built
    a list of 10**9 round ends (about 36 GB)."""
    msg = refuse(tmp_path, capsys, ["steps=1000000000", "eval_every=1"], "eval_every")
    assert "at least 10000 for 1000000000 steps" in msg
    msg = refuse(tmp_path, capsys, ["steps=null", "epochs=100000", "eval_every=1"], "eval_every")
    assert "at most 100000 rounds" in msg


@pytest.mark.timeout(30)
def test_a_cifar_batch_is_hashed_and_loaded_from_one_open(tmp_path):
    """Before: the MD5 was taken from one open of the path and the pickle loaded from another, so a file swapped
    in between was loaded unchecked. A FIFO yields its bytes to one open only: a second open waits for ever."""
    import os
    import pickle
    import threading

    import numpy as np

    from codistill.data.cifar import read_cifar_batches

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    batch = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})
    (base / "data_batch_1").write_bytes(batch)
    fifo = base / "data_batch_2"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(batch)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    x, y = read_cifar_batches([base / "data_batch_1", fifo], "labels", 10)
    writer.join()
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 0, 1]
