"""Ingest and validate: landing folder -> raw batches -> validated batches (or quarantine).

One dynamic partition per landed batch, keyed by the batch's content hash.
"""

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl

from core.settings import Settings
from core.storage import uri
from core.usecase import active
from orchestration.resources import LooplineStorage
from quality import contracts, drift
from quality.ingest import UnreadableBatch, quarantine, read_batch, scan_landing, store_batch
from quality.ledger import BatchLedger, BatchRecord
from quality.schema import datasets, drift_columns, time_columns

PSI_WARN = 0.2
SKEW_MIN_ROWS = 200  # fewer rows say more about sampling noise than about the data
REFERENCE_MIN_BATCHES = 4
# An ingest run that fails (a write error, a crash) is launched again under a new run key, up
# to this many runs in all; then the batch is quarantined with the last error.
MAX_INGEST_RUNS = 3
BATCH_TAG = "loopline/batch"

PARTITIONS: dict[str, dg.DynamicPartitionsDefinition] = {
    ds: dg.DynamicPartitionsDefinition(name=f"{ds}_batches") for ds in datasets()
}


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "_none_"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _quarantine(
    settings: Settings,
    ledger: BatchLedger,
    dataset: str | None,
    batch_id: str,
    source: Path,
    reasons: list[str],
    rows: int | None = None,
) -> str:
    """Keep the file and its reasons in quarantine and record the outcome in the ledger."""
    where = quarantine(
        settings.quarantine, batch_id=batch_id, dataset=dataset, source=source, reasons=reasons
    )
    ledger.mark(batch_id, "quarantined", rows=rows, reason="; ".join(reasons))
    return str(where)


def _raw_asset(dataset: str) -> dg.AssetsDefinition:
    name = f"raw_{dataset}"

    @dg.asset(
        name=name,
        partitions_def=PARTITIONS[dataset],
        group_name="ingest",
        kinds={"parquet"},
        check_specs=[dg.AssetCheckSpec("readable", asset=name, blocking=True)],
        description=f"Each landed {dataset} batch kept as an immutable parquet file.",
    )
    def raw(context: dg.AssetExecutionContext, storage: LooplineStorage):
        batch_id = context.partition_key
        settings, ledger = storage.settings, storage.ledger
        record = ledger.get(batch_id)
        if record is None:
            raise dg.Failure(f"batch {batch_id} is not in the ledger; land files via the sensor")
        dest = settings.raw_file(dataset, batch_id)
        source = _source_of(settings, record)
        if dest.exists():
            df = pl.read_parquet(uri(dest))  # re-run of a stored batch: idempotent
        else:
            try:
                df = read_batch(source, dataset)
            except UnreadableBatch as exc:
                where = _quarantine(settings, ledger, dataset, batch_id, source, [str(exc)])
                _archive(settings, dataset, batch_id, source)
                context.log.warning(f"batch {batch_id} quarantined: {exc}")
                yield dg.MaterializeResult(
                    metadata={"status": "quarantined", "reason": str(exc), "quarantine": where}
                )
                yield dg.AssetCheckResult(
                    check_name="readable", passed=False, metadata={"reason": str(exc)}
                )
                return
            store_batch(df, dest)
        ledger.mark(batch_id, "stored", rows=df.height)
        _archive(settings, dataset, batch_id, source)
        yield dg.MaterializeResult(
            metadata={
                "status": "stored",
                "rows": df.height,
                "columns": ", ".join(df.columns),
                "source": record.source_name,
                "path": dg.MetadataValue.path(uri(dest)),
            }
        )
        yield dg.AssetCheckResult(check_name="readable", passed=True)

    return raw


def _source_of(settings: Settings, record: BatchRecord) -> Path:
    landed = Path(record.source_path)
    if landed.exists():
        return landed
    archived = settings.archive / record.dataset / f"{record.batch_id}__{record.source_name}"
    if archived.exists():
        return archived
    raise dg.Failure(f"batch {record.batch_id}: source file {landed} is gone and not archived")


def _archive(settings: Settings, dataset: str, batch_id: str, source: Path) -> None:
    """Move the landed original out of the landing folder, keeping it (nothing is deleted)."""
    target = settings.archive / dataset / f"{batch_id}__{source.name}"
    if source != target and source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)


