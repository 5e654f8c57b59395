"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def s3_root() -> Iterator[str]:
    """A bucket on a local S3 server (moto), as an ``s3://`` URI prefix for storage.join."""
    from orchestrator.testing.s3 import local_s3

    with local_s3() as root:
        yield root
