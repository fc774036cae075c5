"""Platform health at a glance: disk use per store, TorchServe key expiry, the age of each
sensor's last tick, with an alert when a sensor stops ticking, and releases (promotions,
rollbacks) TorchServe was not yet seen serving: one pending over ``STUCK_RELEASE_S`` marks the
platform not ok.

One report (``health_report``) feeds ``loopline status`` and the Dagster UI. In the UI it is
the ``platform_health`` asset: the ``platform_health_sensor`` evaluates it every 5 minutes and
records it as a materialization (its metadata plots disk use per store over time), with the
``sensors_ticking`` check, when its state changes and hourly (``due``): those records belong to
no run, so no retention removes them. The check fails, and the sensor alerts once per stall,
when a sensor's last tick is older than ``stale_intervals`` of its interval (and at least
``MIN_STALE_S``); a stuck release alerts once as well. Sensors are the
platform's heartbeat: landing, features, monitoring and retraining all start from one, so a
sensor that stops (a code server down, a daemon stuck) stops the loop without failing a run.
A stopped daemon stops this sensor too: ``loopline status`` reads the same report from the
instance, so the operator sees the stall there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from core.settings import Settings
from orchestration import alerts
from orchestration.resources import LooplineStorage
from serving.stores import disk_usage

# Dagster's default sensor interval; a sensor's own interval is recorded with its ticks.
DEFAULT_INTERVAL_S = 30
# A loaded 2-core host delays ticks by tens of seconds: never call a sensor stale sooner.
MIN_STALE_S = 300.0
HEALTH_INTERVAL_S = 300
RECORD_EVERY_S = 3600
# The reconciler confirms a release within a minute or two (its sensor ticks every 60 s): one
# pending longer has TorchServe serving another version than the registry's champion.
STUCK_RELEASE_S = 300.0
ASSET = "platform_health"
CHECK = "sensors_ticking"


@dataclass(frozen=True)
class SensorTick:
    """A running sensor's last tick, as the instance recorded it."""

    name: str
    interval_s: float
    last_tick_at: datetime | None
    last_tick_status: str | None
    age_s: float | None
    stale: bool

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["last_tick_at"] = self.last_tick_at.isoformat() if self.last_tick_at else None
        return out


def is_stale(age_s: float, interval_s: float, stale_intervals: float) -> bool:
    """Whether a last tick ``age_s`` old is older than ``stale_intervals`` of the interval and
    ``MIN_STALE_S``."""
    return age_s > max(stale_intervals * interval_s, MIN_STALE_S)


def sensor_ticks(
    instance: dg.DagsterInstance,
    now: datetime,
    stale_intervals: float,
    declared: Mapping[str, float] | None = None,
    since: datetime | None = None,
) -> list[SensorTick]:
    """Every running sensor's last tick. ``declared`` (name -> interval), the sensors a code
    location declares, limits them to those (a renamed sensor's state stays behind) and adds
    the ones that never ticked: stale once the platform, started at ``since``, has run longer
    than a stall takes (a code location that fails to load ticks no sensor at all)."""
    from dagster._core.definitions.run_request import InstigatorType

    found: dict[str, SensorTick] = {}
    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if not state.is_running or (declared is not None and state.name not in declared):
            continue  # stopped, or no longer in the code
        data = state.instigator_data
        interval = float(
            (declared or {}).get(state.name)
            or getattr(data, "min_interval", None)
            or DEFAULT_INTERVAL_S
        )
        ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
        at = datetime.fromtimestamp(ticks[0].timestamp, UTC) if ticks else None
        age = (now - at).total_seconds() if at else None
        found[state.name] = SensorTick(
            state.name,
            interval,
            at,
            ticks[0].status.value if ticks else None,
            age,
            age is not None and is_stale(age, interval, stale_intervals),
        )
    up_s = (now - since).total_seconds() if since else None
    for name, interval in (declared or {}).items():
        never = up_s is not None and is_stale(up_s, interval, stale_intervals)
        found.setdefault(name, SensorTick(name, float(interval), None, None, None, never))
    return sorted(found.values(), key=lambda t: t.name)


