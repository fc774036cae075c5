"""Serving assets: the model archive, progressive delivery to TorchServe, batch predictions.

registered_model -> model_archive (.mar of that version) -> deployment (register non-default,
smoke, shadow replay, set-default, watch, rollback: ``serving.delivery``). TorchServe is a
resource: the deployment starts it when it is not running, with the registry's champion. A
version whose FeatureService has no fresh online rows is refused before TorchServe changes.
``served_champion`` makes TorchServe serve the registry's champion (``serving.reconciler``);
``reconcile_sensor`` runs it when the two disagree or a release is left pending.
"""

from datetime import datetime
from pathlib import Path

import dagster as dg
import polars as pl

from core.db import exists
from core.storage import uri, write_parquet_atomic
from core.usecase import active
from models.registry import CHAMPION, Registry
from orchestration import alerts
from orchestration.ingest_assets import _md_table
from orchestration.resources import LooplineStorage, lane, run_in_flight
from serving.client import NotRunning, TorchServeClient
from serving.config import ServingConfig
from serving.delivery import DeliveryPolicy, deliver, logged_requests
from serving.prediction_log import ReadStats
from serving.process import TorchServeProcess
from serving.reconciler import from_model_store, out_of_sync, reconcile
from serving.requests import request_bodies

GROUP = "serving"


class TorchServeResource(dg.ConfigurableResource):
    """The TorchServe instance of a Loopline home (loopback, token auth on)."""

    home: str = ""
    # 0: the settings' (LOOPLINE_SERVING_PORTS, default 8080, 8081, 8082).
    inference_port: int = 0
    management_port: int = 0
    metrics_port: int = 0
    workers_per_model: int = 0  # 0: the profile's (LOOPLINE_SERVING_WORKERS; local 1, scale 2)
    batch_size: int = 32
    max_batch_delay_ms: int = 5

    def serving_config(self, storage: LooplineStorage) -> ServingConfig:
        settings = storage.settings
        ports = {
            name: port
            for name, port in (
                ("inference_port", self.inference_port),
                ("management_port", self.management_port),
                ("metrics_port", self.metrics_port),
            )
            if port
        }
        return ServingConfig.for_settings(
            settings,
            **ports,
            workers_per_model=self.workers_per_model or settings.serving_workers,
            batch_size=self.batch_size,
            max_batch_delay_ms=self.max_batch_delay_ms,
        )

    def process(self, storage: LooplineStorage) -> TorchServeProcess:
        return TorchServeProcess.attach(
            self.serving_config(storage), storage.settings.registry_location
        )

    def ensure_running(self, storage: LooplineStorage, log=None) -> TorchServeClient:
        """A client of the running instance; starts one (champion registered) if none runs."""
        process = self.process(storage)
        status = process.status()
        if not status.running:
            if log:
                log(f"starting TorchServe on {process.config.inference_url}")
            process.start()
        elif not status.healthy:
            raise dg.Failure(f"TorchServe runs (pid {status.pid}) but is not healthy")
        return process.client()


class DeploymentConfig(dg.Config):
    """Bounds for the shadow comparison and the post-promotion watch (serving.delivery's
    DeliveryPolicy, whose defaults these are: each check is a test at ``alpha``)."""

    smoke_requests: int = DeliveryPolicy.smoke_requests
    replay_requests: int = DeliveryPolicy.replay_requests
    alpha: float = DeliveryPolicy.alpha
    min_samples: int = DeliveryPolicy.min_samples
    max_error_rate: float = DeliveryPolicy.max_error_rate
    max_p95_latency_ms: float = DeliveryPolicy.max_p95_latency_ms
    max_latency_ratio: float = DeliveryPolicy.max_latency_ratio
    min_latency_gap_ms: float = DeliveryPolicy.min_latency_gap_ms
    min_score_ks: float = DeliveryPolicy.min_score_ks
    max_flag_rate_change: float = DeliveryPolicy.max_flag_rate_change
    max_mean_change: float = DeliveryPolicy.max_mean_change
    watch_requests: int = DeliveryPolicy.watch_requests
    watch_seconds: float = DeliveryPolicy.watch_seconds
    watch_max_error_rate: float = DeliveryPolicy.watch_max_error_rate
    watch_max_p95_latency_ms: float = DeliveryPolicy.watch_max_p95_latency_ms
    alert_webhook_url: str = ""

    def policy(self) -> DeliveryPolicy:
        fields = self.model_dump()
        fields.pop("alert_webhook_url")
        return DeliveryPolicy(**fields)


