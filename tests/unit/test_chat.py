"""Chat corpora (codistill.data.chat): conversations rendered by a chat template, one row each, with every
prompt position masked (-100) from the losses and the metrics. Offline, with real tokenizers."""

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch

from codistill import losses
from codistill.config import DataConfig, LossConfig
from codistill.data import load_dataset
from codistill.data.chat import (
    IGNORE_INDEX,
    ChatTemplate,
    Conversation,
    assistant_spans,
    chatml,
    check_conversation,
    trained_tokens,
)
from codistill.data.dataset import Dataset
from codistill.data.tokenizers import tokenizer_from_meta
from codistill.errors import ConfigError
from codistill.tasks import IGNORE_INDEX as TASK_IGNORE_INDEX
from codistill.tasks import TASKS

ANSWERS = ("four", "six, é")  # the assistant's two turns (a two-byte character: byte offsets differ from chars)
CONVERSATION = [
    {"role": "system", "content": "SYSTEM: be terse"},
    {"role": "user", "content": "USER: two and two?"},
    {"role": "assistant", "content": ANSWERS[0]},
    {"role": "user", "content": "USER: and three and three?"},
    {"role": "assistant", "content": ANSWERS[1]},
]
LLAMA_LIKE = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# A template unlike ChatML, with HF's {% generation %} marks so transformers computes its own assistant mask
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def conversation(i: int) -> list[dict]:
    """CONVERSATION with the first question numbered (conversations differ, answers stay the same)."""
    out = [dict(m) for m in CONVERSATION]
    out[1]["content"] = f"USER: two and two? ({i})"
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def load(tmp_path: Path, train: Path, **kw) -> Dataset:
    kw = {"block_size": 256, "val_fraction": 0.25, **kw}  # a conversation: 227 bytes
    return load_dataset(DataConfig(name="text", root=str(tmp_path / "cache"), train=str(train), **kw))


def labelled(y: torch.Tensor) -> np.ndarray:
    """The label values (token ids) of one row that are trained on, in order."""
    return y[y != IGNORE_INDEX].numpy()


# ---- (a) the mask, byte tokenizer ----


def test_chatml_is_the_documented_plain_text():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert chatml(messages, False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert chatml(messages[:1], True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_byte_mask_trains_exactly_the_assistant_turns_and_their_end_markers(tmp_path):
    """The pinned mask: row 0's labels are -100 everywhere but the bytes of the two assistant contents and their
    `<|im_end|>`, where they are the next byte; decoding them gives exactly those, and no system or user text."""
    ds = load(tmp_path, write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(i)} for i in range(4)]))
    assert ds.task == "causal_lm" and ds.num_classes == 256
    assert ds.train_x.shape == (3, 257) and ds.train_y.shape == (3, 256) and ds.train_y.dtype == torch.int64
    assert ds.test_x.shape == (1, 257) and ds.test_y.shape == (1, 256)
    text = chatml(conversation(0), False)
    raw = text.encode("utf-8")
    x, y = ds.train_x[0], ds.train_y[0]
    assert x[: len(raw)].tolist() == list(raw) and (x[len(raw) :] == 0).all()  # padded with 0
    # the expected labels from the text alone: byte b is a target (label y[b - 1]) when it is in an answer or
    # the `<|im_end|>` after it
    expected = torch.full((256,), IGNORE_INDEX)
    for answer in ANSWERS:
        start = text.index(f"assistant\n{answer}<|im_end|>") + len("assistant\n")
        lo, hi = len(text[:start].encode()), len(text[: start + len(answer) + len("<|im_end|>")].encode())
        expected[lo - 1 : hi - 1] = torch.tensor(list(raw[lo:hi]))
    assert y.tolist() == expected.tolist()
    decoded = bytes(labelled(y).astype(np.uint8).tolist()).decode("utf-8")
    assert decoded == "four<|im_end|>six, é<|im_end|>"
    assert "USER" not in decoded and "SYSTEM" not in decoded and "user" not in decoded
    chat = ds.meta["chat"]
    assert chat["template"] == "chatml" and chat["train"]["conversations"] == 3 and chat["test"]["conversations"] == 1
    per_row = len(("four<|im_end|>six, é<|im_end|>").encode())
    assert chat["train"]["trained_tokens"] == 3 * per_row and chat["test"]["trained_tokens"] == per_row
    assert chat["train"]["dropped"] == chat["train"]["truncated"] == 0


