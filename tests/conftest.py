"""Suite-wide fixtures.

The simulator's default start is "now minus 21 days", so a test that leaves ``start`` unset
would see different batches depending on the hour and weekday it runs at (a 6-hour batch at
night holds a third of a daytime one). Every test gets the same shape of history instead: the
default start is pinned to the Monday midnight (UTC) at or before three weeks ago. A test about
the real clock opts out with ``@pytest.mark.real_clock``.
"""

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.db import Location, Postgres, schema_name
from usecases.fraud import simulator

_real_default_start = simulator.default_start


def _monday_midnight_default_start(now: datetime | None = None) -> datetime:
    start = _real_default_start(now or datetime.now(UTC)).replace(hour=0)
    return start - timedelta(days=start.weekday())


@pytest.fixture(autouse=True)
def _history_of_a_fixed_shape(request, monkeypatch):
    if request.node.get_closest_marker("real_clock") is None:
        monkeypatch.setattr(simulator, "default_start", _monday_midnight_default_start)


@pytest.fixture(scope="session", autouse=True)
def _landed_files_are_whole() -> Iterator[None]:
    """Tests land files whole (a hidden name, then a rename), so the landing sensor need not
    wait for them to settle; the tests of files written in place set their own settle time.
    Session-wide, so module-scoped fixtures that land and ingest see it too."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOPLINE_LANDING_SETTLE_SECONDS", "0")
        yield


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private Postgres for the session (the scale profile's tests and the stores' tests)."""
    from tests.scale.services import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def store_at(request, tmp_path) -> Callable[[str], Location]:
    """Where a store under test keeps its rows, once per backend: a SQLite file under
    ``tmp_path``, or a fresh schema of the session's Postgres (the scale profile's)."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None

    def at(name: str) -> Location:
        if url is None:
            return tmp_path / name
        return Postgres(url, schema_name("test", Path(name).stem, uuid.uuid4().hex[:12]))

    return at
