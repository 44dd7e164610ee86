"""Tasks (`Dataset.task`): registry TASKS of how a kind of data is trained and evaluated.

`classification` (images, one label per example) and `causal_lm` (token windows, a label per token).
Adding a task is one module and one entry here. No ray, no mlflow.
"""

from __future__ import annotations

from codistill.registry import Registry
from codistill.tasks.base import IGNORE_INDEX, EvalResult, Task, kl_subset_size
from codistill.tasks.causal_lm import CausalLM
from codistill.tasks.classification import Classification

__all__ = ["IGNORE_INDEX", "TASKS", "EvalResult", "Task", "kl_subset_size", "task_of"]

TASKS: Registry[Task] = Registry("task", {"classification": Classification(), "causal_lm": CausalLM()})


def task_of(dataset: object) -> Task:
    return TASKS[getattr(dataset, "task", "classification")]
