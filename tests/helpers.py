"""Small jobs shared by tests."""

from codistill import config as C


def small_job(*overrides: str, steps: int = 20, models=("mlp", "cnn")) -> C.RunConfig:
    raw = {
        "name": "test", "seed": 0, "steps": steps, "eval_every": 10, "engine": "local", "device": "cpu",
        "data": {"name": "synthetic", "batch_size": 16, "synthetic_train": 256, "synthetic_shape": [1, 8, 8]},
        "optim": {"lr": 0.05, "schedule": "constant"},
        "peers": [{"model": m} for m in models],
        "loss": {"alpha": 0.5, "temperature": 2.0},
        "exchange": {"timeout_s": 60},
        "tracking": "none",
    }
    return C.build(C.apply_overrides(raw, list(overrides)))
