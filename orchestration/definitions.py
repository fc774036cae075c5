"""The one Dagster code location of Loopline (workspace.yaml points here).

Each asset group lives in its own module with its own ``defs``; this file merges them.
"""

import dagster as dg

from orchestration import (
    backtest_assets,
    feature_assets,
    health,
    ingest_assets,
    monitoring_assets,
    retention_assets,
    retraining,
    serving_assets,
    training_assets,
)
from orchestration.resources import LooplineStorage

defs = dg.Definitions.merge(
    ingest_assets.defs,
    feature_assets.defs,
    training_assets.defs,
    serving_assets.defs,
    monitoring_assets.defs,
    retraining.defs,
    backtest_assets.defs,
    health.defs,
    retention_assets.defs,
    dg.Definitions(resources={"storage": LooplineStorage()}),
)
