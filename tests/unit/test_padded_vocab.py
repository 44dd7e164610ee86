"""Output layers padded past the tokenizer (Qwen2.5-style): accepted, and invisible to every loss, shard and
metric; a smaller output layer, or a pretrained model whose tokenizer numbers tokens otherwise, is refused."""

from typing import Any

import pytest
import torch

from codistill.config import LossConfig
from codistill.losses.distill import total_loss
from codistill.models import build_model
from codistill.models.hf import HFCausalLM, check_token_ids

VOCAB, BLOCK = 50, 16
QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def _padded_copy(model: HFCausalLM, padded: int) -> HFCausalLM:
    """`model` with its embedding and output layer padded to `padded` rows: the first VOCAB rows its own, the
    padding large (a padded column that leaked into a softmax would dominate it)."""
    inner: Any = model.hf_model
    copy = build_model("hf", (BLOCK,), VOCAB, {**QWEN2, "vocab_size": padded})
    assert isinstance(copy, HFCausalLM)
    state = copy.hf_model.state_dict()
    for key, value in inner.state_dict().items():
        if value.shape == state[key].shape:
            state[key] = value
        else:  # (padded, C) <- (VOCAB, C), then padding
            rows = torch.full_like(state[key], 0.0)
            rows[:VOCAB] = value
            rows[VOCAB:] = 5.0
            state[key] = rows
    copy.hf_model.load_state_dict(state)
    return copy


def test_padded_output_layer_gives_the_tokenizers_logits_only():
    torch.manual_seed(0)
    plain = build_model("hf", (BLOCK,), VOCAB, QWEN2)
    assert isinstance(plain, HFCausalLM)
    teacher = build_model("hf", (BLOCK,), VOCAB, QWEN2).eval()
    tokens = torch.randint(0, VOCAB, (3, BLOCK + 1), generator=torch.Generator().manual_seed(1))
    losses = {}
    for padded in (VOCAB, 64, 96):  # two padded sizes of one family, and none
        model = _padded_copy(plain, padded).eval() if padded != VOCAB else plain.eval()
        assert model.padded_vocab_size == padded and model.num_classes == VOCAB
        student_logits = model(tokens[:, :-1])
        assert student_logits.shape == (3, BLOCK, VOCAB)
        with torch.no_grad():
            teacher_logits = teacher(tokens[:, :-1])
        parts = total_loss(student_logits, tokens[:, 1:], [teacher_logits], LossConfig(alpha=0.5, temperature=2.0), 0)
        parts.total.backward()
        losses[padded] = (parts.ce.item(), parts.distill.item() if parts.distill is not None else None)
    # the padded peers' losses are the unpadded pair's: nothing padded reached a softmax
    assert losses[64] == pytest.approx(losses[VOCAB], rel=1e-5)
    assert losses[96] == pytest.approx(losses[VOCAB], rel=1e-5)


def test_padded_peer_trains_and_its_padding_gets_no_gradient():
    torch.manual_seed(0)
    model: Any = build_model("hf", (BLOCK,), VOCAB, {**QWEN2, "vocab_size": 64})
    tokens = torch.randint(0, VOCAB, (2, BLOCK + 1))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
    head = model.hf_model.get_output_embeddings()
    assert head.weight.grad[VOCAB:].abs().sum() == 0 and head.weight.grad[:VOCAB].abs().sum() > 0


def test_smaller_output_layer_is_refused_naming_both_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size of hf must be an integer >= the job tokenizer's 50 tokens.*40"):
        build_model("hf", (BLOCK,), VOCAB, {**QWEN2, "vocab_size": 40})
    small: Any = build_model("hf", (BLOCK,), 40, QWEN2)
    small.hf_model.save_pretrained(tmp_path)
    padded: Any = build_model(f"hf:{tmp_path}", (BLOCK,), 32, pretrained=True)  # a tokenizer of 32: padded by 8
    assert padded.num_classes == 32 and padded.padded_vocab_size == 40
    with pytest.raises(ValueError, match=r"output layer has 40 logits but the job's tokenizer has 50 tokens.*hf:"):
        build_model(f"hf:{tmp_path}", (BLOCK,), VOCAB, pretrained=True)


def _tokenizer_folder(path, vocab: dict[str, int]) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))).save_pretrained(
        path
    )


def test_tokenizer_with_other_ids_is_refused(tmp_path):
    words = ["<unk>", "a", "b", "c", "d"]
    _tokenizer_folder(tmp_path, {w: i for i, w in enumerate(words)})
    same = {w: i for i, w in enumerate(words)}
    check_token_ids(str(tmp_path), same, "hf:job", "hf:model")  # same ids: accepted
    check_token_ids(str(tmp_path), {"a": 1, "b": 2}, "hf:job", "hf:model")  # a subset with the same ids too
    swapped = same | {"b": 3, "c": 2}
    refused = r"maps token 'c' to id 3 but the job's tokenizer \(hf:job.*to 2.*data.tokenizer: hf:"
    with pytest.raises(ValueError, match=refused):
        check_token_ids(str(tmp_path), swapped, "hf:job", "hf:model")
    check_token_ids(str(tmp_path / "nothing-here"), swapped, "hf:job", "hf:model")  # no tokenizer: nothing to compare