def _validated_asset(dataset: str) -> dg.AssetsDefinition:
    name = f"validated_{dataset}"
    checks = [dg.AssetCheckSpec("contract", asset=name, blocking=True)]
    profiled = any(drift_columns(dataset))
    if profiled:
        checks.append(
            dg.AssetCheckSpec(
                "distribution_skew",
                asset=name,
                blocking=False,
                description="PSI/KS of this batch against the reference profile (WARN only).",
            )
        )

    @dg.asset(
        name=name,
        partitions_def=PARTITIONS[dataset],
        deps=[dg.AssetKey(f"raw_{dataset}")],
        group_name="quality",
        kinds={"soda", "parquet"},
        check_specs=checks,
        description=f"{dataset.capitalize()} batches that passed their soda data contract.",
    )
    def validated(context: dg.AssetExecutionContext, storage: LooplineStorage):
        batch_id = context.partition_key
        settings, ledger = storage.settings, storage.ledger
        raw_path = settings.raw_file(dataset, batch_id)
        result = contracts.run_contract(dataset, raw_path, now=datetime.now(UTC))
        check_rows = [
            {"check": c.name, "column": c.column or "", "outcome": c.outcome, **c.diagnostics}
            for c in result.checks
        ]
        contract_meta = {
            "checks": dg.MetadataValue.md(_md_table(check_rows)),
            "failed": sum(c.outcome == "failed" for c in result.checks),
            "reasons": "\n".join(result.reasons) or "none",
        }
        rows = pl.scan_parquet(uri(raw_path)).select(pl.len()).collect().item()
        if not result.passed:
            kind = "schema skew" if result.schema_skew else "contract violation"
            where = _quarantine(settings, ledger, dataset, batch_id, raw_path, result.reasons, rows)
            context.log.warning(f"batch {batch_id} quarantined ({kind}): {result.reasons}")
            yield dg.MaterializeResult(
                metadata={"status": "quarantined", "skew": kind, "quarantine": where, "rows": rows}
            )
            yield dg.AssetCheckResult(
                check_name="contract",
                passed=False,
                metadata={**contract_meta, "skew": kind},
                description=f"{kind}: " + "; ".join(result.reasons),
            )
            if profiled:
                yield dg.AssetCheckResult(
                    check_name="distribution_skew",
                    passed=True,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"compared": False, "why": "batch quarantined"},
                )
            return

        dest = settings.validated_file(dataset, batch_id)
        if not dest.exists():
            store_batch(pl.read_parquet(uri(raw_path)), dest)
        ledger.mark(batch_id, "validated", rows=rows)
        meta = {"status": "validated", "rows": rows, "path": dg.MetadataValue.path(uri(dest))}
        skew = _skew_check(settings, dataset, dest) if profiled else None
        if skew is not None and skew.metadata["compared"].value:
            # On the materialization too, where the retraining sensor reads the value skew.
            meta["max_psi"] = skew.metadata["max_psi"]
            meta["psi"] = dg.MetadataValue.json(
                {f["feature"]: f["psi"] for f in skew.metadata["drift"].value["features"]}
            )
        yield dg.MaterializeResult(metadata=meta)
        yield dg.AssetCheckResult(check_name="contract", passed=True, metadata=contract_meta)
        if skew is not None:
            yield skew

    return validated


