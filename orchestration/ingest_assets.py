"""Ingest and validate: landing folder -> raw batches -> validated batches (or quarantine).

One dynamic partition per landed batch, keyed by the landed file's identity (its name and
metadata: the sensor reads no file body); the ingest run recognises the same bytes landed twice.
"""

import hashlib
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl

from core.settings import Settings
from core.storage import uri
from core.usecase import active
from orchestration.resources import LooplineStorage, lane
from quality import contracts, drift
from quality.ingest import (
    LandedFile,
    UnreadableBatch,
    content_id,
    quarantine,
    read_batch,
    scan_landing,
    store_batch,
)
from quality.ledger import FINAL, BatchLedger, BatchRecord
from quality.schema import datasets, drift_columns, time_columns

PSI_WARN = 0.2
SKEW_MIN_ROWS = 200  # fewer rows say more about sampling noise than about the data
REFERENCE_MIN_BATCHES = 4
# An ingest run that fails (a write error, a crash) is launched again under a new run key, up
# to this many runs in all; then the batch is quarantined with the last error.
MAX_INGEST_RUNS = 3
# At most this many runs' worth of new files taken per sensor tick, so that a flood of files
# is taken over several ticks, each well within the sensor's time limit.
RUNS_PER_TICK = 10
BATCH_TAG = "loopline/batch"  # on a run of one batch
REQUEST_TAG = "loopline/request"  # the run key a run was asked under (the ledger keeps it)

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
    source: Path | None,
    reasons: list[str],
    rows: int | None = None,
    *,
    move: bool = False,
) -> str:
    """Keep the file (moved, or copied) and its reasons in quarantine and record the outcome
    in the ledger."""
    where = quarantine(
        settings.quarantine,
        batch_id=batch_id,
        dataset=dataset,
        source=source,
        reasons=reasons,
        move=move,
    )
    ledger.mark(batch_id, "quarantined", rows=rows, reason="; ".join(reasons))
    return str(where)


@dataclass
class Step:
    """What storing or validating one batch produced: the asset's materialization metadata,
    its check results, and whether the batch goes on (False once it is quarantined)."""

    metadata: dict
    checks: list[dg.AssetCheckResult]
    ok: bool


def store_raw(settings: Settings, ledger: BatchLedger, dataset: str, batch_id: str, log) -> Step:
    """Keep a landed batch as an immutable parquet file (or quarantine it, unreadable; or
    recognise it as the same bytes as a batch already taken)."""
    record = ledger.get(batch_id)
    if record is None:
        raise dg.Failure(f"batch {batch_id} is not in the ledger; land files via the sensor")
    dest = settings.raw_file(dataset, batch_id)
    source = _source_of(settings, record)
    if dest.exists():
        df = pl.read_parquet(uri(dest))  # re-run of a stored batch: its landed file not needed
    else:
        if source is None:
            raise dg.Failure(
                f"batch {batch_id}: source file {record.source_path} is gone and not archived"
            )
        owner = ledger.claim_content(batch_id, content_id(source))
        if owner != batch_id:
            return _duplicate(settings, ledger, record, owner, source, log)
        try:
            df = read_batch(source, dataset)
        except UnreadableBatch as exc:
            where = _quarantine(settings, ledger, dataset, batch_id, source, [str(exc)])
            _archive(settings, record, source)
            log.warning(f"batch {batch_id} quarantined: {exc}")
            return Step(
                {"status": "quarantined", "reason": str(exc), "quarantine": where},
                [
                    dg.AssetCheckResult(
                        check_name="readable", passed=False, metadata={"reason": str(exc)}
                    )
                ],
                ok=False,
            )
        ledger.count(batch_id, df.height)
        store_batch(df, dest)
    ledger.mark(batch_id, "stored", rows=df.height)
    if source is not None:
        _archive(settings, record, source)
    return Step(
        {
            "status": "stored",
            "rows": df.height,
            "columns": ", ".join(df.columns),
            "source": record.source_name,
            "path": dg.MetadataValue.path(uri(dest)),
        },
        [dg.AssetCheckResult(check_name="readable", passed=True)],
        ok=True,
    )


