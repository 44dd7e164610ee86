import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session (start-up costs ~5 s). `address="local"`: never join
    another cluster running on this machine."""
    import ray

    # Ray Train's controller polls its workers every 2 s by default; a worker group here starts, reports and
    # stops within seconds, and each poll it waits for is test time (the local Ray's processes inherit this).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20)
    yield ray
    ray.shutdown()
