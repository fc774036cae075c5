"""Feast for a Loopline home, and a fast point-in-time join that answers like Feast does.

``feature_store(home)`` builds the store from ``feature_repo/feature_store.yaml`` with the home
substituted, so the library and the Feast CLI read one configuration. ``historical_features``
builds training sets with one DuckDB ``ASOF LEFT JOIN`` per feature view, driven by the
registry (the service's views, their sources, join keys, timestamp fields and TTLs), and then
runs the on-demand views through Feast's own code; a test holds it equal, row for row, to
``FeatureStore.get_historical_features``. ``online_features`` is the serving-side lookup.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import yaml
from feast import FeatureService, FeatureStore, FeatureView, RepoConfig
from feast import utils as feast_utils
from feast.errors import FeatureServiceNotFoundException
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.type_map import feast_value_type_to_pa

from features.feature_repo.definitions import HASH_TAG, Definitions, build_definitions

SERVICE = "fraud_model_v1"
REPO_DIR = Path(__file__).resolve().parent / "feature_repo"
HOME_VARIABLE = "${LOOPLINE_HOME}"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_U64_MAX = 2**64 - 1
_I64_OFFSET = 2**63


def repo_config(home: Path, online_store: Mapping[str, Any] | None = None) -> RepoConfig:
    """The repo's ``feature_store.yaml`` with ``${LOOPLINE_HOME}`` replaced by ``home``;
    ``online_store`` replaces its ``online_store`` section (the scale profile's Redis)."""
    home = Path(home).resolve()
    text = (REPO_DIR / "feature_store.yaml").read_text()
    values = yaml.safe_load(text.replace(HOME_VARIABLE, str(home)))
    if online_store is not None:
        values["online_store"] = dict(online_store)
    config = RepoConfig(**values)
    config.repo_path = home
    return config


def feature_store(home: Path, online_store: Mapping[str, Any] | None = None) -> FeatureStore:
    """A FeatureStore whose registry and sources live under ``home``; the online store too,
    unless ``online_store`` names another (``redis_online_store(url)``)."""
    home = Path(home).resolve()
    (home / "feast").mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(home), config=repo_config(home, online_store))


