"""Golden per-step losses of seeded two-peer lockstep runs: logit exchange and checkpoint exchange (sync).

The files under tests/unit/golden/ are checked in with the torch version they were made with;
regenerate them only on purpose, when a change is meant to alter the numbers:
    CODISTILL_REGEN_GOLDEN=1 python -m pytest tests/unit/test_golden.py
"""

import json
import os
from pathlib import Path

import pytest
import torch

from codistill.engine import LocalEngine
from tests.helpers import small_job

GOLDEN = Path(__file__).parent / "golden"
JOBS = {
    "lockstep_losses.json": ("data.augment=true", "exchange.dtype=float32"),
    "checkpoint_sync_losses.json": (
        "exchange.mode=checkpoint",
        "exchange.sync=true",
        "exchange.period=5",
        "loss.burn_in=5",
        "data.augment=true",
    ),
}


@pytest.mark.parametrize("file", sorted(JOBS))
def test_per_step_losses_match_golden_file(file):
    engine = LocalEngine(small_job(*JOBS[file], steps=30, models=("mlp", "cnn")))
    engine.run()
    got = {"peer0-mlp": engine.step_losses[0], "peer1-cnn": engine.step_losses[1]}
    path = GOLDEN / file
    if os.environ.get("CODISTILL_REGEN_GOLDEN"):
        path.write_text(json.dumps({"torch": torch.__version__.split("+")[0], "losses": got}, indent=1))
    golden = json.loads(path.read_text())
    assert golden["torch"]  # which torch made it: a mismatch beyond tolerance after an upgrade says why
    for name, want in golden["losses"].items():
        assert len(got[name]) == 30
        assert got[name] == pytest.approx(want, rel=1e-4, abs=1e-6), (name, golden["torch"], torch.__version__)
