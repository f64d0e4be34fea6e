"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared fixtures."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# absl flags must be parsed before any module reads them.
flags.FLAGS(sys.argv[:1], known_only=True)


def _shared_data_dir():
    d = os.environ.get("RSLLM_DATA_DIR")
    return pathlib.Path(d) if d and pathlib.Path(d).is_dir() else None


@pytest.fixture(scope="session")
def data_dir():
    """The real datasets (../shared/data), or skip with the reason."""
    d = _shared_data_dir()
    if d is None:
        pytest.skip("RSLLM_DATA_DIR is not set or not a directory: real-data tests need ../shared/data")
    return d


@pytest.fixture(scope="session")
def split_cache_dir(tmp_path_factory):
    """One processed-split cache shared by the whole test session (building splits is the slow part)."""
    return tmp_path_factory.mktemp("split_cache")


def pytest_collection_modifyitems(config, items):
    """Mark every test that reads the real datasets (directly or through a fixture), so CI can run them
    on their own: `pytest tests -m real_data` with RSLLM_DATA_DIR set."""
    for item in items:
        if "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)
