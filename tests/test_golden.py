"""Golden per-step losses of a seeded two-peer lockstep run.

The file tests/golden/lockstep_losses.json is checked in; regenerate it only on purpose, when a
change is meant to alter the numbers:  CODISTILL_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py
"""

import json
import os
from pathlib import Path

import pytest

from codistill.engine import LocalEngine
from helpers import small_job

GOLDEN = Path(__file__).parent / "golden" / "lockstep_losses.json"


def golden_job():
    return small_job("data.augment=true", "exchange.dtype=float32", steps=30, models=("mlp", "cnn"))


def test_per_step_losses_match_golden_file():
    engine = LocalEngine(golden_job())
    engine.run()
    got = {"peer0-mlp": engine.step_losses[0], "peer1-cnn": engine.step_losses[1]}
    if os.environ.get("CODISTILL_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1))
    want = json.loads(GOLDEN.read_text())
    for name in want:
        assert len(got[name]) == 30
        assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