def key_expiry(key_file: Path, now: datetime) -> dict[str, Any] | None:
    """When TorchServe's inference and management keys expire (``key_file.json``, written at
    its start: ``{"inference": {"key": ..., "expiration time": "...Z"}, ...}``); None when no
    TorchServe runs. The earliest decides: every call needs both keys."""
    try:
        data = json.loads(key_file.read_text())
    except FileNotFoundError:
        return None
    expiry = {
        kind: datetime.fromisoformat(_microseconds(data[kind]["expiration time"]))
        for kind in ("inference", "management")
        if "expiration time" in data.get(kind, {})
    }
    if not expiry:
        return None
    first = min(expiry.values())
    return {
        "expires_at": first.isoformat(),
        "expires_in_s": round((first - now).total_seconds(), 1),
        "by_key": {kind: at.isoformat() for kind, at in expiry.items()},
    }


def _microseconds(stamp: str) -> str:
    """TorchServe writes nanoseconds; ``fromisoformat`` reads at most microseconds."""
    head, dot, rest = stamp.partition(".")
    if not dot:
        return stamp
    digits = rest.rstrip("Z")
    return f"{head}.{digits[:6]}{rest[len(digits) :]}"


def pending_releases(settings: Settings, now: datetime) -> list[dict[str, Any]]:
    """Champion moves TorchServe was not yet seen serving, oldest first, each with its age and
    whether it is ``stuck`` (pending longer than ``STUCK_RELEASE_S``)."""
    from core.db import exists
    from models.registry import Registry

    if not exists(settings.registry_location):
        return []
    out = []
    for release in Registry.for_settings(settings).releases(pending=True):
        age = (now - datetime.fromisoformat(release.at)).total_seconds()
        out.append(
            {
                "id": release.id,
                "kind": release.kind,
                "from_version": release.from_version,
                "to_version": release.to_version,
                "at": release.at,
                "age_s": round(age, 1),
                "stuck": age > STUCK_RELEASE_S,
            }
        )
    return out


def overrides(settings: Settings, limit: int = 5) -> list[dict[str, Any]]:
    """The newest forced promotions (versions made champion past the gate), oldest first:
    when, which version, the person's reason and what the gate had said."""
    from core.db import exists
    from models.registry import Registry

    if not exists(settings.registry_location):
        return []
    return [
        {"at": e.at, "version": e.version, "reason": e.reason, "overrode": e.reasons[0]}
        for e in Registry.for_settings(settings).overrides()[-limit:]
    ]


