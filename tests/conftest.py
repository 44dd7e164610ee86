import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session (start-up costs ~5 s)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})
    yield ray
    ray.shutdown()
