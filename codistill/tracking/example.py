"""What logging a peer's model needs (`ModelExample`), made from the job and its data when the run starts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codistill.config import RunConfig

__all__ = ["ModelExample", "model_example"]


@dataclass(frozen=True)
class ModelExample:
    """What logging a peer's model needs: how to build it and an input example (a small batch)."""

    build: Callable[[int], Any]  # peer index -> an nn.Module with the peer's architecture
    example_input: Any  # torch.Tensor (2, ...)
    dataset: Any  # codistill.data.Dataset
    dataset_source: str


def model_example(cfg: RunConfig, dataset: Any) -> ModelExample:
    """The job's ModelExample; made before the run, while the working directory it may name exists (a run
    that ends in a deleted one still knows where its data came from)."""
    from codistill.models import build_model
    from codistill.tasks import task_of

    task = task_of(dataset)

    def build_peer(i: int) -> Any:
        pc = cfg.peers[i]
        return build_model(pc.model, task.input_shape(dataset), dataset.num_classes, model_args=pc.model_args)

    example = task.example_input(dataset)
    # MLflow resolves a dataset source from a path or URI: the Parquet file, else the data root
    source = cfg.data.train or cfg.data.root
    source = source if "://" in source else str(Path(source).expanduser().absolute())
    return ModelExample(build_peer, example, dataset, source)