def _skew_check(settings: Settings, dataset: str, path: Path) -> dg.AssetCheckResult:
    ref_path = settings.reference_profile_path(dataset)
    if not ref_path.exists():
        return dg.AssetCheckResult(
            check_name="distribution_skew",
            passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"compared": False, "why": "no reference profile yet"},
        )
    profile = drift.Profile.load(ref_path)
    batch = pl.read_parquet(uri(path))
    if batch.height < SKEW_MIN_ROWS:
        return dg.AssetCheckResult(
            check_name="distribution_skew",
            passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"compared": False, "why": f"{batch.height} rows (< {SKEW_MIN_ROWS})"},
        )
    result = drift.compare(profile, drift.drift_frame(dataset, batch))
    time_column = time_columns().get(dataset)
    if time_column and "hour_of_day" in profile.numeric:
        span = batch[time_column].max() - batch[time_column].min()
        if span < timedelta(hours=23):  # a batch of part of a day is skewed in hour by nature
            result = drift.DriftResult(
                [f for f in result.features if f.feature != "hour_of_day"], result.row_count
            )
    table = [
        {"feature": f.feature, "psi": round(f.psi, 4), "ks": _fmt(f.ks), "js": _fmt(f.js)}
        for f in result.features
    ]
    return dg.AssetCheckResult(
        check_name="distribution_skew",
        passed=result.max_psi < PSI_WARN,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "compared": True,
            "max_psi": float(result.max_psi),
            "psi_threshold": PSI_WARN,
            "features": dg.MetadataValue.md(_md_table(table)),
            "drift": dg.MetadataValue.json(result.to_dict()),
        },
    )


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


# The dataset scoring requests are rows of: its batches' skew is judged against a profile.
REQUEST_DATASET = active().request.dataset


class ReferenceProfileConfig(dg.Config):
    max_batches: int = 28


@dg.asset(
    group_name="quality",
    kinds={"polars"},
    deps=[dg.AssetKey(f"validated_{REQUEST_DATASET}")],
    description=f"Reference distribution profile of validated {REQUEST_DATASET} (for skew checks).",
)
def reference_profile(
    context: dg.AssetExecutionContext, config: ReferenceProfileConfig, storage: LooplineStorage
) -> dg.MaterializeResult:
    settings = storage.settings
    batches = storage.ledger.batches(dataset=REQUEST_DATASET, status="validated")
    # The newest batches: after a retraining the reference follows the data it trained on.
    chosen = sorted(batches, key=lambda b: b.received_at)[-config.max_batches :]
    files = [settings.validated_file(REQUEST_DATASET, b.batch_id) for b in chosen]
    if not files:
        raise dg.Failure(
            f"no validated {REQUEST_DATASET} batches yet to build a reference profile from"
        )
    frame = drift.drift_frame(REQUEST_DATASET, pl.read_parquet([uri(f) for f in files]))
    profile = drift.build_profile(frame, *drift_columns(REQUEST_DATASET))
    path = profile.save(settings.reference_profile_path(REQUEST_DATASET))
    context.log.info(f"reference profile from {len(files)} batches, {frame.height} rows")
    return dg.MaterializeResult(
        metadata={
            "batches": len(files),
            "rows": frame.height,
            "path": dg.MetadataValue.path(str(path)),
            "profile": dg.MetadataValue.json(profile.to_dict(include_sample=False)),
        }
    )


RAW_ASSETS = [_raw_asset(ds) for ds in datasets()]
VALIDATED_ASSETS = [_validated_asset(ds) for ds in datasets()]

INGEST_JOBS = {
    ds: dg.define_asset_job(
        f"ingest_{ds}",
        selection=dg.AssetSelection.assets(f"raw_{ds}", f"validated_{ds}"),
        partitions_def=PARTITIONS[ds],
        executor_def=dg.in_process_executor,  # two small steps: a process each costs more
        description=f"Store and validate one landed {ds} batch.",
    )
    for ds in datasets()
}
reference_profile_job = dg.define_asset_job(
    "reference_profile_job", selection=dg.AssetSelection.assets(reference_profile)
)


