"""Hugging Face causal language models through `transformers` (imported inside the functions, so
`import codistill.models` does not import it).

- `hf`: `model_args` name a `model_type` (llama, gpt2, mistral, qwen2, ...) and the rest are that
  config's keyword arguments: `AutoConfig.for_model(model_type, vocab_size=num_classes, **rest)`, then
  `AutoModelForCausalLM.from_config`, freshly initialised; this needs no network.
- `hf:<hub id or local path>`: that model's config (`AutoConfig.from_pretrained`; `model_args` override
  its attributes) and, with `pretrained=True`, its weights (`AutoModelForCausalLM.from_pretrained`).
  Its output layer must have at least the job tokenizer's `num_classes` columns; columns past them (padding,
  as many released families have) are dropped from the logits (`HFCausalLM`). With pretrained weights, a
  tokenizer saved with the model must give every token the id the job's tokenizer gives it
  (`check_token_ids`). The model's own Python code (a config with
  `auto_map`) runs only when `model_args.trust_remote_code: true` *and* the person starting the run allows
  it (`codistill.trust`); other loader options (revision, token, cache_dir, ...) are not job fields.

Every model is wrapped in `HFCausalLM`, whose forward maps tokens (B, T) to logits (B, T, V) like the
other language models; the Hugging Face model is `.hf_model` (for `save_pretrained`). Parameters are
float32 whatever the checkpoint's dtype (mixed precision is the peer's autocast). No ray, no mlflow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from codistill.hf_hub import hub_reachable
from codistill.models.gpt import lm_block_size
from codistill.models.taps import Layers
from codistill.trust import OPT_IN, require_remote_code

__all__ = ["HFCausalLM", "check_hf_name", "check_token_ids", "hf", "hf_model"]

_POSITION_FIELDS = ("max_position_embeddings", "n_positions")


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM whose forward returns only the logits of the job tokenizer's ids.

    Released families pad their output layer past the tokenizer (Qwen2.5: 151,936 or 152,064 logit columns for
    151,665 tokens) so that matrix sizes divide nicely; the padded columns are no token. The forward keeps the
    first `num_classes` columns, the ids the tokenizer can produce, before any softmax: every loss, shard and
    metric sees the same vocabulary whatever each peer's padding, and nothing padded is ever sent.
    """

    def __init__(self, hf_model: nn.Module, num_classes: int | None = None):
        super().__init__()
        self.hf_model = hf_model
        padded = _vocab_size(hf_model.config)
        self.num_classes = padded if num_classes is None else num_classes
        self.padded_vocab_size = padded

    def distill_layers(self) -> Layers:
        """Hidden states: the input embeddings' output, then each decoder layer's (B, T, C). No attention taps:
        architectures project queries, keys and values each their own way (attention terms need `gpt` peers)."""
        hf_model: Any = self.hf_model
        text_config = hf_model.config.get_text_config()
        depth = getattr(text_config, "num_hidden_layers", None)
        names = {id(m): n for n, m in self.named_modules()}
        stacks = [
            n for n, m in self.named_modules() if isinstance(m, nn.ModuleList) and depth is not None and len(m) == depth
        ]
        embedding = hf_model.get_input_embeddings()
        if not stacks or id(embedding) not in names:
            raise ValueError(f"{type(self.hf_model).__name__}: cannot find its decoder layers for hidden-state terms")
        width = getattr(text_config, "hidden_size", None)
        hidden = (names[id(embedding)], *(f"{stacks[0]}.{i}" for i in range(depth or 0)))
        return Layers(hidden=hidden, causal=True, width=width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.hf_model(input_ids=tokens, use_cache=False, return_dict=True)  # tokens (B, T)
        logits = out.logits  # (B, T, V_padded)
        if self.padded_vocab_size != self.num_classes:
            logits = logits[..., : self.num_classes]  # (B, T, V): the tokenizer's ids only
        return logits


def _vocab_size(config: Any) -> int | None:
    return getattr(config.get_text_config(), "vocab_size", None)


def _positions(config: Any) -> tuple[str, int] | None:
    """(field, value) of the config's maximum sequence length, or None when it has no such field."""
    text = config.get_text_config()
    for field in _POSITION_FIELDS:
        value = getattr(text, field, None)
        if isinstance(value, int):
            return field, value
    return None


def _fit_positions(config: Any, block_size: int) -> None:
    """Raise the config's maximum sequence length to at least `block_size` (fresh weights only)."""
    found = _positions(config)
    if found is not None and found[1] < block_size:
        setattr(config.get_text_config(), found[0], block_size)


def _check_vocab(config: Any, num_classes: int, who: str) -> None:
    """The output layer must have a column for every id of the job's tokenizer; more (padding) is fine."""
    vocab = _vocab_size(config)
    if not isinstance(vocab, int) or vocab < num_classes:
        raise ValueError(
            f"{who}: the model's output layer has {vocab} logits but the job's tokenizer has {num_classes} tokens "
            "(ids the model could never predict); use the model's own tokenizer (data.tokenizer: hf:<its id>) or "
            f"a model whose vocab_size is at least {num_classes}"
        )


def _wrap(model: nn.Module, num_classes: int, who: str) -> HFCausalLM:
    _check_vocab(model.config, num_classes, who)
    return HFCausalLM(model, num_classes)


def hf(input_shape: tuple[int, ...], num_classes: int, **model_args: Any) -> nn.Module:
    """`hf`: a freshly initialised causal LM of `model_args["model_type"]`, the other `model_args` its
    config's keyword arguments, with `vocab_size = num_classes` (or `model_args.vocab_size`, an output layer
    padded past the tokenizer) and room for `input_shape == (block_size,)`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    block_size = lm_block_size(input_shape, "hf")
    rest = dict(model_args)
    model_type = rest.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(
            "model_args: hf needs model_type, a transformers model type (llama, gpt2, mistral, qwen2, ...), "
            f"got {model_type!r}"
        )
    vocab_size = rest.pop("vocab_size", num_classes)  # larger: an output layer padded past the tokenizer
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < num_classes:
        raise ValueError(
            f"model_args: vocab_size of hf must be an integer >= the job tokenizer's {num_classes} tokens "
            f"(the output layer, padded or not), got {vocab_size!r}"
        )
    try:
        config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **rest)
    except ValueError as e:
        if "Unrecognized model identifier" in str(e):
            raise ValueError(
                f"model_args: unknown model_type {model_type!r}; allowed: a transformers model type "
                "(llama, gpt2, mistral, qwen2, ...)"
            ) from None
        raise
    _fit_positions(config, block_size)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return _wrap(model, num_classes, "hf")


def check_hf_name(name: str) -> None:
    """Any non-empty hub id or local path; nothing is looked up (configs are checked offline)."""
    if not name.strip():
        raise ValueError("a Hugging Face hub id or local path after 'hf:' (hf:<id or path>)")


_LOADER_OPTIONS = frozenset(
    {
        "trust_remote_code",
        "code_revision",
        "revision",
        "cache_dir",
        "force_download",
        "proxies",
        "token",
        "use_auth_token",
        "local_files_only",
        "subfolder",
        "return_unused_kwargs",
        "gguf_file",
        "adapter_kwargs",
    }
)
"""Keyword arguments of `from_pretrained` that are not config attributes: never taken from a job."""


def _trust_remote_code(asked: Any, who: str) -> bool:
    """`model_args.trust_remote_code`: the job may ask for the model's own code; it runs only with the opt-in
    given where the run starts (`codistill.trust`)."""
    if not isinstance(asked, bool):
        raise ValueError(f"model_args: trust_remote_code of {who} must be true or false, got {asked!r}")
    if asked:
        require_remote_code(f"model_args: trust_remote_code of {who} runs the Python files that model names")
    return asked


def load_config(name: str, trust: bool, who: str) -> Any:
    """The config of `hf:<name>`: a local folder, else the Hugging Face cache, else the hub when it can be
    reached; a ValueError in one line otherwise. Remote code runs only when `trust` (see `_trust_remote_code`)."""
    from transformers import AutoConfig

    def load(**kwargs: Any) -> Any:
        try:
            return AutoConfig.from_pretrained(name, trust_remote_code=trust, **kwargs)
        except OSError as e:
            raise ValueError(f"{who}: {_first_line(e)}") from None
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise ValueError(
                    f"{who}: its config names its own Python code (auto_map) and no class of transformers; "
                    f"set model_args.trust_remote_code: true and allow it with {OPT_IN}"
                ) from None
            raise ValueError(f"{who}: {_first_line(e)}") from None

    if Path(name).expanduser().exists():
        return load()
    try:
        return load(local_files_only=True)
    except ValueError:
        if not hub_reachable():
            raise ValueError(
                f"{who}: not a local folder, not in the Hugging Face cache, and the hub cannot be reached; "
                "give a local path or download it first (huggingface-cli download)"
            ) from None
    return load()


def check_token_ids(name: str, job_vocab: Mapping[str, int], job_tokenizer: str, who: str) -> None:
    """Pretrained weights learned id i as one token: a tokenizer saved with `hf:<name>` (loaded offline, its own
    code never run) must give every token of the job's tokenizer (`job_vocab`, token -> id) the same id, else a
    ValueError naming the first token that differs, both ids and the fix. Nothing to compare (no tokenizer files
    beside the model): no check."""
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except Exception:  # no tokenizer saved with the model, or one needing its own code: nothing to compare
        return
    own_vocab: Mapping[str, int] = own.get_vocab()
    for token, job_id in sorted(job_vocab.items(), key=lambda item: item[1]):
        own_id = own_vocab.get(token)
        if own_id != job_id:
            raise ValueError(
                f"{who}: its tokenizer maps token {token!r} to id {own_id} but the job's tokenizer ({job_tokenizer}, "
                f"{len(job_vocab)} tokens) maps it to {job_id}; pretrained weights need the ids they were trained "
                f"with: set data.tokenizer: hf:{name}"
            )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def hf_model(name: str) -> Callable[..., nn.Module]:
    """`hf:<hub id or local path>`: the builder `(input_shape, num_classes, *, pretrained=False,
    **model_args)` of that model; `model_args` override attributes of its config."""

    who = f"hf:{name}"

    def build(
        input_shape: tuple[int, ...], num_classes: int, *, pretrained: bool = False, **model_args: Any
    ) -> nn.Module:
        from transformers import AutoModelForCausalLM

        check_hf_name(name)
        block_size = lm_block_size(input_shape, who)
        if "model_type" in model_args:
            raise ValueError(f"model_args: {who} takes its model_type from its config; remove model_type")
        trust = _trust_remote_code(model_args.pop("trust_remote_code", False), who)
        config = load_config(name, trust, who)
        for key, value in model_args.items():  # overrides of config attributes, nothing else (no loader options)
            if key.startswith("_") or key in _LOADER_OPTIONS or not hasattr(config, key):
                raise ValueError(f"model_args: {key!r} is not an attribute of the config of {who}")
            setattr(config, key, value)
        _check_vocab(config, num_classes, who)
        if pretrained:
            found = _positions(config)
            if found is not None and found[1] < block_size:
                raise ValueError(
                    f"{who}: block_size {block_size} exceeds the pretrained model's {found[0]} ({found[1]})"
                )
            model = AutoModelForCausalLM.from_pretrained(
                name, config=config, dtype=torch.float32, trust_remote_code=trust
            )
        else:
            _fit_positions(config, block_size)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust)
        return _wrap(model, num_classes, who)

    build.__name__ = build.__qualname__ = "hf_" + "".join(c if c.isalnum() else "_" for c in name)
    return build
