"""Suite-wide fixtures.

The simulator's default start is "now minus 21 days", so a test that leaves ``start`` unset
would see different batches depending on the hour and weekday it runs at (a 6-hour batch at
night holds a third of a daytime one). Every test gets the same shape of history instead: the
default start is pinned to the Monday midnight (UTC) at or before three weeks ago. A test about
the real clock opts out with ``@pytest.mark.real_clock``.
"""

from datetime import UTC, datetime, timedelta

import pytest

from usecases.fraud import simulator

_real_default_start = simulator.default_start


def _monday_midnight_default_start(now: datetime | None = None) -> datetime:
    start = _real_default_start(now or datetime.now(UTC)).replace(hour=0)
    return start - timedelta(days=start.weekday())


@pytest.fixture(autouse=True)
def _history_of_a_fixed_shape(request, monkeypatch):
    if request.node.get_closest_marker("real_clock") is None:
        monkeypatch.setattr(simulator, "default_start", _monday_midnight_default_start)


@pytest.fixture(autouse=True, scope="session")
def _landed_files_are_whole():
    """Tests land files whole (a hidden name, then a rename), so the landing sensor need not
    wait for them to settle; the tests of files written in place set their own settle time.
    Session-wide, so module-scoped fixtures that land files see it too."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOPLINE_LANDING_SETTLE_SECONDS", "0")
        yield
