"""A peer's final model and the job's dataset in MLflow's own forms: `mlflow.pytorch.log_model` with a
signature and an input example (so `mlflow.pytorch.load_model` and serving work), a language-model peer's
Hugging Face export (`peers/<name>/`, codistill.engine.export) with `mlflow.transformers.log_model` as a
text-generation pipeline, and the training data as a dataset input of every run of the job."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from codistill.tracking.example import ModelExample

__all__ = ["log_dataset", "log_hf_model", "log_peer_model"]


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


def log_hf_model(run_id: str, name: str, folder: Path) -> None:
    """The Hugging Face model folder `folder` (config, safetensors weights, tokenizer files) as a
    `text-generation` pipeline of the `transformers` flavour (`mlflow.transformers.load_model` gives it back).

    Given as loaded objects, not as the folder's path: MLflow 3.17's path form fails with transformers 5
    (its task table holds class names there, not classes). Loaded from the folder, the model's name is a local
    path, so MLflow looks for no model card on the hub."""
    import mlflow
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codistill.models.export import quiet_progress

    with quiet_progress(), mlflow.start_run(run_id=run_id):  # log_model writes to the active run: the peer's
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name=name,
            task="text-generation",
            pip_requirements=[  # no pip freeze: it takes seconds
                f"torch=={torch.__version__.split('+')[0]}",
                f"transformers=={transformers.__version__}",
            ],
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
