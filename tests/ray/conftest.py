import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session (start-up costs ~5 s). `address="local"`: never join
    another cluster running on this machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20)
    yield ray
    ray.shutdown()
