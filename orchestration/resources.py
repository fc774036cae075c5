"""Dagster resources: the configured handle on Loopline's storage."""

from pathlib import Path

import dagster as dg

from orchestration.settings import Settings
from quality.ledger import BatchLedger


class LooplineStorage(dg.ConfigurableResource):
    """Loopline's home directory (``LOOPLINE_HOME`` when left empty) and its batch ledger."""

    home: str = ""

    @property
    def settings(self) -> Settings:
        return (Settings(Path(self.home).resolve()) if self.home else Settings.from_env()).ensure()

    @property
    def ledger(self) -> BatchLedger:
        return BatchLedger(self.settings.ledger_path)