def redis_online_store(url: str) -> dict[str, Any]:
    """Feast's Redis online store section for a ``redis://[:password@]host:port[/db]`` URL
    (``rediss://`` for TLS). Feast takes ``host:port,db=N,password=...,ssl=true`` instead."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("expected redis://[:password@]host:port[/db] or rediss://...")
    params = [f"{parts.hostname}:{parts.port or 6379}"]
    db = parts.path.strip("/")
    if db:
        params.append(f"db={int(db)}")
    if parts.username and parts.username != "default":
        params.append(f"username={unquote(parts.username)}")
    if parts.password:
        params.append(f"password={unquote(parts.password)}")
    if parts.scheme == "rediss":
        params.append("ssl=true")
    if any("," in p for p in params):
        raise ValueError("Feast's Redis connection string cannot carry a ',' in a value")
    return {"type": "redis", "connection_string": ",".join(params)}


def _home_of(store: FeatureStore) -> Path:
    return Path(store.config.repo_path)


def _registry_objects(store: FeatureStore) -> list[Any]:
    registry, project = store.registry, store.project
    return [
        *registry.list_feature_services(project, allow_cache=False),
        *registry.list_on_demand_feature_views(project, allow_cache=False),
        *registry.list_feature_views(project, allow_cache=False),
        *registry.list_entities(project, allow_cache=False),
        *registry.list_data_sources(project, allow_cache=False),
    ]


def apply_definitions(store: FeatureStore, home: Path | None = None) -> bool:
    """Apply the repo's declarations when they changed; return whether anything was applied.

    The service carries a hash of the declaration files, the home and the Feast version; equal
    to the registry's means nothing to do. Objects no longer declared are removed.
    """
    definitions: Definitions = build_definitions(Path(home) if home else _home_of(store))
    wanted = definitions.fraud_model_v1.tags[HASH_TAG]
    try:
        applied = store.registry.get_feature_service(SERVICE, store.project, allow_cache=False)
        if applied.tags.get(HASH_TAG) == wanted:
            return False
    except FeatureServiceNotFoundException:
        pass
    declared = {(type(o).__name__, o.name) for o in definitions}
    stale = [
        o
        for o in _registry_objects(store)
        if (type(o).__name__, o.name) not in declared and o.name != "__dummy"
    ]
    store.apply(list(definitions), objects_to_delete=stale, partial=False)
    _RESOLVED.pop(store, None)
    return True


def materialize(
    store: FeatureStore, end: datetime, *, changed_since: datetime | None = None
) -> dict[str, tuple[datetime, datetime]]:
    """Bring the online store up to ``end``; return the interval loaded per view.

    Each view continues from its last materialized end (Feast's incremental bookkeeping), or
    from the start of time the first time (Feast would start at now - TTL, which skips
    historical data). Rows recomputed for late events or labels carry event times before that
    end; pass the earliest such time as ``changed_since`` so those rows are loaded too.
    """
    if end.tzinfo is None:
        raise ValueError("end must be timezone-aware")
    loaded: dict[str, tuple[datetime, datetime]] = {}
    for view in store.list_feature_views():
        if not view.online:
            continue
        last = view.most_recent_end_time
        if last is not None and (changed_since is None or changed_since >= last):
            store.materialize_incremental(end_date=end, feature_views=[view.name])
            loaded[view.name] = (last, end)
            continue
        start = _EPOCH if last is None else min(last, changed_since or last)
        store.materialize(start_date=start, end_date=end, feature_views=[view.name])
        loaded[view.name] = (start, end)
    return loaded


class _ResolvedService:
    """What Feast derives from a FeatureService before a retrieval, derived the same way."""

    def __init__(self, store: FeatureStore, service_name: str) -> None:
        registry, project = store.registry, store.project
        service: FeatureService = registry.get_feature_service(service_name, project)
        refs = feast_utils._get_features(registry, project, service, allow_cache=True)
        all_fvs, all_odfvs = feast_utils._get_feature_views_to_use(
            registry, project, service, allow_cache=True
        )
        fvs, odfvs = feast_utils._group_feature_refs(refs, all_fvs, all_odfvs)
        provider_refs = list(refs)
        for view, names in fvs:
            for name in names:
                ref = f"{view.projection.name_to_use()}:{name}"
                if ref not in provider_refs:
                    provider_refs.append(ref)
        self.feature_views: list[FeatureView] = [view for view, _ in fvs]
        self.refs = provider_refs
        self.odfvs: list[OnDemandFeatureView] = [
            o
            for o in OnDemandFeatureView.get_requested_odfvs(provider_refs, project, registry)
            if o.mode != "substrait"
        ]
        self.request_fields = {name for odfv, _ in odfvs for name in odfv.get_request_data_schema()}
        self.arrow_types = {
            f.name: feast_value_type_to_pa(f.dtype.to_value_type())
            for view in self.feature_views
            for f in view.features
        }

    def features_of(self, view: FeatureView) -> list[str]:
        prefix = f"{view.projection.name_to_use()}:"
        return [r.split(":", 1)[1] for r in self.refs if r.startswith(prefix)]

    @staticmethod
    def join_keys(view: FeatureView) -> dict[str, str]:
        """Feature-table column -> entity-frame column, as Feast's point-in-time join uses it."""
        return view.projection.join_key_map or {c.name: c.name for c in view.entity_columns}


_RESOLVED: weakref.WeakKeyDictionary[FeatureStore, dict[str, tuple[float, _ResolvedService]]] = (
    weakref.WeakKeyDictionary()
)


def _resolve(store: FeatureStore, service_name: str) -> _ResolvedService:
    """The resolved service, reused for as long as Feast caches the registry (serving calls
    this per request; resolving costs milliseconds)."""
    cached = _RESOLVED.setdefault(store, {})
    hit = cached.get(service_name)
    ttl = getattr(store.config.registry, "cache_ttl_seconds", 0)
    if hit is not None and (ttl == 0 or time.monotonic() - hit[0] < ttl):
        return hit[1]
    resolved = _ResolvedService(store, service_name)
    cached[service_name] = (time.monotonic(), resolved)
    return resolved


class _FeastJob(RetrievalJob):
    """A finished table handed to Feast's RetrievalJob, so on-demand views run on Feast's path."""

    def __init__(
        self, table: pa.Table, odfvs: list[OnDemandFeatureView], metadata: RetrievalMetadata
    ) -> None:
        super().__init__()
        self._table = table
        self._odfvs = odfvs
        self._metadata = metadata

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        return self._table

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._table.to_pandas()

    @property
    def full_feature_names(self) -> bool:
        return False

    @property
    def on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        return self._odfvs

    @property
    def metadata(self) -> RetrievalMetadata:
        return self._metadata


def _micros(ts: datetime) -> int:
    return (ts - _EPOCH) // timedelta(microseconds=1)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _event_timestamp_column(entity_df: pl.DataFrame) -> str:
    if "event_timestamp" in entity_df.columns:
        return "event_timestamp"
    stamps = [c for c, t in entity_df.schema.items() if isinstance(t, pl.Datetime)]
    if len(stamps) != 1:
        raise ValueError("entity_df needs an event_timestamp column")
    return stamps[0]


def _as_utc(entity_df: pl.DataFrame, column: str) -> pl.DataFrame:
    dtype = entity_df.schema[column]
    if not isinstance(dtype, pl.Datetime):
        raise ValueError(f"{column} must be a Datetime column")
    stamp = pl.col(column)
    stamp = stamp.dt.replace_time_zone("UTC") if dtype.time_zone is None else stamp
    return entity_df.with_columns(stamp.dt.convert_time_zone("UTC").alias(column))


def _ordering_key(ts: str, created: str | None) -> str:
    """Event time, then created time, as one HUGEINT: ASOF picks the greatest, as Feast's
    ``ORDER BY event_timestamp DESC, created_timestamp DESC`` dedupe does."""
    high = f"(epoch_us({ts})::HUGEINT << 64)"
    if created is None:
        return high
    return f"({high} + coalesce(epoch_us({created})::HUGEINT + {_I64_OFFSET}, 0))"


def _asof_sql(service: _ResolvedService, entity_columns: list[str], ts: str) -> str:
    """One SELECT: the entity rows, in order, with one ASOF LEFT JOIN per feature view."""
    selects = [f"e.{_quote(c)}" for c in entity_columns]
    joins = []
    for i, view in enumerate(service.feature_views):
        source = view.batch_source
        if not isinstance(source, FileSource):
            raise TypeError(f"{view.name}: only file sources are supported")
        alias = f"f{i}"
        renames = {v: k for k, v in source.field_mapping.items()}
        features = service.features_of(view)
        keys = _ResolvedService.join_keys(view)
        created = source.created_timestamp_column or None
        columns = [f"{_quote(renames.get(k, k))} AS {_quote(k)}" for k in keys]
        columns += [f"{_quote(renames.get(f, f))} AS {_quote(f)}" for f in features]
        stamp = f"{_quote(source.timestamp_field)}::TIMESTAMPTZ"
        created_stamp = f"{_quote(created)}::TIMESTAMPTZ" if created else None
        columns += [f"{stamp} AS __ts", f"{_ordering_key(stamp, created_stamp)} AS __k"]
        table = f"(SELECT {', '.join(columns)} FROM read_parquet({_literal(source.path)}))"
        on = [f"e.{_quote(entity)} = {alias}.{_quote(key)}" for key, entity in keys.items()]
        on.append(f"e.__k >= {alias}.__k")
        joins.append(f"ASOF LEFT JOIN {table} AS {alias} ON {' AND '.join(on)}")
        alive = "TRUE"
        if view.ttl:
            ttl_us = view.ttl // timedelta(microseconds=1)
            alive = f"{alias}.__ts >= e.{_quote(ts)} - to_microseconds({ttl_us})"
        selects += [
            f"CASE WHEN {alive} THEN {alias}.{_quote(f)} END AS {_quote(f)}" for f in features
        ]
    entities = (
        f"(SELECT *, (epoch_us({_quote(ts)})::HUGEINT << 64) + {_U64_MAX}::HUGEINT AS __k "
        "FROM entity_frame)"
    )
    return f"SELECT {', '.join(selects)} FROM {entities} AS e {' '.join(joins)} ORDER BY e.__row"


def historical_features(
    store: FeatureStore, entity_df: pl.DataFrame, service_name: str = SERVICE
) -> pl.DataFrame:
    """Point-in-time training rows for ``entity_df``, equal to Feast's get_historical_features.

    ``entity_df``: the service's join keys, ``event_timestamp`` (naive means UTC), the request
    fields of its on-demand views, and any other columns (passed through). For each view the
    feature row is the entity's latest with event time <= the row's time (ties: latest
    created_timestamp), null when none or when older than the view's TTL. Output: the entity
    columns, then the features in Feast's order and dtypes; rows in ``entity_df`` order.
    """
    service = _resolve(store, service_name)
    missing = service.request_fields - set(entity_df.columns)
    if missing:
        raise ValueError(f"entity_df lacks request fields {sorted(missing)}")
    ts = _event_timestamp_column(entity_df)
    frame = _as_utc(entity_df, ts)
    entity_columns = frame.columns
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("entity_frame", frame.with_row_index("__row").to_arrow())
        table = con.sql(_asof_sql(service, entity_columns, ts)).to_arrow_table()
    finally:
        con.close()
    metadata = RetrievalMetadata(features=service.refs, keys=[c for c in entity_columns if c != ts])
    return pl.from_arrow(_FeastJob(table, service.odfvs, metadata).to_arrow())


def online_features(
    store: FeatureStore,
    entity_rows: pl.DataFrame | list[dict[str, Any]],
    *,
    service_name: str = SERVICE,
    at: datetime | None = None,
) -> pl.DataFrame:
    """Serving features for request rows (join keys + request fields), as training sees them.

    The online store keeps each entity's latest row whatever its age; a row older than its
    view's TTL at ``at`` (default now) is nulled here, because the training join nulls it too.
    On-demand features then run through Feast's transformation, as in ``historical_features``.
    """
    rows = entity_rows if isinstance(entity_rows, pl.DataFrame) else pl.DataFrame(entity_rows)
    at = at or datetime.now(UTC)
    service = _resolve(store, service_name)
    keys = sorted(
        {e for v in service.feature_views for e in _ResolvedService.join_keys(v).values()}
    )
    base_refs = [
        f"{v.projection.name_to_use()}:{f}"
        for v in service.feature_views
        for f in service.features_of(v)
    ]
    response = store.get_online_features(
        features=base_refs, entity_rows=rows.select(keys).to_dicts()
    )
    values = response.to_dict()
    vectors = dict(
        zip(response.proto.metadata.feature_names.val, response.proto.results, strict=True)
    )
    table = rows.to_arrow()
    for view in service.feature_views:
        floor_us = _micros(at - view.ttl) if view.ttl else None
        for name in service.features_of(view):
            column = values[name]
            if floor_us is not None:
                stamps = vectors[name].event_timestamps
                column = [
                    v if s.seconds * 1_000_000 + s.nanos // 1000 >= floor_us else None
                    for v, s in zip(column, stamps, strict=True)
                ]
            table = table.append_column(name, pa.array(column, type=service.arrow_types[name]))
    metadata = RetrievalMetadata(features=service.refs, keys=keys)
    return pl.from_arrow(_FeastJob(table, service.odfvs, metadata).to_arrow())