def health_report(
    settings: Settings,
    instance: dg.DagsterInstance | None,
    now: datetime | None = None,
    declared: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Disk bytes per store, key expiry, sensor ticks (none without an ``instance``) and
    pending releases; ``ok`` is False when a sensor is stale, the keys have expired or a
    release is stuck."""
    now = now or datetime.now(UTC)
    ticks = (
        sensor_ticks(
            instance, now, settings.health_stale_intervals, declared, platform_started(settings)
        )
        if instance is not None
        else []
    )
    keys = key_expiry(settings.serving_dir / "key_file.json", now)
    stale = [t.name for t in ticks if t.stale]
    expired = keys is not None and keys["expires_in_s"] <= 0
    releases = pending_releases(settings, now)
    stuck = [r["to_version"] for r in releases if r["stuck"]]
    return {
        "at": now.isoformat(),
        "ok": not stale and not expired and not stuck,
        "disk_bytes": {name: usage["bytes"] for name, usage in disk_usage(settings).items()},
        "keys": keys,
        "sensors": [t.to_dict() for t in ticks],
        "stale_sensors": stale,
        "pending_releases": releases,
        "stuck_releases": stuck,
        "overrides": overrides(settings),
    }


def platform_started(settings: Settings) -> datetime | None:
    """When `loopline run` last started: it writes the instance's dagster.yaml then."""
    path = settings.dagster_home / "dagster.yaml"
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except FileNotFoundError:
        return None


def local_instance(settings: Settings) -> dg.DagsterInstance | None:
    """The home's Dagster instance, None before the first `loopline run` wrote its config."""
    if not (settings.dagster_home / "dagster.yaml").exists():
        return None
    return dg.DagsterInstance.from_config(str(settings.dagster_home))


def declared_sensors(repository: dg.RepositoryDefinition | None) -> dict[str, float] | None:
    """The sensors of a code location that run by default, with their intervals; None when
    the code location is not known (then every sensor the instance knows counts)."""
    if repository is None:
        return None
    return {
        s.name: float(s.minimum_interval_seconds or DEFAULT_INTERVAL_S)
        for s in repository.sensor_defs
        if s.default_status == dg.DefaultSensorStatus.RUNNING
    }


def _metadata(report: dict[str, Any]) -> dict[str, Any]:
    """The report as UI metadata: numbers plot over time on the asset's page."""
    meta: dict[str, Any] = {
        f"disk_bytes/{store}": dg.MetadataValue.int(size)
        for store, size in report["disk_bytes"].items()
    }
    meta["disk_bytes/total"] = dg.MetadataValue.int(sum(report["disk_bytes"].values()))
    if report["keys"]:
        meta["key_expires_in_hours"] = round(report["keys"]["expires_in_s"] / 3600, 2)
        meta["key_expires_at"] = report["keys"]["expires_at"]
    for tick in report["sensors"]:
        age = tick["age_s"]
        meta[f"sensor_age_s/{tick['name']}"] = -1.0 if age is None else round(age, 1)
    meta["stale_sensors"] = ", ".join(report["stale_sensors"]) or "none"
    meta["pending_releases"] = len(report["pending_releases"])
    meta["stuck_releases"] = ", ".join(report["stuck_releases"]) or "none"
    meta["overrides"] = dg.MetadataValue.md(
        "\n".join(f"- {override_line(o)}" for o in report["overrides"]) or "none"
    )
    return meta


def override_line(override: dict[str, Any]) -> str:
    """One forced promotion, as a person reads it."""
    return (
        f"{override['at'][:19]} {override['version']} forced to champion: {override['reason']} "
        f"(the gate had said: {override['overrode']})"
    )


def release_line(release: dict[str, Any]) -> str:
    """One pending release, as a person reads it."""
    source = f" (from {release['from_version']})" if release["from_version"] else ""
    stuck = ", STUCK: TorchServe does not serve it" if release["stuck"] else ""
    return (
        f"{release['kind']} to {release['to_version']}{source} pending "
        f"{release['age_s'] / 60:.0f} min{stuck}"
    )


def _check(report: dict[str, Any]) -> dg.AssetCheckEvaluation:
    stale = report["stale_sensors"]
    return dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey(ASSET),
        check_name=CHECK,
        passed=not stale,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"stale: {', '.join(stale)}" if stale else "every sensor ticks",
        metadata={t["name"]: dg.MetadataValue.text(tick_line(t)) for t in report["sensors"]},
    )


def tick_line(tick: dict[str, Any]) -> str:
    """One sensor's last tick, as a person reads it."""
    age = "never ticked" if tick["age_s"] is None else f"last tick {tick['age_s']:.0f} s ago"
    status = f" ({tick['last_tick_status'].lower()})" if tick["last_tick_status"] else ""
    stale = ", STALE" if tick["stale"] else ""
    return f"{age}{status}, every {tick['interval_s']:.0f} s{stale}"


platform_health_asset = dg.AssetSpec(
    ASSET,
    group_name="operations",
    description="Disk use per store, TorchServe key expiry and each sensor's last tick; "
    "recorded by platform_health_sensor.",
)


@dg.asset_check(asset=ASSET, name=CHECK, description="Every running sensor ticks.")
def sensors_ticking(context, storage: LooplineStorage):
    """The same check, on demand from the UI."""
    report = health_report(
        storage.settings, context.instance, declared=declared_sensors(context.repository_def)
    )
    evaluation = _check(report)
    return dg.AssetCheckResult(
        passed=evaluation.passed,
        severity=evaluation.severity,
        description=evaluation.description,
        metadata=evaluation.metadata,
    )