def _duplicate(
    settings: Settings, ledger: BatchLedger, record: BatchRecord, owner: str, source: Path, log
) -> Step:
    """The same bytes as batch ``owner``, landed again: kept aside, never counted twice."""
    first = ledger.get(owner)
    reason = f"the same bytes as batch {owner} ({first.source_name if first else 'unknown'})"
    _move(source, _duplicate_path(settings, record))
    ledger.note(owner, "duplicate", record.source_path)
    ledger.mark(record.batch_id, "duplicate", reason=reason)
    log.info(f"{record.source_name} is {reason}")
    meta = {"status": "duplicate", "duplicate_of": owner, "source": record.source_name}
    return Step(meta, [dg.AssetCheckResult(check_name="readable", passed=True)], ok=False)


def _duplicate_path(settings: Settings, record: BatchRecord) -> Path:
    return settings.archive / "duplicates" / f"{record.batch_id}__{record.source_name}"


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
        step = store_raw(
            storage.settings, storage.ledger, dataset, context.partition_key, context.log
        )
        yield dg.MaterializeResult(metadata=step.metadata)
        yield from step.checks

    return raw


def _source_of(settings: Settings, record: BatchRecord) -> Path | None:
    """Where a batch's landed file is now: still landed, archived, or None (gone)."""
    landed = Path(record.source_path)
    if landed.exists():
        return landed
    archived = _archived_path(settings, record)
    return archived if archived.exists() else None


def _archived_path(settings: Settings, record: BatchRecord) -> Path:
    return settings.archive / record.dataset / f"{record.batch_id}__{record.source_name}"


def _archive(settings: Settings, record: BatchRecord, source: Path) -> None:
    """Move the landed original out of the landing folder, keeping it (nothing is deleted);
    a file already in the archive stays where it is."""
    target = _archived_path(settings, record)
    if source != target and source.exists():
        _move(source, target)


def _move(source: Path, target: Path) -> None:
    """A rename within the home (no read, however large the file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source, target)


def validate(settings: Settings, ledger: BatchLedger, dataset: str, batch_id: str, log) -> Step:
    """Run a stored batch's soda contract: validated (with its skew against the reference
    profile) or quarantined with the contract's reasons."""
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
    profiled = any(drift_columns(dataset))
    if not result.passed:
        kind = "schema skew" if result.schema_skew else "contract violation"
        where = _quarantine(settings, ledger, dataset, batch_id, raw_path, result.reasons, rows)
        log.warning(f"batch {batch_id} quarantined ({kind}): {result.reasons}")
        checks = [
            dg.AssetCheckResult(
                check_name="contract",
                passed=False,
                metadata={**contract_meta, "skew": kind},
                description=f"{kind}: " + "; ".join(result.reasons),
            )
        ]
        if profiled:
            checks.append(
                dg.AssetCheckResult(
                    check_name="distribution_skew",
                    passed=True,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"compared": False, "why": "batch quarantined"},
                )
            )
        meta = {"status": "quarantined", "skew": kind, "quarantine": where, "rows": rows}
        return Step(meta, checks, ok=False)

    dest = settings.validated_file(dataset, batch_id)
    if not dest.exists():
        store_batch(pl.read_parquet(uri(raw_path)), dest)
    ledger.mark(batch_id, "validated", rows=rows)
    meta = {
        "status": "validated",
        "batch": batch_id,
        "rows": rows,
        "path": dg.MetadataValue.path(uri(dest)),
    }
    skew = _skew_check(settings, dataset, dest) if profiled else None
    if skew is not None and skew.metadata["compared"].value:
        # On the materialization too, where the retraining sensor reads the value skew.
        meta["max_psi"] = skew.metadata["max_psi"]
        meta["psi"] = dg.MetadataValue.json(
            {f["feature"]: f["psi"] for f in skew.metadata["drift"].value["features"]}
        )
    checks = [dg.AssetCheckResult(check_name="contract", passed=True, metadata=contract_meta)]
    return Step(meta, checks + ([skew] if skew is not None else []), ok=True)