def test_a_wrong_mask_fails_the_pin(tmp_path):
    """The pin is not vacuous: the same rows with the targets of the whole window (no mask) decode to more."""
    ds = load(tmp_path, write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(i)} for i in range(4)]))
    unmasked = ds.train_x[0, 1:]
    assert bytes(unmasked[unmasked != 0].tolist()).decode() != "four<|im_end|>six, é<|im_end|>"


def test_bpe_mask_decodes_to_the_assistant_turns(tmp_path):
    rows = [{"messages": conversation(i)} for i in range(8)]
    ds = load(tmp_path, write_jsonl(tmp_path / "chat.jsonl", rows), tokenizer="bpe", vocab_size=300)
    tok = tokenizer_from_meta(ds.meta)
    for x, y in zip(ds.train_x[:], ds.train_y[:]):
        t = torch.nonzero(y != IGNORE_INDEX).squeeze(1)
        assert (y[t] == x[t + 1]).all()  # a label is the next token
        assert tok.decode(labelled(y)) == "four<|im_end|>six, é<|im_end|>"


# ---- (b) a Hugging Face tokenizer with its own chat template ----


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory) -> tuple[Path, Path]:
    """(a fast tokenizer saved with TEMPLATE, the same without a template): a byte-level BPE trained here."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=LLAMA_LIKE,
        show_progress=False,
    )
    tok.train_from_iterator([json.dumps(conversation(i)) for i in range(20)], trainer=trainer)
    out = []
    for name, template in (("with", TEMPLATE), ("without", None)):
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=LLAMA_LIKE[0], eos_token=LLAMA_LIKE[3])
        if template is not None:
            fast.chat_template = template
        path = tmp_path_factory.mktemp(f"hf-{name}-template")
        fast.save_pretrained(str(path))
        out.append(path)
    return out[0], out[1]


def test_hf_tokenizer_renders_by_its_own_template_and_masks_as_transformers_does(tmp_path, hf_tokenizers):
    from transformers import AutoTokenizer

    path = hf_tokenizers[0]
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(i)} for i in range(4)])
    ds = load(tmp_path, train, tokenizer=f"hf:{path}", block_size=96)
    hf = AutoTokenizer.from_pretrained(str(path))
    assert ds.num_classes == len(hf) and ds.meta["chat"]["template"] == f"hf:{path} chat_template"
    assert ds.meta["chat"]["template_sha256"] and ds.meta["chat"]["pad_id"] == hf.eos_token_id  # no pad token
    full: Any = hf.apply_chat_template(
        conversation(0), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )  # transformers' own assistant mask, from the template's {% generation %} marks
    ids, mask = full["input_ids"], full["assistant_masks"]
    x, y = ds.train_x[0], ds.train_y[0]
    assert ids[0] == hf.bos_token_id and x[: len(ids)].tolist() == ids
    assert (x[len(ids) :] == hf.eos_token_id).all()  # padded with eos
    ours = (y[: len(ids) - 1] != IGNORE_INDEX).tolist()  # position t's target is token t + 1
    assert ours == [bool(m) for m in mask[1:]] and not mask[0] and (y[len(ids) - 1 :] == IGNORE_INDEX).all()
    decoded = hf.decode(labelled(y).tolist())
    assert decoded == "four<|eot_id|>six, é<|eot_id|>"
    assert "USER" not in decoded and "SYSTEM" not in decoded


def test_hf_tokenizer_without_a_template_renders_chatml(tmp_path, hf_tokenizers):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(i)} for i in range(4)])
    ds = load(tmp_path, train, tokenizer=f"hf:{hf_tokenizers[1]}", block_size=200)
    assert ds.meta["chat"]["template"] == "chatml" and ds.meta["chat"]["template_sha256"] is None
    tok = tokenizer_from_meta(ds.meta)
    assert tok.decode(labelled(ds.train_y[0])) == "four<|im_end|>six, é<|im_end|>"


# ---- (c) sources, splits, truncation ----


def messages_table(convs: list[list[dict]]) -> pa.Table:
    return pa.table({"id": list(range(len(convs))), "messages": convs})


def test_jsonl_parquet_and_arrow_give_the_same_rows(tmp_path):
    convs = [conversation(i) for i in range(6)]
    convs[2][1]["name"] = "alice"  # a key only some messages have: the table gives the others null, left out
    sources = [write_jsonl(tmp_path / "c.jsonl", [{"messages": c, "id": i} for i, c in enumerate(convs)])]
    pq.write_table(messages_table(convs), tmp_path / "c.parquet", row_group_size=2)
    feather.write_feather(messages_table(convs), tmp_path / "c.arrow")
    sources += [tmp_path / "c.parquet", tmp_path / "c.arrow"]
    loaded = [load(tmp_path, s, val_fraction=1 / 3) for s in sources]
    for ds in loaded:
        assert ds.train_x.shape == (4, 257) and ds.test_x.shape == (2, 257)  # the last third held out
        assert ds.meta["chat"]["train"]["conversations"] == 4
        for a, b in ((ds.train_x, loaded[0].train_x), (ds.train_y, loaded[0].train_y), (ds.test_y, loaded[0].test_y)):
            assert torch.equal(a[:], b[:])
    # held out: the last conversations, in order
    held_out = chatml(convs[4], False).encode()
    assert ds.test_x[0, : len(held_out)].tolist() == list(held_out)


def test_a_test_file_and_the_messages_column(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"chat": conversation(i)} for i in range(3)])
    test = tmp_path / "test.parquet"
    pq.write_table(pa.table({"chat": [conversation(9)]}), test)
    ds = load(tmp_path, train, test=str(test), messages_column="chat")
    assert len(ds.train_x) == 3 and len(ds.test_x) == 1 and ds.meta["test_source"] == str(test)
    with pytest.raises(ConfigError, match="data.test:.*chat corpus like data.train"):
        load(tmp_path, train, test=str(write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])), messages_column="chat")


def test_truncation_and_dropping_are_counted(tmp_path):
    raw = chatml(conversation(2), False).encode()
    keep = raw.index(b"<|im_end|>", raw.index(b"six")) + len("<|im_e")  # bytes a row keeps: the last marker cut
    long_first = conversation(0)
    long_first[1]["content"] = "USER: " + "la " * 100  # the first answer falls past the row
    no_answer = conversation(1)[:2]
    rows = [{"messages": c} for c in (long_first, no_answer, conversation(2), conversation(3), conversation(4))]
    ds = load(tmp_path, write_jsonl(tmp_path / "c.jsonl", rows), block_size=keep - 1, val_fraction=0.2)
    counts = ds.meta["chat"]["train"]
    assert counts["dropped"] == 2 and counts["conversations"] == 2 and len(ds.train_x) == 2
    assert counts["truncated"] == 3 and counts["tokens"] == 2 * keep == ds.meta["num_train_tokens"]
    assert bytes(labelled(ds.train_y[0]).tolist()).decode() == "four<|im_end|>six, é<|im_e"
    assert ds.train_x.shape == (2, keep) and ds.meta["chat"]["test"]["conversations"] == 1


def test_a_jsonl_file_without_messages_is_plain_text(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world " * 5, "id": i} for i in range(8)])
    ds = load(tmp_path, train, block_size=16)
    assert "chat" not in ds.meta and ds.train_y[:].ndim == 1
    assert bytes(ds.train_x[0].tolist()).decode() == ("hello world " * 5)[:17]


def test_null_message_fields_are_left_out():
    value = [{"role": "user", "content": "hi", "name": None}]
    assert check_conversation(value, "row 0", "messages") == [{"role": "user", "content": "hi"}]


def test_trained_tokens_overlap_rule():
    offsets = np.array([[0, 2], [2, 4], [4, 6], [3, 3], [6, 7]])
    assert trained_tokens(offsets, [(3, 5)], 7).tolist() == [False, True, True, True, False]
    assert trained_tokens(offsets, [], 7).tolist() == [False] * 5


# ---- (d) losses and evaluation skip the prompt ----


def test_the_loss_ignores_prompt_positions(tmp_path):
    ds = load(tmp_path, write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation(i)} for i in range(4)]))
    task = TASKS["causal_lm"]
    x, y = task.prepare(None, ds.train_x[:2], ds.train_y[:2], 0)  # type: ignore[arg-type]
    assert x.shape == (2, 256) and torch.equal(y, ds.train_y[:2]) and IGNORE_INDEX == TASK_IGNORE_INDEX
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 256, 256, generator=g), torch.randn(2, 256, 256, generator=g)
    cfg = LossConfig(alpha=0.5, temperature=2.0)
    prompt = y == IGNORE_INDEX

    def loss(s: torch.Tensor, t: torch.Tensor, targets: torch.Tensor) -> losses.LossParts:
        return losses.total_loss(s, targets, [t], cfg, step=0, mask=task.valid(targets))

    base = loss(student, teacher, y)
    by_hand = -torch.log_softmax(student, -1)[~prompt].gather(1, y[~prompt][:, None]).mean()
    assert base.ce.item() == pytest.approx(by_hand.item(), rel=1e-6)
    # a prompt position's logits, its teacher and the token there change nothing
    noisy = student.clone()
    noisy[prompt] = torch.randn(int(prompt.sum()), 256, generator=g) * 10
    assert loss(noisy, teacher + prompt[..., None] * 5.0, y).total.item() == pytest.approx(base.total.item(), rel=1e-6)
    other_x = ds.train_x[:2].clone()
    other_x[:, 1:][prompt & (other_x[:, 1:] != 0)] = ord("Z")  # another prompt text: the same targets
    assert torch.equal(task.prepare(None, other_x, ds.train_y[:2], 0)[1], y)  # type: ignore[arg-type]
    # ... where an answer's position does
    answer = torch.nonzero(~prompt)[0]
    noisy = student.clone()
    noisy[answer[0], answer[1]] += 10 * torch.randn(256, generator=g)
    assert loss(noisy, teacher, y).ce.item() != pytest.approx(base.ce.item(), rel=1e-6)
    # evaluation counts the answers' tokens only
    ev = task.evaluate(lambda inputs: torch.randn(*inputs.shape, 256, generator=g), [(x, y)], y.numel(), step=0)
    assert ev.count == int((~prompt).sum()) == 2 * ds.meta["chat"]["train"]["trained_tokens"] // 3


def test_peer_batches_carry_the_labels(tmp_path):
    """What a peer trains and is scored on: its batches' targets are the stored labels of their rows."""
    from codistill.peer.batches import PeerData

    train = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation(i)} for i in range(12)])
    cfg = DataConfig(name="text", root=str(tmp_path / "cache"), train=str(train), block_size=256, batch_size=4)
    ds = load_dataset(cfg)
    data = PeerData(ds, cfg, order_seed=0, aug_seed=0)
    ids, x, y = data.batch(0)
    assert x.shape == (4, 256) and torch.equal(y, ds.train_y[ids]) and torch.equal(x, ds.train_x[ids][:, :-1])
    ((tx, ty),) = list(data.test_batches())  # one held-out row: one batch
    assert torch.equal(tx, ds.test_x[:, :-1]) and torch.equal(ty, ds.test_y[:])
    assert data.num_test_positions == ds.test_y[:].numel()


