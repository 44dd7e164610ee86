"""Small jobs and paths shared by tests."""

from pathlib import Path
from typing import TYPE_CHECKING

from codistill import config as C

if TYPE_CHECKING:
    from codistill.data import Dataset
    from codistill.peer import Peer

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


def make_peer(cfg: C.RunConfig, index: int, dataset: "Dataset") -> "Peer":
    """Peer `index` of `cfg` in this process, started as LocalEngine starts it."""
    from codistill.engine.peer_start import peer_start
    from codistill.peer import Peer

    return Peer(peer_start(cfg, index), dataset)


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
"""`model_args` of a tiny Llama-type `hf` model (built offline from its config)."""


def tiny_text() -> str:
    """Deterministic text, the same on every machine and Python (the stdlib corpus is not)."""
    words = "the peer learns from its teachers while they train and the others learn from it too".split()  # noqa: SIM905
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(4 + i % 5)) for i in range(600)]
    return "\n".join(lines) + "\n"


def lm_job(tmp_path: Path, *overrides: str, steps: int = 20) -> C.RunConfig:
    """Two tiny GPT peers on `tiny_text`, byte tokens, lockstep logits, LocalEngine."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny_text())
    raw = {
        "name": "lmtest",
        "seed": 0,
        "steps": steps,
        "eval_every": 10,
        "engine": "local",
        "device": "cpu",
        "data": {
            "name": "text",
            "train": str(corpus),
            "tokenizer": "byte",
            "block_size": 16,
            "batch_size": 8,
            "eval_batch_size": 16,
            "limit_test": 32,
            "root": str(tmp_path / "cache"),
        },
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0, "schedule": "constant"},
        "peers": [
            {"model": "gpt-tiny", "model_args": {"n_embd": 32}},
            {"model": "gpt-tiny", "model_args": {"n_layer": 1, "n_embd": 48}},
        ],
        "loss": {"alpha": 0.5, "temperature": 2.0},
        "exchange": {"timeout_s": 60},
        "tracking": "none",
    }
    return C.build(C.apply_overrides(raw, list(overrides)))
