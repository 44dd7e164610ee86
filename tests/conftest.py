"""Shared by tests/unit (no Ray, seconds) and tests/ray (a real local Ray, clusters, job submit)."""

import os
import sys

import pytest


@pytest.fixture(autouse=True)
def _programs_mlflow_uri_restored():
    """Tests read their stores with `mlflow.set_tracking_uri`, which also sets MLFLOW_TRACKING_URI: a later
    test's run (and every subprocess it starts) would follow it instead of its own default."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = None
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