def _validated_asset(dataset: str) -> dg.AssetsDefinition:
    name = f"validated_{dataset}"
    checks = [dg.AssetCheckSpec("contract", asset=name, blocking=True)]
    if any(drift_columns(dataset)):
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
        step = validate(
            storage.settings, storage.ledger, dataset, context.partition_key, context.log
        )
        yield dg.MaterializeResult(metadata=step.metadata)
        yield from step.checks

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


class IngestConfig(dg.Config):
    """The landed batches one ingest run stores and validates, in order."""

    batch_ids: list[str] = []


def _ingest_op(dataset: str) -> dg.OpDefinition:
    raw_key, validated_key = dg.AssetKey(f"raw_{dataset}"), dg.AssetKey(f"validated_{dataset}")

    @dg.op(name=op_name(dataset), tags={"kind": "soda"})
    def ingest(context: dg.OpExecutionContext, config: IngestConfig, storage: LooplineStorage):
        """Store and validate each batch as ``raw_<dataset>`` and ``validated_<dataset>`` do for
        one partition, recording each batch's materializations and checks under its partition.
        A batch that fails leaves the others done; the run then fails naming it (its retry is
        a run of its own)."""
        settings, ledger = storage.settings, storage.ledger
        failed: dict[str, str] = {}
        quarantined: dict[str, str] = {}
        for batch_id in config.batch_ids:
            record = ledger.get(batch_id)
            if record is not None and record.status in FINAL:
                context.log.info(f"batch {batch_id} was already {record.status}")
                continue
            try:
                for key, step in _ingest_steps(settings, ledger, dataset, batch_id, context.log):
                    if step.metadata["status"] == "duplicate":
                        continue  # nothing stored: the batch it repeats holds these rows
                    context.log_event(
                        dg.AssetMaterialization(key, partition=batch_id, metadata=step.metadata)
                    )
                    for check in step.checks:
                        context.log_event(_evaluation(key, batch_id, check))
                    if not step.ok:
                        quarantined[batch_id] = ledger.get(batch_id).reason or "quarantined"
            except Exception as exc:  # the batch stays where it was (landed or stored)
                failed[batch_id] = f"{type(exc).__name__}: {exc}"
                context.log.error(f"batch {batch_id}: {failed[batch_id]}")
        # Red when a batch failed (it is retried) or was quarantined (someone should look), as
        # a run of that one batch was; the batches done beside it stay done.
        if failed or quarantined:
            lines = [f"batch {b}: {e}" for b, e in failed.items()]
            lines += [f"batch {b} quarantined: {r}" for b, r in quarantined.items()]
            raise dg.Failure(
                description="\n".join(lines),
                metadata={
                    "batches": len(config.batch_ids),
                    "failed": len(failed),
                    "quarantined": len(quarantined),
                },
            )

    def _ingest_steps(settings, ledger, dataset, batch_id, log):
        step = store_raw(settings, ledger, dataset, batch_id, log)
        yield raw_key, step
        if step.ok:
            yield validated_key, validate(settings, ledger, dataset, batch_id, log)

    return ingest


def op_name(dataset: str) -> str:
    return f"ingest_{dataset}_batches"


def _evaluation(key: dg.AssetKey, batch_id: str, check: dg.AssetCheckResult):
    return dg.AssetCheckEvaluation(
        asset_key=key,
        check_name=check.check_name,
        passed=check.passed,
        metadata=check.metadata,
        severity=check.severity,
        description=check.description,
        partition=batch_id,
    )


