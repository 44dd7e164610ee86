"""A trained language-model peer as a Hugging Face model folder: `config.json`, `model.safetensors` and the
job's tokenizer files, which `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)` load offline, with no codistill installed.

- `hf` / `hf:<id>` peers (`HFCausalLM`): the wrapped model's own `save_pretrained`, with the trained weights.
- The built-in `GPT` (`codistill.models.gpt`): an equivalent `GPT2LMHeadModel`. The mapping is exact, logit for
  logit (tested): learned positions (`n_positions = block_size`), pre-LayerNorm blocks with eps 1e-5, the fused
  q|k|v Linear as GPT-2's Conv1D `c_attn` (the same matrix transposed: Conv1D computes x @ W with W (in, out)),
  the erf GELU (`activation_function: gelu`; GPT-2's own `gelu_new` is the tanh approximation), a final
  LayerNorm and the LM head tied to the token embedding. GPT-2 always has biases: a GPT built with
  `bias: false` gets zero biases, which compute the same thing. Dropout does not change evaluation; the
  config carries the GPT's rate for training on.
- Any other model (the image classifiers): no export, and a one-line reason.

LoRA adapters are merged into the base weights before anything is saved, so the folder is a plain model that
needs no peft to load (`W + (alpha / r) B A`, exact up to float rounding): adapters injected in place
(`codistill.models.adapters`, `peers[i].adapter`: `weights` has their `lora_` keys and `model` their layers) through
`adapters.merged`.

The tokenizer is written beside the model so that `AutoTokenizer.from_pretrained(folder)` encodes text to the
job's ids (`hf_tokenizer`). No special tokens are added (they would change the vocabulary); a model whose
vocabulary is larger than the tokenizer's (a padded output layer) is exported as it is. No ray, no mlflow;
`transformers` and `tokenizers` are imported when a model is exported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from codistill.data.tokenizers import BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer
from codistill.models.adapters import has_adapter, is_adapter_key, merged
from codistill.models.gpt import GPT
from codistill.models.hf import HFCausalLM

__all__ = ["ExportResult", "export_hf", "gpt2_config", "gpt_to_gpt2_weights", "hf_tokenizer", "quiet_progress"]

_HF_PREFIX = "hf_model."


@dataclass(frozen=True)
class ExportResult:
    """What `export_hf` wrote into `folder`."""

    folder: Path
    format: str
    """`gpt2` (the built-in GPT as an equivalent GPT-2) or `hf` (a Hugging Face model's own class)."""
    model_type: str
    """The config's `model_type` (`gpt2`, `llama`, ...)."""
    files: tuple[str, ...]
    """The file names under `folder`, sorted."""
    tokenizer: bool
    """Whether tokenizer files were written."""


def export_hf(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    tokenizer: Tokenizer | None,
    folder: str | os.PathLike[str],
    chat_template: str | None = None,
) -> ExportResult | str:
    """Write `model` with `weights` (its `state_dict`, on the CPU) and `tokenizer` as a Hugging Face model folder;
    the reason, one line, when there is no exact Hugging Face equivalent (nothing is written then).

    `model` has the peer's architecture and may be on any device, PyTorch's meta device included (how the engines
    build it: no memory, no initialisation): an `HFCausalLM`'s tensors are replaced by `weights`
    (`load_state_dict(assign=True)`), a `GPT` is only read for its sizes. A model with LoRA adapters has them in
    `model` and `weights` and is exported merged (see the module docstring). `chat_template` (Jinja): the one the
    peer was trained with on a chat corpus, saved with a tokenizer that has none of its own."""
    if any(is_adapter_key(k) for k in weights):
        plain = _merge_adapters(model, weights)
        if isinstance(plain, str):
            return plain
        model, weights = plain, plain.state_dict()
    if isinstance(model, GPT):
        built = _gpt2_model(model, weights)
        fmt = "gpt2"
    elif isinstance(model, HFCausalLM):
        built = _hf_model(model, weights)
        fmt = "hf"
    else:
        return f"no Hugging Face equivalent for {type(model).__name__}"
    if isinstance(built, str):
        return built
    hf_model = built
    text_config = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
    vocab = getattr(text_config, "vocab_size", None)
    if tokenizer is not None and isinstance(vocab, int) and tokenizer.vocab_size > vocab:
        return f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary only {vocab}"
    if tokenizer is not None and isinstance(vocab, int) and vocab > tokenizer.vocab_size:
        _suppress_padding(hf_model, tokenizer.vocab_size, vocab)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_progress():
        hf_model.save_pretrained(out)  # safetensors (the default since transformers 4.35, the only format in 5)
        if tokenizer is not None:
            saved = hf_tokenizer(tokenizer)
            if chat_template is not None and not getattr(saved, "chat_template", None):
                saved.chat_template = chat_template
            saved.save_pretrained(out)
    files = tuple(sorted(p.name for p in out.iterdir() if p.is_file()))
    return ExportResult(out, fmt, str(getattr(hf_model.config, "model_type", "")), files, tokenizer is not None)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' progress bars off (5 draws one per save and load: noise under a run's own progress lines),
    as they were afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _suppress_padding(hf_model: Any, tokens: int, vocab: int) -> None:
    """An output layer padded past the tokenizer (ids tokens..vocab-1 are no token): `generate` never picks one
    (the saved generation config's `suppress_tokens`), so what it produces always decodes."""
    generation = getattr(hf_model, "generation_config", None)
    if generation is not None:
        generation.suppress_tokens = sorted({*(generation.suppress_tokens or ()), *range(tokens, vocab)})


