"""Language models of the model registry: the plain-PyTorch GPT and Hugging Face causal LMs (offline)."""

import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from codistill.models import MODELS, build_model
from codistill.models.gpt import GPT, GPT_PRESETS
from codistill.models.hf import HFCausalLM
from tests.helpers import TINY_LLAMA

VOCAB, BLOCK = 50, 16
LLAMA = TINY_LLAMA
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2}


def _tokens(batch: int = 2, t: int = BLOCK, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


def _lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _one_step(model: torch.nn.Module, tokens: torch.Tensor, lr: float = 1e-2) -> tuple[float, float]:
    """(loss before, loss after) one Adam step on the fixed batch `tokens`."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = _lm_loss(model, tokens)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = _lm_loss(model, tokens)
    return loss.item(), after.item()


def test_gpt_shapes_and_causality():
    torch.manual_seed(0)
    model = GPT(VOCAB, BLOCK, n_layer=2, n_head=2, n_embd=32).eval()
    tokens = _tokens()
    logits = model(tokens)
    assert logits.shape == (2, BLOCK, VOCAB) and logits.dtype == torch.float32
    assert model(tokens[:, :5]).shape == (2, 5, VOCAB)  # shorter than block_size
    for t in (0, 7, BLOCK - 1):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        out = model(changed)
        torch.testing.assert_close(out[:, :t], logits[:, :t], rtol=0, atol=1e-5)  # the past is unchanged
        assert not torch.allclose(out[:, t], logits[:, t])  # position t sees its own token
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        model(_tokens(t=BLOCK + 1))


def test_gpt_tied_head_and_gpt2_init():
    torch.manual_seed(0)
    model: Any = GPT(VOCAB, BLOCK, n_layer=8, n_head=4, n_embd=128)  # Any: reaches into the blocks
    assert model.head.weight is model.tok_emb.weight
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 2e-3
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 2e-3
    scaled = 0.02 / (2 * 8) ** 0.5
    for block in model.blocks:
        assert abs(block.attn.proj.weight.std().item() - scaled) < 1e-3
        assert abs(block.mlp.proj.weight.std().item() - scaled) < 1e-3
    n_params = sum(p.numel() for p in model.parameters())  # the tied head is counted once
    assert n_params == VOCAB * 128 + BLOCK * 128 + 8 * (12 * 128 * 128 + 13 * 128) + 2 * 128


def test_gpt_validates_sizes():
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        GPT(VOCAB, BLOCK, n_head=4, n_embd=30)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        GPT(VOCAB, 0)


def _sizes(model: torch.nn.Module) -> tuple[int, int, int]:
    assert isinstance(model, GPT)
    block: Any = model.blocks[0]
    return len(model.blocks), block.attn.n_head, model.tok_emb.embedding_dim


def _inner(model: torch.nn.Module) -> Any:
    """The Hugging Face model inside an `hf` model (Any: its config is untyped here)."""
    assert isinstance(model, HFCausalLM)
    return model.hf_model


def test_gpt_presets_and_model_args():
    for name in ("gpt-tiny", "gpt-small", "gpt-medium"):
        model = build_model(name, (BLOCK,), VOCAB)
        assert _sizes(model) == tuple(GPT_PRESETS[name][k] for k in ("n_layer", "n_head", "n_embd"))
        assert model(_tokens()).shape == (2, BLOCK, VOCAB)
    assert _sizes(build_model("gpt", (BLOCK,), VOCAB)) == (4, 4, 128)  # gpt-small by default
    model = build_model("gpt", (BLOCK,), VOCAB, {"n_layer": 1, "n_head": 8, "n_embd": 32, "dropout": 0.1})
    assert _sizes(model) == (1, 8, 32) and model.block_size == BLOCK and model.vocab_size == VOCAB
    tiny: Any = build_model("gpt-tiny", (BLOCK,), VOCAB, {"n_layer": 3, "bias": False})
    assert _sizes(tiny) == (3, 2, 64) and tiny.blocks[0].attn.qkv.bias is None


def test_bad_model_args():
    with pytest.raises(ValueError, match="unknown key 'n_heads' for gpt-tiny; allowed: n_layer, n_head, n_embd"):
        build_model("gpt-tiny", (BLOCK,), VOCAB, {"n_heads": 2})
    with pytest.raises(ValueError, match=r"n_embd \(64\) must be divisible by n_head \(3\)"):
        build_model("gpt", (BLOCK,), VOCAB, {"n_head": 3, "n_embd": 64})
    with pytest.raises(ValueError, match=r"gpt: a language model needs input_shape \(block_size,\), got \(3, 32, 32\)"):
        build_model("gpt", (3, 32, 32), VOCAB)
    with pytest.raises(ValueError, match="model_args: resnet20 takes no arguments"):
        build_model("resnet20", (3, 32, 32), 10, {"width": 2})
    with pytest.raises(ValueError, match="model_args: torchvision:resnet18 takes no arguments"):
        build_model("torchvision:resnet18", (3, 32, 32), 10, {"width": 2})
    with pytest.raises(ValueError, match="unknown key 'width' for mlp; allowed: hidden"):
        build_model("mlp", (1, 8, 8), 10, {"width": 2})
    with pytest.raises(ValueError, match="pretrained: gpt-tiny has no pretrained weights"):
        build_model("gpt-tiny", (BLOCK,), VOCAB, pretrained=True)
    with pytest.raises(ValueError, match="pretrained is the peer's field"):
        build_model("gpt-tiny", (BLOCK,), VOCAB, {"pretrained": True})
    with pytest.raises(ValueError, match="hf needs model_type"):
        build_model("hf", (BLOCK,), VOCAB, {"hidden_size": 32})
    with pytest.raises(ValueError, match="unknown model_type 'nope'"):
        build_model("hf", (BLOCK,), VOCAB, {"model_type": "nope"})
    with pytest.raises(ValueError, match="vocab_size of hf must be an integer >= the job tokenizer's 50 tokens"):
        build_model("hf", (BLOCK,), VOCAB, {**LLAMA, "vocab_size": 7})
    # vision builders are unchanged with empty model_args
    assert build_model("mlp", (1, 8, 8), 10, {})(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    mlp: Any = build_model("mlp", (1, 8, 8), 10, {"hidden": 8})
    assert mlp[1].out_features == 8


def test_gpt_tiny_one_step_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model("gpt-tiny", (BLOCK,), VOCAB)
    before, after = _one_step(model, _tokens(batch=4, t=BLOCK + 1))
    assert after < before


def test_registry_names_and_checks_are_offline():
    assert {"gpt", "gpt-tiny", "gpt-small", "gpt-medium", "hf"} <= set(MODELS)
    MODELS.check("hf:some-org/some-model-that-does-not-exist", "peer.model")  # no network, any non-empty name
    with pytest.raises(ValueError, match="hf:"):
        MODELS.check("hf:", "peer.model")


def test_import_codistill_models_does_not_import_transformers():
    import subprocess

    code = "import sys, codistill.models; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("model_args", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_hf_builds_offline_and_trains(model_args):
    torch.manual_seed(0)
    model = build_model("hf", (BLOCK,), VOCAB, model_args)
    assert isinstance(model, HFCausalLM)
    config = _inner(model).config
    assert config.model_type == model_args["model_type"] and config.vocab_size == VOCAB
    assert config.max_position_embeddings >= BLOCK
    tokens = _tokens(batch=4, t=BLOCK)
    logits = model(tokens)
    assert isinstance(logits, torch.Tensor) and logits.shape == (4, BLOCK, VOCAB)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before, after = _one_step(model, tokens)
    assert torch.isfinite(torch.tensor([before, after])).all()
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_hf_positions_reach_block_size():
    model = build_model("hf", (64,), VOCAB, {**GPT2, "n_positions": 8})
    assert _inner(model).config.n_positions == 64
    assert model(_tokens(batch=1, t=64)).shape == (1, 64, VOCAB)


def _save_tiny_llama(path, vocab: int = VOCAB) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    sizes = {k: v for k, v in LLAMA.items() if k != "model_type"}
    config = AutoConfig.for_model("llama", vocab_size=vocab, max_position_embeddings=32, **sizes)
    saved = AutoModelForCausalLM.from_config(config)
    saved.save_pretrained(path)
    return saved


def test_hf_family_from_a_local_directory(tmp_path):
    saved = _save_tiny_llama(tmp_path)
    name = f"hf:{tmp_path}"
    loaded = build_model(name, (BLOCK,), VOCAB, pretrained=True)
    assert isinstance(loaded, HFCausalLM)
    expected = saved.state_dict()
    got = loaded.hf_model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(tokens), saved.eval()(tokens).logits)

    torch.manual_seed(2)
    fresh = build_model(name, (BLOCK,), VOCAB)  # the architecture, freshly initialised
    assert _inner(fresh).config.hidden_size == 32 and fresh(tokens).shape == (2, BLOCK, VOCAB)
    embed = "model.embed_tokens.weight"
    assert not torch.equal(_inner(fresh).state_dict()[embed], expected[embed])
    longer = build_model(name, (64,), VOCAB)  # fresh weights: room made for the block size
    assert _inner(longer).config.max_position_embeddings == 64
    too_long = r"block_size 64 exceeds the pretrained model's max_position_embeddings \(32\)"
    with pytest.raises(ValueError, match=too_long):
        build_model(name, (64,), VOCAB, pretrained=True)

    overridden = build_model(name, (BLOCK,), VOCAB, {"attention_dropout": 0.1})  # model_args override the config
    assert _inner(overridden).config.attention_dropout == 0.1
    with pytest.raises(ValueError, match="'hidden_sise' is not an attribute of the config"):
        build_model(name, (BLOCK,), VOCAB, {"hidden_sise": 8})


def test_hf_family_vocabulary_mismatch(tmp_path):
    _save_tiny_llama(tmp_path, vocab=40)
    for pretrained in (True, False):
        with pytest.raises(ValueError, match="output layer has 40 logits but the job's tokenizer has 50 tokens"):
            build_model(f"hf:{tmp_path}", (BLOCK,), VOCAB, pretrained=pretrained)