@dg.asset(group_name=GROUP, kinds={"torchserve"})
def model_archive(
    context: dg.AssetExecutionContext,
    storage: LooplineStorage,
    torchserve: TorchServeResource,
    registered_model: str,
) -> dg.Output[dict]:
    """The registered version as a TorchServe .mar: model, handler and serving metadata."""
    from serving.archive import archive_version, read_manifest

    registry = Registry.for_settings(storage.settings)
    config = torchserve.serving_config(storage)
    mar = archive_version(registry, registered_model, config)
    manifest = read_manifest(mar)
    context.log.info(f"archived {registered_model} as {mar}")
    return dg.Output(
        {"version": registered_model, "mar": str(mar)},
        metadata={
            "version": registered_model,
            "path": dg.MetadataValue.path(str(mar)),
            "size_bytes": mar.stat().st_size,
            "serving": dg.MetadataValue.json(manifest["serving"]),
        },
    )


def replay_requests(
    storage: LooplineStorage, config: ServingConfig, limit: int, stats: ReadStats | None = None
) -> tuple[list[dict], str]:
    """Recent real requests from the prediction log (torn lines counted in ``stats``);
    recent rows of the request dataset if none."""
    uc = active()
    recent = logged_requests(config.prediction_log_dir, limit, stats)
    if recent:
        return recent, "prediction log"
    dataset = uc.request.dataset
    folder = storage.settings.validated / dataset
    files = sorted(folder.glob("*.parquet"), key=lambda p: p.stat().st_mtime)[-3:]
    if not files:
        raise dg.Failure(f"no logged requests and no validated {dataset} to replay")
    time = uc.request_dataset.event_time
    frame = pl.read_parquet([uri(f) for f in files])
    frame = (frame.sort(time) if time else frame).tail(limit)
    return request_bodies(frame), f"validated {dataset}"


def newest_validated_event_time(storage: LooplineStorage) -> datetime | None:
    """The newest event time among the validated rows of the request dataset (None: none)."""
    uc = active()
    time = uc.request_dataset.event_time
    files = sorted((storage.settings.validated / uc.request.dataset).glob("*.parquet"))
    if not files or time is None:
        return None
    newest = pl.scan_parquet([uri(f) for f in files]).select(pl.col(time).max())
    return newest.collect().item()


def stale_online_features(
    storage: LooplineStorage, feature_service: str, log: "dg.DagsterLogManager"
) -> list[str]:
    """Reasons the online store cannot serve ``feature_service`` (empty: it can, or unknown).

    Unknown (an online store other than SQLite, or no validated requests) is logged as a
    warning and does not block: the check cannot be made, it has not failed.
    """
    from features.store import online_newest_event_times
    from serving.delivery import online_freshness_reasons

    dataset = active().request.dataset
    views = online_newest_event_times(storage.feature_store(), feature_service)
    reference = newest_validated_event_time(storage)
    if views is None or reference is None:
        log.warning(
            "cannot check the online store's freshness for "
            f"{feature_service} ({'not SQLite' if views is None else f'no validated {dataset}'})"
            "; delivery goes on without that check"
        )
        return []
    for view, (newest, ttl) in views.items():
        log.info(f"online {view}: newest row {newest}, TTL {ttl}, newest request {reference}")
    return online_freshness_reasons(views, reference)


