"""The one Dagster code location of Loopline (workspace.yaml points here)."""

from __future__ import annotations

import dagster as dg

from orchestration import ingest
from orchestration.resources import LooplineStorage

defs = dg.Definitions(
    assets=[*ingest.RAW_ASSETS, *ingest.VALIDATED_ASSETS, ingest.reference_profile],
    jobs=[*ingest.INGEST_JOBS.values(), ingest.reference_profile_job],
    sensors=[ingest.landing_sensor],
    resources={"storage": LooplineStorage()},
)
