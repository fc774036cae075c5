"""Point-in-time training sets: labelled transactions joined to features, split by time."""

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingSetRef:
    """What the ``training_set`` asset hands downstream: the parquet file of record and its identity.

    ``version`` is a content hash of the rows; ``batches`` are the validated transactions and
    labels batch ids the set was built from (lineage back to the ledger).
    """

    path: str
    version: str
    feature_service: str
    batches: tuple[str, ...]
    rows: int