@dataclass(frozen=True)
class Recorded:
    """What ``platform_health_sensor`` keeps in its cursor: the stalls and stuck releases it
    alerted on, and when and in what state it last recorded the asset."""

    alerted: tuple[str, ...] = ()
    at: datetime | None = None
    state: str | None = None

    @classmethod
    def parse(cls, cursor: str | None) -> Recorded:
        data = json.loads(cursor) if cursor else {}
        if isinstance(data, list):  # before it recorded anything else: the stalled sensors
            return cls(tuple(data))
        at = data.get("at")
        return cls(
            tuple(data.get("alerted", ())),
            datetime.fromisoformat(at) if at else None,
            data.get("state"),
        )

    def to_cursor(self) -> str:
        at = self.at.isoformat() if self.at else None
        return json.dumps({"alerted": list(self.alerted), "at": at, "state": self.state})


def health_state(report: dict[str, Any]) -> str:
    """What a change of is worth recording at once: ok, stale sensors, stuck releases and
    whether the keys expire within a day (disk bytes change at every tick)."""
    left = None if report["keys"] is None else report["keys"]["expires_in_s"]
    expiry = None if left is None else "expired" if left <= 0 else left < 86400
    newest_override = [o["at"] for o in report.get("overrides", [])][-1:]
    return json.dumps(
        [report["ok"], report["stale_sensors"], report["stuck_releases"], expiry, newest_override],
        sort_keys=True,
    )


def due(last: Recorded, state: str, now: datetime) -> bool:
    """Whether to record the asset now: its state changed, or ``RECORD_EVERY_S`` passed.
    Each record is an event-log entry no retention removes (it belongs to no run): hourly
    records keep the disk plot and the history at 24 entries a day, not 288."""
    return (
        last.at is None or state != last.state or (now - last.at).total_seconds() >= RECORD_EVERY_S
    )


@dg.sensor(
    minimum_interval_seconds=HEALTH_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Evaluates platform health every 5 minutes; records platform_health and its "
    "sensors_ticking check when it changes and hourly; alerts when a sensor stops ticking or a "
    "release is stuck.",
)
def platform_health_sensor(context: dg.SensorEvaluationContext, storage: LooplineStorage):
    declared = declared_sensors(context.repository_def)
    if declared is not None:
        declared.pop(context.sensor_name, None)  # it is ticking: this is its tick
    report = health_report(storage.settings, context.instance, declared=declared)
    last = Recorded.parse(context.cursor)
    stale, stuck = set(report["stale_sensors"]), set(report["stuck_releases"])
    overrides = {f"override:{o['at']}": o for o in report["overrides"]}
    new = set(overrides) - set(last.alerted)
    _alert_new(report, stale - set(last.alerted), stuck - set(last.alerted))
    for key in sorted(new):
        alerts.send(alerts.Alert("override", override_line(overrides[key]), overrides[key]))
    alerted = tuple(sorted(stale | stuck | set(overrides)))
    now, state = datetime.fromisoformat(report["at"]), health_state(report)
    if not due(last, state, now):
        return dg.SensorResult(
            cursor=Recorded(alerted, last.at, last.state).to_cursor(),
            skip_reason=dg.SkipReason("platform health unchanged; recorded hourly"),
        )
    return dg.SensorResult(
        asset_events=[
            dg.AssetMaterialization(ASSET, metadata=_metadata(report)),
            _check(report),
        ],
        cursor=Recorded(alerted, now, state).to_cursor(),
    )


def _alert_new(report: dict[str, Any], stale: set[str], stuck: set[str]) -> None:
    if stale:
        alerts.send(
            alerts.Alert(
                "sensor_stalled",
                f"sensors stopped ticking: {', '.join(sorted(report['stale_sensors']))}",
                {"sensors": [t for t in report["sensors"] if t["stale"]]},
                severity="error",
            )
        )
    if stuck:
        alerts.send(
            alerts.Alert(
                "release_stuck",
                "TorchServe not seen serving the registry's champion: "
                + "; ".join(release_line(r) for r in report["pending_releases"] if r["stuck"]),
                {"releases": [r for r in report["pending_releases"] if r["stuck"]]},
                severity="error",
            )
        )


defs = dg.Definitions(
    assets=[platform_health_asset],
    asset_checks=[sensors_ticking],
    sensors=[platform_health_sensor],
)