INGEST_OPS = [_ingest_op(ds) for ds in datasets()]


@dg.job(
    name="ingest",
    executor_def=dg.in_process_executor,
    tags=lane("ingest"),
    description="Store and validate the landed batches waiting at a sensor tick: a step per "
    "dataset, each batch its own partition of raw_<dataset> and validated_<dataset>.",
)
def ingest_job():
    for op in INGEST_OPS:
        op()


reference_profile_job = dg.define_asset_job(
    "reference_profile_job", selection=dg.AssetSelection.assets(reference_profile)
)


@dataclass
class Tick:
    """What one landing-sensor tick asks: new partitions, and runs."""

    new_keys: dict[str, list[str]] = field(default_factory=dict)  # dataset -> new batches
    fresh: dict[str, list[str]] = field(default_factory=dict)  # never asked of a run
    asked: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # key -> dataset -> ids
    requests: list[dg.RunRequest] = field(default_factory=list)
    runs: dict[str, dg.DagsterRun | None] = field(default_factory=dict)  # run key -> its run
    received: int = 0  # new files taken this tick


@dg.sensor(
    jobs=[ingest_job, reference_profile_job],
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the landing folder: one dynamic partition per new batch, and one "
    "ingest run for the batches waiting at a tick. It reads no file body (stat calls only).",
)
def landing_sensor(context: dg.SensorEvaluationContext, storage: LooplineStorage):
    settings, ledger = storage.settings, storage.ledger
    tick = Tick()
    landed = scan_landing(settings.landing, settings.max_landing_bytes)
    for f in _settled(settings, ledger, landed):
        _guarded(context, ledger, tick, f.batch_id, f.path.name, _take, settings, ledger, f)
    # Stored but not validated, its run failed after the landed file was archived; or
    # received, and its landed file gone since: retried, then given up on.
    here = {f.batch_id for f in landed}
    waiting = ledger.batches(status="stored") + ledger.batches(status="received")
    for r in (r for r in waiting if r.batch_id not in here):
        _guarded(context, ledger, tick, r.batch_id, r.source_name, _retry, settings, ledger, r)
    # Asked before and their run not created yet (a tick whose requests were lost): the same
    # key again, which Dagster launches once.
    for key, batches in tick.asked.items():
        tick.requests.append(_request(key, batches))
    _ask_fresh(settings, ledger, tick)
    if not settings.reference_profile_path(REQUEST_DATASET).exists():
        validated = ledger.batches(dataset=REQUEST_DATASET, status="validated")
        if len(validated) >= REFERENCE_MIN_BATCHES:
            tick.requests.append(
                dg.RunRequest(run_key="reference-bootstrap", job_name=reference_profile_job.name)
            )
    return dg.SensorResult(
        run_requests=tick.requests,
        dynamic_partitions_requests=[
            PARTITIONS[ds].build_add_request(keys) for ds, keys in tick.new_keys.items()
        ],
    )


def _settled(settings: Settings, ledger: BatchLedger, landed: list[LandedFile]) -> list[LandedFile]:
    """The landed files whose size and modification time have not changed for the settle time
    (a file written in place, by scp or SFTP, is visible while it grows)."""
    if settings.landing_settle_s <= 0:
        return landed
    ready = ledger.settled(
        {f.path.name: (f.size, f.mtime_ns) for f in landed},
        settings.landing_settle_s,
        datetime.now(UTC),
    )
    return [f for f in landed if f.path.name in ready]


def _guarded(context, ledger: BatchLedger, tick: Tick, batch_id: str, name: str, step, *args):
    """``step(context, *args, tick)`` for one file or batch; an error is logged and recorded
    against its batch, and the tick goes on with the others (this one is tried next tick)."""
    try:
        step(context, *args, tick)
    except Exception as exc:  # one bad file must not stop the sensor (and all ingestion)
        detail = f"{name}: {type(exc).__name__}: {exc}"
        context.log.error(f"landing sensor: {detail}; left as it is, tried again next tick")
        ledger.note(batch_id, "sensor_error", detail)


