"""A peer's final model and the job's dataset in MLflow's own forms: `mlflow.pytorch.log_model` with a
signature and an input example (so `mlflow.pytorch.load_model` and serving work), and the training
data as a dataset input of every run of the job."""

from __future__ import annotations

import warnings
from typing import Any

from codistill.tracking.example import ModelExample

__all__ = ["log_peer_model", "log_dataset"]


def log_peer_model(run_id: str, name: str, model: Any, weights: dict, example: ModelExample) -> None:
    import mlflow
    import torch
    from mlflow.models import infer_signature

    model.load_state_dict(weights)
    model.eval()
    x = example.example_input
    with torch.no_grad():
        y = model(x)
    y = getattr(y, "logits", y)
    signature = infer_signature(x.numpy(), y.float().numpy())
    with mlflow.start_run(run_id=run_id):  # log_model writes to the active run: the peer's, by id
        mlflow.pytorch.log_model(
            model,
            name=name,
            signature=signature,
            input_example=x.numpy(),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],  # no pip freeze: it takes seconds
        )


def log_dataset(client: Any, run_ids: list[str], example: ModelExample) -> None:
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    ds = example.dataset
    with warnings.catch_warnings():  # a local path matches MLflow's local-artifact source twice: same source
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        dataset = from_numpy(
            features=ds.train_x[: min(len(ds.train_x), 10_000)].numpy(),
            targets=ds.train_y[: min(len(ds.train_y), 10_000)].numpy(),
            source=example.dataset_source,
            name=ds.name,
        )
    entity = dataset._to_mlflow_entity()
    for run_id in run_ids:
        client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])])
