"""The `text` dataset (codistill.data.text) and its tokenizers (codistill.data.tokenizers)."""

import hashlib
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch

from codistill.config import DataConfig
from codistill.data import DATASETS, TOKENIZERS, load_dataset
from codistill.data.text import windows
from codistill.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    bpe_cache_path,
    chunks,
    tokenizer_from_meta,
)
from codistill.errors import ConfigError
from tests.helpers import SHARED_DATASETS

SHAKESPEARE = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.

"""


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(name="text", root=str(tmp_path / "cache"), **kw)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def _cut(text: str, val_fraction: float) -> int:
    return len(text) - round(len(text) * val_fraction)


def test_windows_are_stride_t_slices_dropping_the_tail():
    tokens = np.arange(23)
    w = windows(tokens, 5)
    assert w.dtype == torch.int64 and w.shape == (4, 6)  # (23 - 1) // 5 windows of 6
    for i in range(4):
        assert w[i].tolist() == tokens[i * 5 : i * 5 + 6].tolist()
    assert windows(np.arange(6), 5).shape == (1, 6) and windows(np.arange(5), 5).shape == (0, 6)


def test_text_file_windows_and_tail_split(tmp_path):
    text = SHAKESPEARE * 8
    path = _write(tmp_path / "input.txt", text)
    ds = load_dataset(_cfg(tmp_path, train=str(path), block_size=16, val_fraction=0.25))
    cut = _cut(text, 0.25)
    train_tokens = np.frombuffer(text[:cut].encode(), dtype=np.uint8)
    test_tokens = np.frombuffer(text[cut:].encode(), dtype=np.uint8)
    assert ds.name == "input" and ds.task == "causal_lm" and ds.num_classes == 256
    assert ds.train_x.dtype == torch.int64 and ds.train_x.shape == ((len(train_tokens) - 1) // 16, 17)
    assert ds.test_x.shape == ((len(test_tokens) - 1) // 16, 17)
    for x, tokens in ((ds.train_x[:], train_tokens), (ds.test_x[:], test_tokens)):
        for i in range(len(x)):
            assert x[i].tolist() == tokens[i * 16 : i * 16 + 17].tolist()
    assert torch.equal(ds.train_y[:], torch.zeros(len(ds.train_x), dtype=torch.int64))
    assert torch.equal(ds.test_y[:], torch.zeros(len(ds.test_x), dtype=torch.int64))
    assert (ds.mean, ds.std, ds.scale, ds.augment) == ((0.0,), (1.0,), 1.0, False)
    # the held-out split is the end of the text
    assert ByteTokenizer().decode(ds.test_x[0].numpy()) == text[cut : cut + 17]
    m = ds.meta
    assert m["source"] == str(path) and m["tokenizer"] == "byte" and m["vocab_size"] == 256
    assert m["num_chars"] == len(text) and m["block_size"] == 16 and m["tokenizer_json"] is None
    assert (m["num_train_tokens"], m["num_test_tokens"]) == (len(train_tokens), len(test_tokens))
    assert m["corpus_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_limits_count_windows_and_max_chars_cuts_the_source(tmp_path):
    path = _write(tmp_path / "input.txt", SHAKESPEARE * 8)
    ds = load_dataset(_cfg(tmp_path, train=str(path), block_size=8, limit_train=5, limit_test=3))
    assert ds.train_x.shape == (5, 9) and ds.test_x.shape == (3, 9) and ds.train_y.shape == (5,)
    ds = load_dataset(_cfg(tmp_path, train=str(path), block_size=8, max_chars=500, val_fraction=0.2))
    assert ds.meta["num_chars"] == 500 and ds.meta["num_test_tokens"] == 100


def test_separate_test_source(tmp_path):
    train = _write(tmp_path / "train.txt", SHAKESPEARE * 4)
    test = _write(tmp_path / "test.txt", "Second Citizen:\nOne word, good citizens.\n" * 3)
    ds = load_dataset(_cfg(tmp_path, train=str(train), test=str(test), block_size=16))
    assert ds.meta["num_train_tokens"] == len(SHAKESPEARE * 4)
    assert ByteTokenizer().decode(ds.test_x[0].numpy()) == "Second Citizen:\nO"


def test_byte_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "naïve café — 日本語 🙂 \r\n\ttabs\x00"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and len(ids) == len(text.encode("utf-8")) and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.to_json() is None and tokenizer_from_meta({"tokenizer": "byte"}).encode(text).tolist() == ids.tolist()


def test_bpe_trains_caches_and_reloads_exactly(tmp_path, caplog):
    text = (SHAKESPEARE + "def speak(citizen):\n    return citizen.name  # naïve 🙂\n") * 30
    path = _write(tmp_path / "input.txt", text)
    cfg = _cfg(tmp_path, train=str(path), tokenizer="bpe", vocab_size=400, block_size=8)
    with caplog.at_level(logging.INFO, logger="codistill"):
        ds = load_dataset(cfg)
    assert "trained" in caplog.text
    train_text = text[: _cut(text, cfg.val_fraction)]
    cache = bpe_cache_path(tmp_path / "cache", 400, train_text)
    assert cache.is_file() and cache.name.startswith("bpe-400-") and len(cache.stem.split("-")[-1]) == 16
    assert 257 <= ds.num_classes == ds.meta["vocab_size"] <= 400
    assert int(ds.train_x[:].max()) < ds.num_classes and int(ds.test_x[:].max()) < ds.num_classes
    mtime = cache.stat().st_mtime_ns

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="codistill"):
        again = load_dataset(cfg)
    assert "loaded from cache" in caplog.text and "trained" not in caplog.text
    assert cache.stat().st_mtime_ns == mtime
    assert torch.equal(again.train_x[:], ds.train_x[:]) and torch.equal(again.test_x[:], ds.test_x[:])

    json = ds.meta["tokenizer_json"]
    assert isinstance(json, str) and json == cache.read_text(encoding="utf-8")
    reloaded = tokenizer_from_meta(ds.meta)
    assert isinstance(reloaded, BPETokenizer) and reloaded.vocab_size == ds.num_classes
    ids = reloaded.encode(train_text)
    assert ids.tolist() == BPETokenizer.from_json(json).encode(train_text).tolist()
    assert ds.train_x[1].tolist() == ids[8:17].tolist()
    assert reloaded.decode(ids) == train_text  # byte-level: exact round trip, non-ASCII included
    assert reloaded.to_json() == json


def test_bpe_chunked_encoding_equals_whole_text():
    text = ("class A:\n\n    def f(self):  \n\n\n        return 'x'\n \nA().f()\r\n" * 400) + "tail"
    pieces = list(chunks(text, 200))
    assert len(pieces) > 10 and "".join(pieces) == text
    tok = BPETokenizer.train(text, 300)
    whole = tok.tokenizer.encode(text, add_special_tokens=False).ids
    assert tok.encode(text).tolist() == whole


def test_bpe_vocab_below_byte_alphabet_is_refused(tmp_path):
    path = _write(tmp_path / "input.txt", SHAKESPEARE)
    with pytest.raises(ConfigError) as e:
        load_dataset(_cfg(tmp_path, train=str(path), tokenizer="bpe", vocab_size=256, block_size=8))
    assert "data.vocab_size" in str(e.value) and "257" in str(e.value) and "\n" not in str(e.value)


def test_folder_source_sorted_recursive_with_headers(tmp_path):
    root = tmp_path / "corpus"
    _write(root / "b.txt", "bee\n")
    _write(root / "a" / "z.md", "# zed\n")
    _write(root / "a.py", "print('a')")
    _write(root / "skip.csv", "x,y\n")
    _write(root / ".hidden" / "h.txt", "hidden\n")
    _write(root / "long.txt", SHAKESPEARE * 3)
    ds = load_dataset(_cfg(tmp_path, train=str(root), block_size=8, val_fraction=0.1))
    text = ByteTokenizer().decode(np.concatenate([ds.train_x[:, :-1].reshape(-1), ds.train_x[-1, -1:]]))
    assert ds.name == "corpus"
    # sorted by relative path ('.' sorts before '/'); a newline ends each file
    assert text.startswith("# ---- a.py ----\nprint('a')\n# ---- a/z.md ----\n# zed\n# ---- b.txt ----\nbee\n")
    assert "# ---- long.txt ----\nFirst Citizen:" in text
    assert "skip" not in text and "hidden" not in text


def test_parquet_and_arrow_sources(tmp_path):
    rows = [SHAKESPEARE, None, "Second Citizen:\nWould you proceed especially against Caius Marcius?"] * 3
    table = pa.table({"id": list(range(len(rows))), "content": rows})
    expected = "\n\n".join(r for r in rows if r is not None)
    pq.write_table(table, tmp_path / "t.parquet")
    feather.write_feather(table, str(tmp_path / "t.feather"))
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)  # the stream format, in several batches
    for name in ("t.parquet", "t.feather", "t.arrow"):
        ds = load_dataset(
            _cfg(tmp_path, train=str(tmp_path / name), text_column="content", block_size=8, val_fraction=0.5)
        )
        assert ds.meta["num_chars"] == len(expected), name
        cut = _cut(expected, 0.5)
        assert ByteTokenizer().decode(ds.test_x[0].numpy()) == expected[cut : cut + 9], name
        assert ds.name == "t"

    with pytest.raises(ConfigError) as e:
        load_dataset(_cfg(tmp_path, train=str(tmp_path / "t.parquet"), block_size=8))
    msg = str(e.value)
    assert msg.startswith("data.text_column:") and "'text'" in msg and "id, content" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="data.text_column.*string column"):
        load_dataset(_cfg(tmp_path, train=str(tmp_path / "t.arrow"), text_column="id", block_size=8))


def test_default_corpus_is_the_python_stdlib_and_stable(tmp_path):
    a = load_dataset(_cfg(tmp_path, max_chars=200_000))
    b = load_dataset(_cfg(tmp_path, max_chars=200_000))
    assert a.meta["source"].startswith("python-stdlib 3.") and a.name == "text"
    assert a.meta["num_chars"] == 200_000 and len(a.meta["corpus_sha256"]) == 64
    assert a.meta["corpus_sha256"] == b.meta["corpus_sha256"] and torch.equal(a.train_x[:], b.train_x[:])
    head = ByteTokenizer().decode(a.train_x[:4, :-1].reshape(-1).numpy())
    assert head.startswith("# ---- ") and ".py ----\n" in head
    text = ByteTokenizer().decode(np.concatenate([a.train_x[:, :-1].reshape(-1), a.test_x[:, :-1].reshape(-1)]))
    headers = [line for line in text.splitlines() if line.startswith("# ---- ") and line.endswith(".py ----")]
    parts = [set(h[7:-5].split("/")[:-1]) for h in headers]
    assert len(headers) > 3 and not any(p & {"site-packages", "test", "tests", "idlelib", "lib2to3"} for p in parts)
    assert [h[7:-5] for h in headers] == sorted(h[7:-5] for h in headers)


def test_tinyshakespeare_format_file(tmp_path):
    path = _write(tmp_path / "tinyshakespeare" / "input.txt", SHAKESPEARE * 20)
    ds = load_dataset(_cfg(tmp_path, train=str(path), block_size=32))
    assert ds.name == "input" and ds.train_x.shape[1] == 33 and len(ds.test_x) >= 1
    assert ByteTokenizer().decode(ds.train_x[0].numpy()) == SHAKESPEARE[:33]


def test_real_tinyshakespeare_when_present(tmp_path):
    path = SHARED_DATASETS / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    ds = load_dataset(_cfg(tmp_path, train=str(path), block_size=128, max_chars=None))
    assert ds.meta["num_chars"] == len(path.read_text(encoding="utf-8"))
    assert ds.num_classes == 256 and ds.train_x.shape[1] == 129 and len(ds.train_x) > 7000


def test_hf_tokenizer_from_a_local_folder(tmp_path):
    from transformers import PreTrainedTokenizerFast

    text = SHAKESPEARE * 10
    bpe = BPETokenizer.train(text, 300)
    folder = tmp_path / "hf_tok"
    PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer).save_pretrained(str(folder))
    path = _write(tmp_path / "input.txt", text)
    ds = load_dataset(_cfg(tmp_path, train=str(path), tokenizer=f"hf:{folder}", block_size=8))
    assert ds.num_classes == bpe.vocab_size and ds.meta["tokenizer"] == f"hf:{folder}"
    cut = _cut(text, 0.1)
    assert ds.train_x[0].tolist() == bpe.encode(text[:cut])[:9].tolist()
    with pytest.raises(ConfigError, match="data.tokenizer: hf:"):
        load_dataset(_cfg(tmp_path, train=str(path), tokenizer=f"hf:{tmp_path / 'nothing'}", block_size=8))


def test_tokenizer_names_are_checked_offline():
    assert {"byte", "bpe"} <= set(TOKENIZERS) and "hf" in TOKENIZERS.families and "text" in DATASETS
    DataConfig(name="text", tokenizer="hf:some-org/some-model-that-need-not-exist")
    with pytest.raises(ConfigError, match="tokenizer"):
        DataConfig(name="text", tokenizer="hf:")
    with pytest.raises(ConfigError, match="tokenizer: got 'wordpiece'"):
        DataConfig(name="text", tokenizer="wordpiece")


def test_errors_a_user_can_fix_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_dataset(_cfg(tmp_path, train=str(tmp_path / "missing.txt")))
    assert str(e.value).startswith("data.train:") and "missing.txt" in str(e.value)
    with pytest.raises(ConfigError, match=r"^data.test:"):
        load_dataset(_cfg(tmp_path, train=str(_write(tmp_path / "a.txt", SHAKESPEARE)), test=str(tmp_path / "b")))
    with pytest.raises(ConfigError, match=r"^data.train: folder .* has no"):
        (tmp_path / "empty").mkdir()
        load_dataset(_cfg(tmp_path, train=str(tmp_path / "empty")))

    short = _write(tmp_path / "short.txt", "To be, or not to be")  # 19 bytes
    with pytest.raises(ConfigError) as e:
        load_dataset(_cfg(tmp_path, train=str(short), block_size=64, val_fraction=0.1))
    msg = str(e.value)
    assert msg.startswith("data.block_size:") and "training" in msg and "17 tokens" in msg and "65" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError) as e:
        load_dataset(_cfg(tmp_path, train=str(short), block_size=8, val_fraction=0.1))
    msg = str(e.value)
    assert msg.startswith("data.block_size:") and "held-out" in msg and "2 tokens" in msg and "val_fraction" in msg