# -- the built-in GPT as GPT-2 --------------------------------------------------------------------------------


def gpt2_config(model: GPT) -> Any:
    """The `GPT2Config` that computes what `model` computes (see the module docstring)."""
    from transformers import GPT2Config

    first = model.blocks[0]
    dropout = float(model.drop.p)
    return GPT2Config(
        vocab_size=model.vocab_size,
        n_positions=model.block_size,
        n_embd=model.tok_emb.embedding_dim,
        n_layer=len(model.blocks),
        n_head=int(first.attn.n_head),  # type: ignore[union-attr, arg-type]
        n_inner=None,  # 4 * n_embd, as the GPT's MLP
        activation_function="gelu",  # F.gelu: the exact (erf) GELU
        layer_norm_epsilon=float(model.ln_f.eps),
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        scale_attn_weights=True,  # q k^T / sqrt(head size), as scaled_dot_product_attention
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=True,
        bos_token_id=None,  # GPT2Config's 50256 is no id of this vocabulary
        eos_token_id=None,
        architectures=["GPT2LMHeadModel"],
    )


def gpt_to_gpt2_weights(model: GPT, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | str:
    """`weights` (the GPT's state_dict) under GPT-2's names and layouts; a reason when one has no place there.
    Linear weights (out, in) become Conv1D weights (in, out); a missing bias (`bias: false`) becomes zeros."""
    c = model.tok_emb.embedding_dim
    eps = {float(m.eps) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        return f"its LayerNorms have different eps {sorted(eps)}; GPT-2 has one layer_norm_epsilon"
    left = dict(weights)

    def take(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name in left:
            return left.pop(name)
        assert shape is not None, f"{name} is required"
        return torch.zeros(shape, dtype=weights["tok_emb.weight"].dtype)  # a bias the GPT was built without

    if "tok_emb.weight" not in weights:
        return "its weights have no tok_emb.weight"
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": take("tok_emb.weight"),  # (V, C)
        "transformer.wpe.weight": take("pos_emb.weight"),  # (block_size, C)
    }
    head = left.pop("head.weight", None)  # tied: the same values as tok_emb.weight
    if head is not None and not torch.equal(head, out["transformer.wte.weight"]):
        return "its LM head is not tied to the token embedding (GPT-2 ties them)"
    for i in range(len(model.blocks)):
        g, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs, width in (("ln1", "ln_1", c), ("ln2", "ln_2", c)):
            out[f"{h}{theirs}.weight"] = take(f"{g}{ours}.weight")  # (C,)
            out[f"{h}{theirs}.bias"] = take(f"{g}{ours}.bias", (width,))  # (C,)
        for ours, theirs, width in (
            ("attn.qkv", "attn.c_attn", 3 * c),  # (3C, C) -> (C, 3C): q|k|v stay in the same order
            ("attn.proj", "attn.c_proj", c),  # (C, C)
            ("mlp.fc", "mlp.c_fc", 4 * c),  # (4C, C) -> (C, 4C)
            ("mlp.proj", "mlp.c_proj", c),  # (C, 4C) -> (4C, C)
        ):
            out[f"{h}{theirs}.weight"] = take(f"{g}{ours}.weight").t().contiguous()
            out[f"{h}{theirs}.bias"] = take(f"{g}{ours}.bias", (width,))
    out["transformer.ln_f.weight"] = take("ln_f.weight")
    out["transformer.ln_f.bias"] = take("ln_f.bias", (c,))
    out["lm_head.weight"] = out["transformer.wte.weight"]
    if left:
        return f"GPT-2 has no place for its weights {', '.join(sorted(left)[:3])}"
    return out


def _gpt2_model(model: GPT, weights: dict[str, torch.Tensor]) -> Any:
    from transformers import GPT2LMHeadModel

    mapped = gpt_to_gpt2_weights(model, weights)
    if isinstance(mapped, str):
        return mapped
    with torch.device("meta"):  # no memory, no initialisation: every tensor comes from `mapped`
        gpt2 = GPT2LMHeadModel(gpt2_config(model))
    expected = {k: tuple(v.shape) for k, v in gpt2.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in mapped.items()}
    if expected != got:
        wrong = sorted(set(expected) ^ set(got)) or sorted(k for k in expected if expected[k] != got[k])
        return f"its weights do not match GPT-2's layout ({wrong[0]})"
    return _assign(gpt2, mapped)


# -- Hugging Face models ----------------------------------------------------------------------------------------


def _merge_adapters(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module | str:
    """A plain copy of `model` holding `weights` with its in-place LoRA adapters folded into the base Linears."""
    if not has_adapter(model):
        return "its weights have LoRA adapters but the model has none (build it with the peer's adapter)"
    result = model.load_state_dict(weights, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        wrong = [*result.missing_keys, *result.unexpected_keys]
        return f"its weights do not fit its adapter layout ({', '.join(wrong[:3])})"
    return merged(model).eval()


def _hf_model(model: HFCausalLM, weights: dict[str, torch.Tensor]) -> Any:
    inner: Any = model.hf_model
    own = {k.removeprefix(_HF_PREFIX): v for k, v in weights.items() if k.startswith(_HF_PREFIX)}
    if len(own) != len(weights):
        return "its weights are not those of an HFCausalLM (keys outside hf_model.)"
    inner = _assign(inner, own)
    if isinstance(inner, str):
        return inner
    if not hasattr(inner, "save_pretrained"):
        return f"{type(inner).__name__} has no save_pretrained"
    return inner


def _assign(module: Any, state: dict[str, torch.Tensor]) -> Any:
    """`module` holding the tensors of `state` (`assign`: no copy into meta tensors), its tied weights tied again;
    a reason when `state` leaves a parameter or saved buffer unset. Buffers a model does not save (rotary
    frequencies) stay as they were: `save_pretrained` does not write them and `from_pretrained` rebuilds them."""
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        return f"its weights have keys the model does not: {', '.join(result.unexpected_keys[:3])}"
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    missing = [n for n, p in module.state_dict().items() if p.is_meta]
    if missing:
        return f"its weights leave {', '.join(missing[:3])} unset"
    module.eval()
    return module


# -- tokenizers -------------------------------------------------------------------------------------------------


def hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """The job's tokenizer as a transformers tokenizer that encodes any text to the same ids (without special
    tokens: none are added) and decodes them back:

    - `byte`: a `tokenizers` BPE with no merges over GPT-2's byte alphabet (each byte one printable character),
      token id = byte value: a text is its UTF-8 bytes, as `ByteTokenizer`, and the ByteLevel decoder decodes
      them as `errors="replace"` does (only an invalid sequence becomes U+FFFD). (A `byte_fallback` vocabulary of
      `<0xNN>` tokens encodes the same ids but decodes every byte of a run that holds one invalid sequence to
      U+FFFD: generated text would differ.)
    - `bpe`: its own `tokenizers.Tokenizer`.
    - `hf:<name>`: the tokenizer itself (its special tokens, and whether it adds them by default, are its own;
      the job encoded with `add_special_tokens=False`).
    """
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, ByteTokenizer):
        backend = byte_backend()
    elif isinstance(tokenizer, BPETokenizer):
        backend = tokenizer.tokenizer
    else:
        raise TypeError(f"no Hugging Face form for tokenizer {tokenizer.name!r}")
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)


def byte_backend() -> Any:
    """A `tokenizers.Tokenizer` whose ids are UTF-8 bytes (see `hf_tokenizer`)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = _byte_alphabet()
    vocab = {alphabet[b]: b for b in range(256)}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    # no regex split: with no merges, words do not change ids; the whole text is one word
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's table byte -> printable character (Radford et al. 2019, encoder.py `bytes_to_unicode`): printable
    Latin-1 bytes stand for themselves, the other 68 for the characters from U+0100 on, in byte order. The
    ByteLevel pre-tokenizer and decoder of `tokenizers` use this table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table