def _retry(context, settings: Settings, ledger: BatchLedger, record: BatchRecord, tick: Tick):
    """A batch not in landing any more that is not done: its retry or its end (``_plan``)."""
    _plan(context, settings, ledger, record.dataset, record.batch_id, None, tick)


def _take(
    context: dg.SensorEvaluationContext,
    settings: Settings,
    ledger: BatchLedger,
    landed: LandedFile,
    tick: Tick,
) -> None:
    """A settled landed file: refused (moved to quarantine unread), new (a ledger entry and a
    partition), still waiting for its run, or a finished batch's file left in landing."""
    if landed.problem:
        if ledger.get(landed.batch_id) is None:  # else known from a tick that failed to move it
            ledger.receive(landed.batch_id, landed.dataset or "unknown", landed.path)
        _quarantine(
            settings,
            ledger,
            landed.dataset,
            landed.batch_id,
            landed.path,
            [landed.problem],
            move=True,
        )
        context.log.warning(f"{landed.path.name}: {landed.problem}")
        return
    existing = ledger.get(landed.batch_id)
    if existing is not None and existing.status in FINAL:
        target = (
            _duplicate_path(settings, existing)
            if existing.status == "duplicate"
            else _archived_path(settings, existing)
        )
        _move(landed.path, target)
        ledger.note(
            landed.batch_id, "archived", f"{landed.path} left in landing after {existing.status}"
        )
        context.log.info(f"{landed.path.name}: batch {existing.status}; moved to {target}")
        return
    if existing is None:
        if tick.received >= RUNS_PER_TICK * settings.ingest_max_batches:
            return  # a flood: the next tick takes the next ones (oldest first)
        ledger.receive(landed.batch_id, landed.dataset, landed.path)
        tick.received += 1
        tick.new_keys.setdefault(landed.dataset, []).append(landed.batch_id)
    _plan(context, settings, ledger, landed.dataset, landed.batch_id, tick.fresh, tick)


def _ask_fresh(settings: Settings, ledger: BatchLedger, tick: Tick) -> None:
    """One ingest run per ``ingest_max_batches`` of the batches never asked of a run, once
    the micro-batch window is over."""
    waiting = [(ds, b) for ds, ids in tick.fresh.items() for b in ids]
    window = timedelta(seconds=settings.ingest_window_s)
    if window and waiting:  # read the ledger only when a window is set (default: none)
        oldest = min(ledger.get(b).received_at for _, b in waiting)
        if datetime.now(UTC) - datetime.fromisoformat(oldest) < window:
            return  # the micro-batch window is still open: more may land
    for i in range(0, len(waiting), settings.ingest_max_batches):
        chunk: dict[str, list[str]] = {}
        for ds, b in waiting[i : i + settings.ingest_max_batches]:
            chunk.setdefault(ds, []).append(b)
        key = _run_key(chunk)
        ledger.requested([b for ids in chunk.values() for b in ids], key, attempt=1)
        tick.requests.append(_request(key, chunk))


def _run_key(batches: dict[str, list[str]]) -> str:
    """One batch keeps the key it always had; several share a key naming their digest."""
    ids = [(ds, b) for ds, bs in batches.items() for b in bs]
    if len(ids) == 1:
        return f"{ids[0][0]}-{ids[0][1]}"
    digest = hashlib.sha256("\n".join(b for _, b in ids).encode()).hexdigest()[:16]
    return f"ingest-{digest}-x{len(ids)}"


