"""What the driver checks before any Ray actor starts (each failure one line naming the field): the
dataset loads and is sound (the loaders check files, images and labels), every peer's shard holds at
least one batch, and every peer's model builds for this data (sizes, model_args, a Hugging Face model's
vocabulary against the job's tokenizer; with strategy fsdp, layers to shard), on PyTorch's meta device: no
memory, no weights read. Returns the dataset, so it is decoded once, here, and shared."""

from __future__ import annotations

import math

from codistill.config import RunConfig
from codistill.config.schema import check_rounds
from codistill.data import Dataset, load_dataset
from codistill.errors import ConfigError

__all__ = ["check_job", "num_shards"]


def num_shards(cfg: RunConfig) -> int:
    return cfg.num_peers if cfg.data.shard == "disjoint" else 1


def check_job(cfg: RunConfig) -> Dataset:
    dataset = load_dataset(cfg.data)
    n, shards = len(dataset.train_y), num_shards(cfg)
    smallest = n // shards  # shard i holds ids[i::shards]: the last ones hold floor(n / shards)
    if smallest < cfg.data.batch_size:
        where = f"each of {shards} disjoint shards of" if shards > 1 else "the"
        raise ConfigError(
            "data.batch_size",
            cfg.data.batch_size,
            f"at most {smallest}, the size of {where} {n} training examples"
            + (" (data.limit_train)" if cfg.data.limit_train else ""),
        )
    if cfg.epochs is not None:  # the longest peer's steps: a whole training set's epochs at most
        check_rounds(math.ceil(cfg.epochs * (n // cfg.data.batch_size)), cfg.eval_every, "epochs")
    if len(dataset.test_y) == 0:
        raise ConfigError("data.limit_test", cfg.data.limit_test, "at least 1 test example")
    check_models(cfg, dataset)
    return dataset


def check_models(cfg: RunConfig, dataset: Dataset) -> None:
    import torch

    from codistill.models import build_model
    from codistill.models.units import shard_units
    from codistill.tasks import task_of

    shape = task_of(dataset).input_shape(dataset)
    for i, pc in enumerate(cfg.peers):
        try:
            with torch.device("meta"):  # shapes only; pretrained weights are the peer's to load
                model = build_model(pc.model, shape, dataset.num_classes, model_args=pc.model_args)
        except ValueError as e:
            raise ConfigError(f"peers.{i}.model", pc.model, f"a model for this data: {e}") from None
        except Exception:  # a builder that needs real tensors (user code): its peer builds it
            continue
        if pc.pretrained and pc.model.startswith("hf:"):
            _check_token_ids(i, pc.model, dataset)
        if pc.strategy == "fsdp" and not shard_units(model):
            raise ConfigError(
                f"peers.{i}.strategy",
                pc.strategy,
                f"'ddp' for model {pc.model}: it has no layers FSDP can shard one by one (transformer blocks, "
                "Hugging Face decoder layers or network stages: codistill.models.units)",
            )


def _check_token_ids(index: int, model: str, dataset: Dataset) -> None:
    """A pretrained Hugging Face peer's own tokenizer against the job's, token by token (`check_token_ids`)."""
    from codistill.data.tokenizers import tokenizer_from_meta
    from codistill.models.hf import check_token_ids

    if "tokenizer" not in dataset.meta:
        return
    tokenizer = tokenizer_from_meta(dataset.meta)
    job_vocab = tokenizer.vocab()
    if job_vocab is None:  # byte tokens: ids are bytes, no strings to compare
        return
    try:
        check_token_ids(model[3:], job_vocab, tokenizer.name, model)
    except ValueError as e:
        raise ConfigError(f"peers.{index}.model", message=str(e)) from None
