import os

# 8 virtual CPU devices for the sharding / ring tests; harmless elsewhere. Must precede the first jax import.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (marker 'gpu'; run on the device machine)")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip)
