"""Small jobs and paths shared by tests."""

from pathlib import Path

from codistill import config as C

ROOT = Path(__file__).resolve().parent.parent
"""The repository checkout."""
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
"""Real data beside the checkout on the team's machines (absent in a fresh clone: tests skip)."""


def small_job(*overrides: str, steps: int = 20, models: tuple[str, ...] = ("mlp", "cnn")) -> C.RunConfig:
    raw = {
        "name": "test",
        "seed": 0,
        "steps": steps,
        "eval_every": 10,
        "engine": "local",
        "device": "cpu",
        "data": {"name": "synthetic", "batch_size": 16, "synthetic_train": 256, "synthetic_shape": [1, 8, 8]},
        "optim": {"lr": 0.05, "schedule": "constant"},
        "peers": [{"model": m} for m in models],
        "loss": {"alpha": 0.5, "temperature": 2.0},
        "exchange": {"timeout_s": 60},
        "tracking": "none",
    }
    return C.build(C.apply_overrides(raw, list(overrides)))
