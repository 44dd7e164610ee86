"""What logging a peer's model needs (`ModelExample`), made from the job and its data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from codistill.config import RunConfig

__all__ = ["ModelExample"]


class ModelExample:
    """What logging a peer's model needs: how to build it and an input example (a small batch)."""

    def __init__(self, build: Callable[[int], Any], example_input: Any, dataset: Any, dataset_source: str):
        self.build = build  # peer index -> an nn.Module with the peer's architecture
        self.example_input = example_input  # torch.Tensor (2, ...)
        self.dataset = dataset  # codistill.data.Dataset
        self.dataset_source = dataset_source


def _model_example(cfg: RunConfig, dataset: Any) -> ModelExample:
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
