"""One local Ray for the whole integration tier: start-up costs tens of seconds on 2 cores, and
one Ray per host avoids "multiple active Ray instances" in Ray's placement-group cleaner."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    import ray

    # address="local": always a fresh instance, never a stale one a killed run left behind.
    ctx = ray.init(address="local", num_cpus=2, log_to_driver=True)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()