@dg.asset(group_name=GROUP, kinds={"torchserve"})
def deployment(
    context: dg.AssetExecutionContext,
    config: DeploymentConfig,
    storage: LooplineStorage,
    torchserve: TorchServeResource,
    model_archive: dict,
) -> dg.Output[dict]:
    """Progressive delivery: smoke test, shadow replay, promotion, watch, rollback on breach."""
    version = model_archive["version"]
    registry = Registry.for_settings(storage.settings)
    client = torchserve.ensure_running(storage, log=context.log.info)
    serving_config = torchserve.serving_config(storage)
    read = ReadStats()
    replay, source = replay_requests(storage, serving_config, config.replay_requests, read)
    context.log.info(f"replaying {len(replay)} requests from the {source}")
    if read.torn_lines:
        context.log.warning(f"{read.torn_lines} torn prediction-log lines skipped in the replay")
    stale = stale_online_features(storage, registry.get(version).feature_service, context.log)
    report = deliver(
        client,
        registry,
        version,
        replay,
        config.policy(),
        stale_features=stale,
        archive=from_model_store(registry, serving_config),
        log=context.log.info,
    )
    webhook = config.alert_webhook_url or None
    if report.outcome == "rejected":
        alerts.send(
            alerts.Alert(
                "challenger_rejected", f"{version} rejected at deployment", report.to_dict()
            ),
            webhook,
        )
    elif report.outcome == "refused":
        alerts.send(
            alerts.Alert(
                "release_refused", f"{version} not deployed: {report.reasons[0]}", report.to_dict()
            ),
            webhook,
        )
    elif report.outcome == "deferred":
        alerts.send(
            alerts.Alert(
                "availability",
                f"{version} not deployed yet: {report.reasons[0]}",
                report.to_dict(),
            ),
            webhook,
        )
    elif report.outcome == "rolled_back":
        alerts.send(
            alerts.Alert(
                "rollback", f"{version} rolled back to {report.previous}", report.to_dict()
            ),
            webhook,
        )
    elif report.reasons:  # promoted; the watch saw too few requests to tell
        context.log.warning("; ".join(report.reasons))
    steps = [
        {"step": s["step"], "passed": s["passed"], "reasons": "; ".join(s.get("reasons", []))}
        for s in report.steps
    ]
    return dg.Output(
        report.to_dict(),
        metadata={
            "version": version,
            "outcome": report.outcome,
            "previous": report.previous or "none",
            "serving": registry.get_alias(CHAMPION) or "none",
            "replay_source": source,
            "replay_torn_lines": read.torn_lines,
            "steps": dg.MetadataValue.md(_md_table(steps)),
            "reasons": "\n".join(report.reasons) or "none",
            "report": dg.MetadataValue.json(report.to_dict()),
        },
    )


class BatchPredictionsConfig(dg.Config):
    """A parquet/CSV file of requests to score; empty: the request dataset's newest
    validated batch."""

    path: str = ""
    source: str = "online"


@dg.asset(group_name=GROUP, kinds={"polars", "parquet"}, deps=["deployment"])
def batch_predictions(
    context: dg.AssetExecutionContext, config: BatchPredictionsConfig, storage: LooplineStorage
) -> dg.MaterializeResult:
    """A file of requests scored by the champion through the endpoint's features and model."""
    from serving.batch import score_version

    settings = storage.settings
    registry = Registry.for_settings(settings)
    version = registry.get_alias(CHAMPION)
    if version is None:
        raise dg.Failure("there is no champion to score with")
    if config.path:
        source = Path(config.path)
        frame = (
            pl.read_csv(source, try_parse_dates=True)
            if source.suffix == ".csv"
            else pl.read_parquet(source)
        )
    else:
        dataset = active().request.dataset
        files = sorted(
            (settings.validated / dataset).glob("*.parquet"), key=lambda p: p.stat().st_mtime
        )
        if not files:
            raise dg.Failure(f"no validated {dataset} batch to score")
        source = files[-1]
        frame = pl.read_parquet(uri(source))
    scored = score_version(registry, version, settings.home, frame, source=config.source)
    out = settings.home / "batch_predictions" / f"{source.stem}-{version}.parquet"

    write_parquet_atomic(scored, out)
    task = active().task
    context.log.info(f"scored {scored.height} rows of {source.name} with {version}")
    return dg.MaterializeResult(
        metadata={
            "rows": scored.height,
            "model_version": version,
            "input": dg.MetadataValue.path(str(source)),
            "path": dg.MetadataValue.path(str(out)),
            f"mean_{task.score}": float(scored[task.score].mean() or 0.0),
            f"decided_{task.decision.positive}": int(
                (scored["decision"] == task.decision.positive).sum()
            ),
        }
    )


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Renews TorchServe's keys when half of their lifetime is left.",
)
def torchserve_keys_sensor(
    context: dg.SensorEvaluationContext, storage: LooplineStorage, torchserve: TorchServeResource
):
    from serving.keys import renew_keys_if_due

    try:
        status = renew_keys_if_due(torchserve.process(storage).config)
    except NotRunning:
        return dg.SkipReason("TorchServe is not running")
    if status.renewed:
        context.log.info(status.describe())
    return dg.SkipReason(status.describe())


