"""The one Dagster code location of Loopline (workspace.yaml points here).

Each asset group lives in its own module with its own ``defs``; this file merges them.
"""

import dagster as dg

from orchestration import backtesting, features, ingest, monitoring, serving, training
from orchestration.resources import LooplineStorage

defs = dg.Definitions.merge(
    ingest.defs,
    features.defs,
    training.defs,
    serving.defs,
    monitoring.defs,
    backtesting.defs,
    dg.Definitions(resources={"storage": LooplineStorage()}),
)
