"""Session-wide Redis and S3 for the scale profile's tests, always stopped at the end (the
session's Postgres is in tests/conftest.py: the stores' own tests use it too)."""

from collections.abc import Iterator

import pytest

from tests.scale.services import redis_server, s3_server


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    with s3_server() as url:
        yield url
