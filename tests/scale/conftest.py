"""Session-wide Postgres and Redis for the scale profile's tests, always stopped at the end."""

from collections.abc import Iterator

import pytest

from tests.scale.services import postgres_server, redis_server, s3_server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    with s3_server() as url:
        yield url