def _request(run_key: str, batches: dict[str, list[str]]) -> dg.RunRequest:
    """The ingest run of ``batches`` (dataset -> batch ids), under ``run_key``."""
    count = sum(len(ids) for ids in batches.values())
    tags = {
        "loopline/dataset": ",".join(sorted(batches)),
        REQUEST_TAG: run_key,
        "loopline/batches": str(count),
    }
    if count == 1:
        tags[BATCH_TAG] = next(iter(batches.values()))[0]
    return dg.RunRequest(
        run_key=run_key,
        job_name=ingest_job.name,
        run_config={
            "ops": {op_name(ds): {"config": {"batch_ids": ids}} for ds, ids in batches.items()}
        },
        tags=tags,
    )


def _plan(
    context: dg.SensorEvaluationContext,
    settings: Settings,
    ledger: BatchLedger,
    dataset: str,
    batch_id: str,
    fresh: dict[str, list[str]] | None,
    tick: Tick,
) -> None:
    """What a waiting batch needs: its first run (``fresh``, None when only a retry is due),
    its asked run once more while that run does not exist yet, a retry under a new run key
    after its run failed (Dagster launches a run key once), or, after MAX_INGEST_RUNS failed
    runs, quarantine with the last error. Nothing while its run is queued or running."""
    asked_of = ledger.request_of(batch_id)
    if asked_of is None:
        if fresh is not None:
            fresh.setdefault(dataset, []).append(batch_id)
        return
    key, attempt = asked_of
    if key not in tick.runs:  # a run holds up to ingest_max_batches batches: ask once
        found = context.instance.get_runs(filters=dg.RunsFilter(tags={REQUEST_TAG: key}), limit=1)
        tick.runs[key] = found[0] if found else None
    run = tick.runs[key]
    if run is None:
        tick.asked.setdefault(key, {}).setdefault(dataset, []).append(batch_id)
        return
    if run.status != dg.DagsterRunStatus.FAILURE:
        return  # queued or running (or done, and the batch moved on meanwhile)
    error = _failure(context, run, batch_id)
    if attempt >= MAX_INGEST_RUNS:
        _give_up(
            context,
            settings,
            ledger,
            batch_id,
            f"ingest failed in {attempt} runs; last error: {error}",
        )
        return
    retry = f"{dataset}-{batch_id}-attempt{attempt + 1}"
    ledger.requested([batch_id], retry, attempt + 1)
    context.log.info(f"batch {batch_id}: run {run.run_id} failed ({error}); retrying as {retry}")
    tick.requests.append(_request(retry, {dataset: [batch_id]}))


def _give_up(
    context: dg.SensorEvaluationContext,
    settings: Settings,
    ledger: BatchLedger,
    batch_id: str,
    reason: str,
) -> None:
    """Quarantine a batch its runs kept failing on: its landed file moved in (unread), or,
    when that file is gone, the reasons alone. Rows as the run counted them, if it did."""
    record = ledger.get(batch_id)
    source = _source_of(settings, record)
    if source is None:
        reason += "; its landed file is gone (neither in landing nor in the archive)"
    _quarantine(
        settings, ledger, record.dataset, batch_id, source, [reason], record.rows, move=True
    )
    context.log.warning(f"batch {batch_id} quarantined: {reason}")


def _failure(context: dg.SensorEvaluationContext, run: dg.DagsterRun, batch_id: str) -> str:
    """The error of a batch in a failed run: its own line of the run's failure, else the
    message of the run's failed step (the run id when there is none)."""
    records = context.instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE
    ).records
    for record in reversed(records):
        event = record.event_log_entry.dagster_event
        error = event.step_failure_data.error if event and event.step_failure_data else None
        while error is not None and error.cause is not None:
            error = error.cause  # Dagster wraps the step's own exception
        if error is not None:
            message = error.message.strip()
            mine = f"batch {batch_id}: "
            own = [line for line in message.splitlines() if mine in line]
            return own[0].split(mine, 1)[1] if own else message
    return f"run {run.run_id} failed"


defs = dg.Definitions(
    assets=[*RAW_ASSETS, *VALIDATED_ASSETS, reference_profile],
    jobs=[ingest_job, reference_profile_job],
    sensors=[landing_sensor],
)