@dg.sensor(
    jobs=[*INGEST_JOBS.values(), reference_profile_job],
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the landing folder: one dynamic partition and one run per new batch.",
)
def landing_sensor(context: dg.SensorEvaluationContext, storage: LooplineStorage):
    settings, ledger = storage.settings, storage.ledger
    requests: list[dg.RunRequest] = []
    new_keys: dict[str, list[str]] = {}
    for landed in scan_landing(settings.landing):
        if landed.problem:
            ledger.receive(landed.batch_id, landed.dataset or "unknown", landed.path)
            _quarantine(
                settings, ledger, landed.dataset, landed.batch_id, landed.path, [landed.problem]
            )
            landed.path.unlink()
            context.log.warning(f"{landed.path.name}: {landed.problem}")
            continue
        existing = ledger.get(landed.batch_id)
        if existing is not None and existing.source_path != str(landed.path):
            ledger.receive(landed.batch_id, landed.dataset, landed.path)  # logs the duplicate
            dup = settings.archive / "duplicates" / f"{landed.batch_id}__{landed.path.name}"
            dup.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(landed.path, dup)
            context.log.info(f"{landed.path.name} is a re-landed copy of batch {landed.batch_id}")
            continue
        if existing is None:
            ledger.receive(landed.batch_id, landed.dataset, landed.path)
        # Still in the landing folder: not yet stored. Requesting again is safe (the run key
        # dedupes) and recovers a tick whose requests were lost after the ledger recorded them.
        request = _ingest_request(context, settings, ledger, landed.dataset, landed.batch_id)
        if request is not None:
            new_keys.setdefault(landed.dataset, []).append(landed.batch_id)
            requests.append(request)
    # Stored but not validated, its run failed after the landed file was archived.
    for record in ledger.batches(status="stored"):
        request = _ingest_request(
            context, settings, ledger, record.dataset, record.batch_id, retry_only=True
        )
        if request is not None:
            requests.append(request)
    if not settings.reference_profile_path(REQUEST_DATASET).exists():
        validated = ledger.batches(dataset=REQUEST_DATASET, status="validated")
        if len(validated) >= REFERENCE_MIN_BATCHES:
            requests.append(
                dg.RunRequest(run_key="reference-bootstrap", job_name=reference_profile_job.name)
            )
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[
            PARTITIONS[ds].build_add_request(keys) for ds, keys in new_keys.items()
        ],
    )


def _ingest_request(
    context: dg.SensorEvaluationContext,
    settings: Settings,
    ledger: BatchLedger,
    dataset: str,
    batch_id: str,
    *,
    retry_only: bool = False,
) -> dg.RunRequest | None:
    """The ingest run of a batch: the first, or a retry after failed runs (a new run key,
    since Dagster launches a run key once); None while one is in flight or, after
    MAX_INGEST_RUNS failures, once the batch is quarantined with the last error."""
    runs = context.instance.get_runs(filters=dg.RunsFilter(tags={BATCH_TAG: batch_id}))
    in_flight = any(not r.is_finished for r in runs)
    failed = [r for r in runs if r.status == dg.DagsterRunStatus.FAILURE]  # newest first
    if retry_only and (in_flight or not failed):
        return None
    record = ledger.get(batch_id)
    if record is None:
        return None
    if len(failed) >= MAX_INGEST_RUNS and not in_flight:
        source = _source_of(settings, record)
        reason = f"ingest failed in {len(failed)} runs; last error: {_failure(context, failed[0])}"
        _quarantine(settings, ledger, dataset, batch_id, source, [reason], _rows(source, dataset))
        _archive(settings, dataset, batch_id, source)
        context.log.warning(f"batch {batch_id} quarantined: {reason}")
        return None
    suffix = f"-attempt{len(failed) + 1}" if failed else ""
    return dg.RunRequest(
        run_key=f"{dataset}-{batch_id}{suffix}",
        job_name=INGEST_JOBS[dataset].name,
        partition_key=batch_id,
        tags={
            "loopline/dataset": dataset,
            "loopline/source": record.source_name,
            BATCH_TAG: batch_id,
        },
    )


def _rows(source: Path, dataset: str) -> int | None:
    """Rows of a batch given up on, so the ledger still reconciles (None when unreadable)."""
    try:
        return read_batch(source, dataset).height
    except UnreadableBatch:
        return None


def _failure(context: dg.SensorEvaluationContext, run: dg.DagsterRun) -> str:
    """The error message of a failed run's failed step (the run id when there is none)."""
    records = context.instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE
    ).records
    for record in reversed(records):
        event = record.event_log_entry.dagster_event
        error = event.step_failure_data.error if event and event.step_failure_data else None
        while error is not None and error.cause is not None:
            error = error.cause  # Dagster wraps the step's own exception
        if error is not None:
            return error.message.strip()
    return f"run {run.run_id} failed"


defs = dg.Definitions(
    assets=[*RAW_ASSETS, *VALIDATED_ASSETS, reference_profile],
    jobs=[*INGEST_JOBS.values(), reference_profile_job],
    sensors=[landing_sensor],
)