@dg.asset(group_name=GROUP, kinds={"torchserve"})
def served_champion(
    context: dg.AssetExecutionContext, storage: LooplineStorage, torchserve: TorchServeResource
) -> dg.MaterializeResult:
    """TorchServe's default version made the registry's champion; pending releases confirmed."""
    settings = storage.settings
    process = torchserve.process(storage)
    has_registry = exists(settings.registry_location)
    if not has_registry or not process.status().healthy:
        why = "no registry" if not has_registry else "TorchServe is not up"
        context.log.info(f"{why}: nothing to reconcile (a start serves the champion)")
        return dg.MaterializeResult(metadata={"changed": False, "skipped": why})
    registry = Registry.for_settings(settings)
    result = reconcile(registry, process.client(), from_model_store(registry, process.config))
    context.log.info(result.summary())
    if result.drift:
        alerts.send(
            alerts.Alert(
                "serving_drift",
                f"TorchServe served {result.served_before}, not the champion {result.champion}; "
                "put back",
                result.to_dict(),
            )
        )
    return dg.MaterializeResult(
        metadata={
            "champion": result.champion or "none",
            "served_before": result.served_before or "none",
            "served": result.served or "none",
            "changed": result.changed,
            "drift": result.drift,
            "actions": "\n".join(result.actions) or "none",
            "confirmed_releases": dg.MetadataValue.json(result.confirmed),
        }
    )


reconcile_job = dg.define_asset_job(
    "reconcile_serving",
    selection=dg.AssetSelection.assets(served_champion),
    executor_def=dg.in_process_executor,
    # The training pool: one run at a time with the deployments that also move the champion.
    tags=lane("training"),
    description="Make TorchServe serve the registry's champion and confirm pending releases.",
)


@dg.sensor(
    job=reconcile_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Reconciles serving when TorchServe's default is not the registry's champion "
    "or a promotion or rollback was left unconfirmed.",
)
def reconcile_sensor(
    context: dg.SensorEvaluationContext, storage: LooplineStorage, torchserve: TorchServeResource
):
    settings = storage.settings
    if not exists(settings.registry_location):
        return dg.SkipReason("no model registry yet")
    process = torchserve.process(storage)
    if not process.status().healthy:
        return dg.SkipReason("TorchServe is not up and healthy: its start serves the champion")
    why = out_of_sync(Registry.for_settings(settings), process.client(timeout=5.0))
    if why is None:
        return dg.SkipReason("TorchServe serves the registry's champion")
    if run_in_flight(context.instance, reconcile_job.name):
        return dg.SkipReason(f"{why}; a reconcile run is already queued")
    context.log.info(why)
    return dg.RunRequest(tags={"loopline/reconcile": why[:200]})


defs = dg.Definitions(
    assets=[model_archive, deployment, batch_predictions, served_champion],
    jobs=[reconcile_job],
    sensors=[torchserve_keys_sensor, reconcile_sensor],
    resources={"torchserve": TorchServeResource()},
)