@pytest.mark.slow
def test_two_peers_train_on_a_chat_corpus(tmp_path):
    from codistill.api import run_job
    from tests.helpers import lm_job

    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(i)} for i in range(24)])
    cfg = lm_job(tmp_path, f"data.train={train}", "data.block_size=256", "data.batch_size=4", "eval_every=2", steps=4)
    summary = run_job(cfg, str(tmp_path / "run"))
    chat = summary["data"]["chat"]
    assert chat["template"] == "chatml" and chat["train"]["conversations"] == 22 and chat["test"]["conversations"] == 2
    assert all(math.isfinite(p["test_loss"]) for p in summary["peers"])


def test_plain_windows_are_still_shifted_by_one():
    x = torch.arange(12).view(2, 6)
    inputs, targets = TASKS["causal_lm"].prepare(None, x, torch.zeros(2, dtype=torch.int64), 0)  # type: ignore[arg-type]
    assert torch.equal(inputs, x[:, :-1]) and torch.equal(targets, x[:, 1:])


# ---- (e) bad input: one line naming the row ----


GOOD = {"messages": CONVERSATION}


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"id": 7}, r"line 2: 'messages' \(data.messages_column\) is missing or null"),
        ({"messages": "hello"}, r"line 2: 'messages' is a str, not a list of messages"),
        ({"messages": []}, r"line 2: 'messages' is an empty list"),
        ({"messages": ["hi"]}, r"line 2: message 0 is a str, not an object with role and content"),
        ({"messages": [{"content": "hi"}]}, r"line 2: message 0 has no string 'role' \(got none\)"),
        ({"messages": [{"role": "user", "content": 3}]}, r"line 2: message 0 has no string 'content' \(got a int\)"),
        ([1, 2], r"line 2: a JSON list, not an object"),
    ],
)
def test_bad_jsonl_rows_are_one_line_naming_the_row(tmp_path, bad, says):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(ConfigError, match=says) as e:
        load(tmp_path, path)
    assert isinstance(e.value, ValueError) and str(e.value).startswith(f"data.train: {path} line 2")
    assert "\n" not in str(e.value)


