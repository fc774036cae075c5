"""Dagster resources: the configured handle on Loopline's storage.

Heavy libraries (Feast, torch) are imported where they are used, not at module level: every run
process loads this code location, and an ingest run should not pay for Feast and torch.
"""

from dataclasses import replace
from typing import TYPE_CHECKING

import dagster as dg

from core.settings import Settings, local_path
from quality.ledger import BatchLedger

if TYPE_CHECKING:
    from feast import FeatureStore


class LooplineStorage(dg.ConfigurableResource):
    """Loopline's home directory (``LOOPLINE_HOME`` when left empty), its batch ledger and
    its feature store. The profile and its connection URLs always come from the environment
    (``Settings.from_env``), so no secret is ever part of Dagster config."""

    home: str = ""

    @property
    def settings(self) -> Settings:
        settings = Settings.from_env()
        if self.home:
            settings = replace(settings, home=local_path(self.home))
        return settings.ensure()

    @property
    def ledger(self) -> BatchLedger:
        return BatchLedger.for_settings(self.settings)

    def feature_store(self) -> "FeatureStore":
        """Feast for this home: SQLite online store locally, Redis in the scale profile."""
        from features.store import feature_store, redis_online_store

        settings = self.settings
        online = redis_online_store(settings.redis_url) if settings.scale else None
        return feature_store(settings.home, online)


IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


# The queue (decision 38): the run coordinator launches the highest `dagster/priority` first
# and lets one run per `loopline/pool` value go at a time; locally one ingest run at a time
# (`loopline/lane`), so a flood of landed files never holds every slot.
PRIORITY = {"ingest": 0, "features": 1, "monitoring": 2, "training": 3}


def lane(pool: str) -> dict[str, str]:
    """Tags of a job in ``pool``: its pool and its priority in the run queue."""
    tags = {"dagster/priority": str(PRIORITY[pool])}
    if pool == "ingest":  # ingest runs are capped per dataset in the scale profile instead
        return {**tags, "loopline/lane": "ingest"}
    return {**tags, "loopline/pool": pool}


def run_in_flight(instance: dg.DagsterInstance, job_name: str) -> dg.DagsterRun | None:
    """A queued or running run of ``job_name``, if any (sensors start one at a time)."""
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=IN_FLIGHT), limit=1)
    return runs[0] if runs else None