def test_bad_table_rows_and_bad_json_name_the_row(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"messages": [CONVERSATION, None, CONVERSATION]}), path)
    with pytest.raises(ConfigError, match=r"row 1: 'messages' \(data.messages_column\) is missing or null"):
        load(tmp_path, path)
    broken = tmp_path / "b.jsonl"
    broken.write_text(json.dumps(GOOD) + "\n\n{not json\n")
    with pytest.raises(ConfigError, match=r"data.train: .*b.jsonl line 3: not JSON"):
        load(tmp_path, broken)


def test_a_jsonl_row_without_messages_or_text_names_both_columns(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "hi"}, GOOD])
    with pytest.raises(ConfigError, match=r"t.jsonl line 1: no string 'text' \(data.text_column\) nor 'messages'"):
        load(tmp_path, path)


def test_prepare_refuses_a_chat_corpus_in_one_line(tmp_path):
    from codistill.prepare.sources import plan_text

    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, GOOD])
    cfg = DataConfig(name="text", train=str(path))
    with pytest.raises(ConfigError, match=r"data.train: .*c.jsonl is a chat corpus .*without a prepare"):
        plan_text(cfg, 1 << 20)


def test_text_that_is_not_unicode_names_the_row(tmp_path):
    path = tmp_path / "c.jsonl"  # JSON may escape a lone surrogate, which has no UTF-8 bytes
    path.write_text("\n".join(json.dumps(r) for r in [GOOD, {"messages": [{"role": "user", "content": "\ud800"}]}]))
    with pytest.raises(ConfigError, match=r"c.jsonl line 2: text that is not valid Unicode"):
        load(tmp_path, path, val_fraction=0.5)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    def forgetful(messages: list[dict], add_generation_prompt: bool) -> str:  # drops all but the last turn
        return chatml(messages[-1:], add_generation_prompt)

    with pytest.raises(ValueError, match="f.jsonl line 4: the chat template .* cannot be located"):
        assistant_spans(Conversation("f.jsonl line 4", CONVERSATION), ChatTemplate("forgetful", forgetful))


@pytest.mark.parametrize(("key", "value"), [("messages_column", ""), ("messages_column", "text"), ("text_column", "")])
def test_bad_column_names(key, value):
    with pytest.raises(ValueError, match=f"data.{key}: got {value!r}"):
        DataConfig(name="text", **{key: value})
