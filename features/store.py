"""Feast for a Loopline home, and a fast point-in-time join that answers like Feast does.

``feature_store(home)`` builds the store from ``feature_repo/feature_store.yaml`` with the home
substituted, so the library and the Feast CLI read one configuration. ``historical_features``
builds training sets with one DuckDB ``ASOF LEFT JOIN`` per feature view, driven by the
registry (the service's views, their sources, join keys, timestamp fields and TTLs), and then
runs the on-demand views through Feast's own code; a test holds it equal, row for row, to
``FeatureStore.get_historical_features``. ``online_features`` is the serving-side lookup.
"""

from __future__ import annotations

import logging
import sqlite3
import struct
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import yaml
from feast import FeatureService, FeatureStore, FeatureView, RepoConfig
from feast import utils as feast_utils
from feast.errors import FeatureServiceNotFoundException
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.online_stores.helpers import compute_table_id
from feast.infra.online_stores.sqlite import SqliteOnlineStore, convert_timestamp
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import (
    feast_value_type_to_pa,
    feast_value_type_to_python_type,
    python_values_to_proto_values,
)
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp

from core.storage import register_filesystems, remote_paths
from core.usecase import active
from features.declarations import HASH_TAG, NUMPY_UDF_TAG, build_definitions, service_name

# The active use case's FeatureService and Feast repo (decision 31: one process, one use case).
SERVICE = service_name()
REPO_DIR = active().feature_repo
HOME_VARIABLE = "${LOOPLINE_HOME}"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_U64_MAX = 2**64 - 1
_I64_OFFSET = 2**63
_KEY_CACHE = 1 << 16
_VALUE_CACHE = 1 << 16
_ROW_CACHE = 1 << 14  # entities per view the SQLite reader keeps decoded (~1 KB each)
_SQLITE_CHUNK = 900
_READ_INDEX = "_loopline_read"  # the covering index of a view's table (ensure_read_indexes)


class _FileRegistryServesWhileMaterializing(logging.Filter):
    """Feast warns that ``serve_features_while_materializing`` "typically has no effect" on a
    registry other than SQL; its file registry does honour it (``feast.infra.registry.registry``),
    so the warning would only mislead, once per store built."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`serve_features_while_materializing` is enabled but" not in record.getMessage()


logging.getLogger("feast.repo_config").addFilter(_FileRegistryServesWhileMaterializing())


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


def redis_online_store(url: str, key_ttl: timedelta | None = None) -> dict[str, Any]:
    """Feast's Redis online store section for a ``redis://[:password@]host:port[/db]`` URL
    (``rediss://`` for TLS). Feast takes ``host:port,db=N,password=...,ssl=true`` instead.

    Redis keeps one hash per entity for all its views; ``key_ttl`` (default: the longest TTL
    the use case's online views declare, ``online_key_ttl``) expires an entity no view has
    written for that long, whose rows every lookup would already treat as absent."""
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
    section: dict[str, Any] = {"type": "redis", "connection_string": ",".join(params)}
    ttl = key_ttl if key_ttl is not None else online_key_ttl()
    if ttl:
        section["key_ttl_seconds"] = max(1, int(ttl.total_seconds()))
    return section


def online_key_ttl(lake: Path | str = ".") -> timedelta | None:
    """The longest TTL among the use case's online feature views; None when one never expires
    (an entity's key must then live for ever). The lake only names the sources' files."""
    ttls = [o.ttl for o in build_definitions(lake) if isinstance(o, FeatureView) and o.online]
    if not ttls or any(not t for t in ttls):
        return None
    return max(ttls)


def online_missing(store: FeatureStore, keys: Mapping[str, Sequence[Any]]) -> dict[str, int]:
    """Per feature view of the service, how many of ``keys[view]`` (entity key values as the
    view's feature table holds them) its online table lacks, read from the store itself, past
    every cache: after a Redis restart or a lost SQLite file they are all missing."""
    reader = _StoreReader(store)
    out: dict[str, int] = {}
    for view, read in _resolve(store, SERVICE).online_plan(store).views:
        wanted = list(dict.fromkeys(keys.get(view.name, ())))
        if wanted:
            # Redis answers an absent key with an empty row stamped at the epoch.
            out[view.name] = sum(not stamp for stamp, _ in reader.read(read, wanted))
    return out


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


def apply_definitions(store: FeatureStore, lake: Path | None = None) -> bool:
    """Apply the repo's declarations when they changed; return whether anything was applied.

    The sources read the feature files under ``lake`` (default: the store's home). The service
    carries a hash of the declaration files, the lake and the Feast version; equal to the
    registry's means nothing to do. Objects no longer declared are removed.
    """
    definitions = build_definitions(lake if lake else _home_of(store))
    wanted = next(o for o in definitions if o.name == SERVICE).tags[HASH_TAG]
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
    views = [view for view in store.list_feature_views() if view.online]
    remote = remote_paths(view.batch_source.path for view in views)
    if remote:  # Feast's DuckDB offline store reads through ibis's default connection
        import ibis

        register_filesystems(ibis.get_backend(), remote)
    loaded: dict[str, tuple[datetime, datetime]] = {}
    for view in views:
        last = view.most_recent_end_time
        if last is not None and (changed_since is None or changed_since >= last):
            store.materialize_incremental(end_date=end, feature_views=[view.name])
            loaded[view.name] = (last, end)
            continue
        start = _EPOCH if last is None else min(last, changed_since or last)
        store.materialize(start_date=start, end_date=end, feature_views=[view.name])
        loaded[view.name] = (start, end)
    ensure_read_indexes(store)
    return loaded


def ensure_read_indexes(store: FeatureStore) -> list[str]:
    """The SQLite online store's covering index per view table, for the serving lookup: the
    columns ``_SqliteReader`` reads, keyed by entity. Feast's own index on the entity key
    leaves one table seek per (entity, feature) row; at a million cards those seeks are most
    of a lookup (~1.25 ms for 32 requests, ~0.4 ms with the covering index; decision 53).
    Created once (a table of 11M rows: ~20 s, +40% on disk), then kept by SQLite on every
    write. Returns the indexes created now; nothing for other online stores."""
    if store.config.online_store.type != "sqlite":
        return []
    versioning = store.config.registry.enable_online_feature_view_versioning
    tables = [
        compute_table_id(store.project, view, versioning)
        for view in store.list_feature_views()
        if view.online
    ]
    created = []
    con = sqlite3.connect(SqliteOnlineStore._get_db_path(store.config))
    try:
        present = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        for table in tables:
            index = f"{table}{_READ_INDEX}"
            if table in present and index not in present:
                con.execute(
                    f"CREATE INDEX IF NOT EXISTS {_quote(index)} ON {_quote(table)} "
                    "(entity_key, feature_name, value, event_ts)"
                )
                created.append(index)
        con.commit()
    finally:
        con.close()
    return created


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
        self.project = project
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

    def online_plan(self, store: FeatureStore) -> _OnlinePlan:
        """What ``online_features`` needs per call, derived once per resolution."""
        plan = getattr(self, "_online_plan", None)
        if plan is None:
            plan = self._online_plan = _OnlinePlan(self, store.config)
        return plan


class _ViewRead(NamedTuple):
    """One feature view's part of an online lookup."""

    view: FeatureView
    join_keys: list[str]  # the online table's key names
    value_types: list[ValueType]
    entity_columns: list[str]  # the request columns holding those keys
    features: list[str]
    table: str  # the SQLite table name
    keys: dict[Any, bytes]  # request key -> Feast's serialized entity key (a cache)

    def entity_key(self, key: Any) -> EntityKeyProto:
        values = (key,) if len(self.join_keys) == 1 else key
        return EntityKeyProto(
            join_keys=self.join_keys,
            entity_values=[
                python_values_to_proto_values([v], t)[0]
                for v, t in zip(values, self.value_types, strict=True)
            ],
        )

    def serialized_key(self, key: Any, version: int) -> bytes:
        """``serialize_entity_key`` of the request key, as the SQLite store keys its rows."""
        cached = self.keys.get(key)
        if cached is None:
            if len(self.keys) >= _KEY_CACHE:
                self.keys.clear()
            cached = self.keys[key] = _plain_serialized(self, key, version) or serialize_entity_key(
                self.entity_key(key), version
            )
        return cached


def _plain_serialized(read: _ViewRead, key: Any, version: int) -> bytes | None:
    """``serialize_entity_key`` (version 3) of a single string or int64 key, written directly
    rather than through its protos (a third of a lookup's time at a million cards); None for
    any other key, which Feast's own code serializes."""
    if version != 3 or len(read.join_keys) != 1:
        return None
    value_type = read.value_types[0]
    if value_type == ValueType.STRING and type(key) is str:
        data = key.encode("utf8")
    elif value_type == ValueType.INT64 and type(key) is int:
        data = struct.pack("<q", key)
    else:
        return None
    name = read.join_keys[0].encode("utf8")
    head = struct.pack("<III", 1, ValueType.STRING.value, len(name))
    return head + name + struct.pack("<II", value_type.value, len(data)) + data


# Feature value kinds whose Python value is the ValueProto field's own: read directly rather
# than through Feast's generic conversion (the same values, a tenth of the time: at a million
# cards nearly every value of a lookup is new, so this is its hot path).
_PLAIN_VALUES = frozenset(
    {"string_val", "int64_val", "int32_val", "double_val", "float_val", "bool_val", "bytes_val"}
)


class _OnlinePlan:
    """Per-service lookup plan: the views' keys and features, the on-demand views' declared
    inputs and requested outputs, and the reader for the configured online store."""

    def __init__(self, service: _ResolvedService, config: RepoConfig) -> None:
        versioning = config.registry.enable_online_feature_view_versioning
        self.views: list[tuple[FeatureView, _ViewRead]] = []
        for view in service.feature_views:
            keys = _ResolvedService.join_keys(view)
            types = {c.name: c.dtype.to_value_type() for c in view.entity_columns}
            read = _ViewRead(
                view=view,
                join_keys=list(keys),
                value_types=[types[k] for k in keys],
                entity_columns=list(keys.values()),
                features=service.features_of(view),
                table=compute_table_id(service.project, view, versioning),
                keys={},
            )
            self.views.append((view, read))
        self.odfvs: list[_ViewTransform] = []
        for odfv in service.odfvs:
            inputs = list(odfv.get_request_data_schema())
            for projection in odfv.source_feature_view_projections.values():
                inputs += [f.name for f in projection.features]
            names = {odfv.name, odfv.projection.name_to_use()}
            wanted = {r.split(":", 1)[1] for r in service.refs if r.split(":", 1)[0] in names}
            numpy = odfv.mode == "pandas" and odfv.tags.get(NUMPY_UDF_TAG) == "true"
            self.odfvs.append(_ViewTransform(odfv, list(dict.fromkeys(inputs)), wanted, numpy))


class _ViewTransform(NamedTuple):
    """One on-demand view's part of an online lookup."""

    odfv: OnDemandFeatureView
    inputs: list[str]  # its declared inputs: request fields, then source features
    wanted: set[str]  # the outputs the service asks for (empty: all)
    numpy: bool  # its pandas UDF also takes a dict of NumPy columns (NUMPY_UDF_TAG)


_Found = tuple[int, tuple[Any, ...]] | tuple[None, None]


class _OnlineReader:
    """Reads the online rows of unique entity keys: per key, (event time in µs, the view's
    requested features' Python values in ``read.features`` order, None where absent) as
    ``FeatureStore.get_online_features`` decodes them, or (None, None)."""

    def begin(self) -> None:
        """Called once per lookup, before its views' reads."""

    def read(self, read: _ViewRead, keys: list[Any]) -> list[_Found]:
        raise NotImplementedError


class _StoreReader(_OnlineReader):
    """Any online store, through the provider's ``online_read`` (the call the SDK makes)."""

    def __init__(self, store: FeatureStore) -> None:
        self.config = store.config
        self.provider = store._get_provider()

    def read(self, read: _ViewRead, keys: list[Any]) -> list[_Found]:
        protos = [read.entity_key(k) for k in keys]
        out: list[_Found] = []
        # A copy: stores may extend the list they are given (Redis appends its timestamp key).
        features = list(read.features)
        for stamp, values in self.provider.online_read(self.config, read.view, protos, features):
            if values is None:
                out.append((None, None))
                continue
            out.append(
                (
                    _proto_micros(stamp),
                    tuple(
                        feast_value_type_to_python_type(values[n]) if n in values else None
                        for n in read.features
                    ),
                )
            )
        return out


class _SqliteReader(_OnlineReader):
    """Feast's SQLite online store read directly: the query ``SqliteOnlineStore.online_read``
    runs, on a read-only connection per thread, decoding only the requested features (a
    value's bytes decode the same way every time, so recent ones are cached). An entity's
    decoded row is kept until the database changes: SQLite's ``data_version`` moves with every
    commit of another connection (a materialization, from any process); it is checked once per
    lookup (``begin``) and the kept rows are dropped when it moved, so a lookup answers as the
    store holds the rows when it starts, or later for the keys it has to read."""

    def __init__(self, config: RepoConfig) -> None:
        self.path = SqliteOnlineStore._get_db_path(config)
        self.version = config.entity_key_serialization_version
        self._local = threading.local()
        self._decoded: dict[bytes, Any] = {}

    def _connection(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            uri = Path(self.path).resolve().as_uri() + "?mode=ro"
            con = self._local.con = sqlite3.connect(uri, uri=True)
            self._local.data_version, self._local.rows = None, {}
        return con

    def begin(self) -> None:
        """Drops this thread's kept rows if the database changed since its last lookup."""
        con, local = self._connection(), self._local
        data_version = con.execute("PRAGMA data_version").fetchone()[0]
        if data_version != local.data_version:
            local.data_version, local.rows = data_version, {}

    def _decode(self, blob: bytes) -> Any:
        decoded = self._decoded
        if blob in decoded:
            return decoded[blob]
        if len(decoded) >= _VALUE_CACHE:
            decoded.clear()
        proto = ValueProto.FromString(blob)
        kind = proto.WhichOneof("val")
        plain = kind in _PLAIN_VALUES  # else Feast's conversion (timestamps, lists, None)
        value = decoded[blob] = (
            getattr(proto, kind) if plain else feast_value_type_to_python_type(proto)
        )  # type: ignore[arg-type]
        return value

    def read(self, read: _ViewRead, keys: list[Any]) -> list[_Found]:
        serialized = [read.serialized_key(k, self.version) for k in keys]
        con = self._connection()
        kept = self._local.rows.setdefault((read.table, tuple(read.features)), {})
        unread = [key for key in serialized if key not in kept]
        if len(kept) + len(unread) > _ROW_CACHE:
            kept.clear()
            unread = serialized
        decode = self._decode
        positions = {name: i for i, name in enumerate(read.features)}
        width = len(read.features)
        for start in range(0, len(unread), _SQLITE_CHUNK):
            chunk = unread[start : start + _SQLITE_CHUNK]
            query = (
                f"SELECT entity_key, feature_name, value, event_ts FROM {_quote(read.table)} "
                f"WHERE entity_key IN ({','.join('?' * len(chunk))}) ORDER BY entity_key"
            )
            found: dict[bytes, _Found] = {}
            # One pass over the rows (entity by entity, the index's order), the requested
            # features decoded into their places.
            current, values, stamp = None, [], None
            for key, name, blob, stamp_ in con.execute(query, chunk):
                if key != current:
                    if current is not None:
                        found[current] = (_stamp_micros(stamp), tuple(values))
                    current, values = key, [None] * width
                at = positions.get(name)
                if at is not None:
                    values[at] = decode(blob)
                stamp = stamp_
            if current is not None:
                found[current] = (_stamp_micros(stamp), tuple(values))
            kept.update((key, found.get(key, _NOT_FOUND)) for key in chunk)
        return [kept[key] for key in serialized]


_NOT_FOUND = (None, None)


def _stamp_micros(stamp: Any) -> int:
    """As Feast: the entity's time is its last row's, read by Feast's converter (local time,
    then taken as UTC)."""
    return _micros(convert_timestamp(stamp).replace(tzinfo=UTC))


def _proto_micros(stamp: datetime) -> int:
    """An event time as the SDK's response carries it (a protobuf Timestamp), in µs."""
    proto = Timestamp()
    proto.FromDatetime(stamp)
    return proto.seconds * 1_000_000 + proto.nanos // 1000


_READERS: weakref.WeakKeyDictionary[FeatureStore, _OnlineReader] = weakref.WeakKeyDictionary()


def _reader(store: FeatureStore) -> _OnlineReader:
    reader = _READERS.get(store)
    if reader is None:
        sqlite = store.config.online_store.type == "sqlite"
        reader = _READERS[store] = _SqliteReader(store.config) if sqlite else _StoreReader(store)
    return reader


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


_ONE_US = timedelta(microseconds=1)


def _micros(ts: datetime) -> int:
    return (ts - _EPOCH) // _ONE_US


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
        register_filesystems(con, [view.batch_source.path for view in service.feature_views])
        con.register("entity_frame", frame.with_row_index("__row").to_arrow())
        table = con.sql(_asof_sql(service, entity_columns, ts)).to_arrow_table()
    finally:
        con.close()
    metadata = RetrievalMetadata(features=service.refs, keys=[c for c in entity_columns if c != ts])
    return pl.from_arrow(_FeastJob(table, service.odfvs, metadata).to_arrow())


class OnlineColumns(NamedTuple):
    """The features of request rows, column by column: Python lists (None where null) and their
    Arrow types. What ``online_features`` appends to the rows, before any frame is built.
    ``ages``: per feature view, per row, the seconds from the online row's event time to the
    row's lookup time (None where the entity has no row, or its row expired)."""

    values: dict[str, list[Any]]
    types: dict[str, pa.DataType]
    ages: dict[str, list[float | None]]


class _Rows:
    """A lookup's request rows, from an Arrow table or from columns of Python values with their
    Arrow schema; each column is converted only when asked for, at most once per form."""

    def __init__(self, rows: pa.Table | Mapping[str, Sequence[Any]], schema: pa.Schema | None):
        self._table = rows if isinstance(rows, pa.Table) else None
        self._columns = rows if self._table is None else {}
        self._schema = schema
        self._lists: dict[str, list[Any]] = {}
        self._arrays: dict[str, pa.Array | pa.ChunkedArray] = {}

    def __contains__(self, name: str) -> bool:
        return name in (self._table.column_names if self._table is not None else self._columns)

    def values(self, name: str) -> Sequence[Any]:
        """The column as Python values (None where null)."""
        if self._table is None:
            return self._columns[name]
        if name not in self._lists:
            self._lists[name] = self._table.column(name).to_pylist()
        return self._lists[name]

    def array(self, name: str) -> pa.Array | pa.ChunkedArray:
        """The column in Arrow, typed by the schema when it names the column."""
        if self._table is not None:
            return self._table.column(name)
        if name not in self._arrays:
            typed = self._schema is not None and name in self._schema.names
            kind = self._schema.field(name).type if typed else None
            self._arrays[name] = pa.array(self._columns[name], type=kind)
        return self._arrays[name]

    def typed(self, name: str) -> tuple[Sequence[Any] | None, pa.DataType | None]:
        """The column's Python values and Arrow type where they come as columns with a schema
        naming it, else (None, None): Arrow then converts it."""
        if self._table is not None or self._schema is None or name not in self._schema.names:
            return None, None
        return self._columns[name], self._schema.field(name).type

    def table(self) -> pa.Table:
        if self._table is None:
            self._table = pa.table({n: self.array(n) for n in self._columns})
        return self._table


def online_columns(
    store: FeatureStore,
    rows: pa.Table | Mapping[str, Sequence[Any]],
    *,
    schema: pa.Schema | None = None,
    service_name: str = SERVICE,
    at: datetime | None = None,
    time_column: str | None = None,
) -> OnlineColumns:
    """``online_features`` without the frame: the serving handler's path, where a batch is a
    few rows and building frames would cost more than the lookup. The rows (join keys and
    request fields) come as an Arrow table, as Feast would hand them to an on-demand view, or as
    columns of Python values (``schema`` types those an on-demand view reads: only they are
    converted to Arrow; unnamed ones are inferred). TTLs apply, and ages are measured, at each
    row's own time in ``time_column`` when given, else at ``at`` (default now) for all rows."""
    service = _resolve(store, service_name)
    plan = service.online_plan(store)
    reader = _reader(store)
    reader.begin()
    request = _Rows(rows, schema)
    n = len(request.values(plan.views[0][1].entity_columns[0])) if plan.views else 0
    times = (
        _row_micros(request, time_column)
        if time_column is not None
        else [_micros(at or datetime.now(UTC))] * n
    )
    values: dict[str, list[Any]] = {}
    types: dict[str, pa.DataType] = {}
    ages: dict[str, list[float | None]] = {}
    for view, read in plan.views:
        columns = [request.values(c) for c in read.entity_columns]
        keys = columns[0] if len(columns) == 1 else list(zip(*columns, strict=True))
        slots: dict[Any, int] = {}
        inverse = [slots.setdefault(k, len(slots)) for k in keys]
        found = reader.read(read, list(slots))
        by_row = found if len(found) == len(inverse) else [found[i] for i in inverse]
        per_row, ages[view.name] = _alive_rows(by_row, times, view.ttl, len(read.features))
        # One transpose for all the view's features (rows are tuples in read.features order).
        by_feature = zip(*per_row, strict=True) if per_row else [()] * len(read.features)
        for name, column in zip(read.features, by_feature, strict=True):
            values[name] = list(column)
            types[name] = service.arrow_types[name]
    for step in plan.odfvs:
        for name, (column, kind) in _transform(step, request, values, types).items():
            if not name.startswith("__index") and (not step.wanted or name in step.wanted):
                values[name] = column
                types[name] = kind
    return OnlineColumns(values, types, ages)


def _alive_rows(
    found: list[_Found], times: Sequence[int], ttl: timedelta | None, width: int
) -> tuple[list[tuple[Any, ...]], list[float | None]]:
    """Per request row: its online row, or all-None where the entity has none or the row is
    older than ``ttl`` at the request row's time (µs); and that row's age in seconds. The
    training join's rule (``_asof_sql``): alive while ``event time >= time - ttl``."""
    absent = (None,) * width
    ttl_us = ttl // _ONE_US if ttl else None
    rows: list[tuple[Any, ...]] = []
    ages: list[float | None] = []
    for (stamp, row), t in zip(found, times, strict=True):
        if row is None or (ttl_us is not None and stamp < t - ttl_us):
            rows.append(absent)
            ages.append(None)
        else:
            rows.append(row)
            ages.append((t - stamp) / 1e6)
    return rows, ages


def _row_micros(request: _Rows, column: str) -> list[int]:
    """A timestamp column of the request rows as µs since the epoch (naive means UTC), through
    one Arrow cast: no datetime object per row."""
    array = request.array(column)
    kind = array.type
    if not pa.types.is_timestamp(kind):
        raise TypeError(f"{column} must be a timestamp column, got {kind}")
    if array.null_count:
        raise ValueError(f"{column} has null times")
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if kind.unit != "us":
        array = array.cast(pa.timestamp("us", kind.tz), safe=False)
    # The values buffer read as int64 (a view, no copy): a cast costs more than the lookup.
    stamps = np.frombuffer(array.buffers()[1], dtype=np.int64)
    return stamps[array.offset : array.offset + len(array)].tolist()


def online_features(
    store: FeatureStore,
    entity_rows: pl.DataFrame | list[dict[str, Any]],
    *,
    service_name: str = SERVICE,
    at: datetime | None = None,
    time_column: str | None = None,
) -> pl.DataFrame:
    """Serving features for request rows (join keys + request fields), as training sees them.

    The online store keeps each entity's latest row whatever its age; a row older than its
    view's TTL at the row's own time (its ``time_column``; without one, ``at``, default now) is
    nulled here, because the training join nulls it at the transaction's time too.
    On-demand features then run through the registered view's own transformation, as in
    ``historical_features``. Answers exactly as ``online_features_sdk`` (a test holds them equal)
    at a fraction of its cost: the SQLite store is read directly (Feast's table layout, key
    encoding and value decoding), other stores through their ``online_read``; the on-demand
    views see only their declared inputs, as NumPy columns where the view's UDF takes them.
    """
    rows = entity_rows if isinstance(entity_rows, pl.DataFrame) else pl.DataFrame(entity_rows)
    table = rows.to_arrow()
    found = online_columns(store, table, service_name=service_name, at=at, time_column=time_column)
    return pl.from_arrow(_with_columns(table, found.values, found.types))


def _with_columns(
    table: pa.Table, values: dict[str, list[Any]], types: dict[str, pa.DataType]
) -> pa.Table:
    """``table`` with the found feature columns appended, typed as the store declares them."""
    for name, column in values.items():
        table = table.append_column(name, pa.array(column, type=types[name]))
    return table


def _transform(
    step: _ViewTransform,
    rows: _Rows,
    values: dict[str, list[Any]],
    types: dict[str, pa.DataType],
) -> dict[str, tuple[list[Any], pa.DataType]]:
    """The on-demand view's outputs for the rows and the features found so far: per output,
    its Python values (None where null) and its Arrow type.

    A view tagged ``NUMPY_UDF_TAG`` gets its declared inputs as NumPy columns, converted as
    Arrow converts them for pandas, and its outputs go to Arrow as Feast converts a pandas
    frame's (``from_pandas``: NaN is null). Another pandas view gets its declared inputs as a
    pandas frame (the index, which Feast drops, is not converted). Other modes, or a UDF that
    reads other columns or renames its outputs, go through ``odfv.transform_arrow``. Columns of
    the types ``_numpy_values`` and ``_python_values`` know skip Arrow both ways, with the
    values Arrow would give (a test holds them to it)."""
    odfv, inputs = step.odfv, step.inputs
    if odfv.mode == "pandas" and all(c in values or c in rows for c in inputs):
        udf = odfv.feature_transformation.udf
        declared = {f.name for f in odfv.features}
        try:
            if step.numpy:
                arrays = {}
                for c in inputs:
                    column, kind = (values[c], types[c]) if c in values else rows.typed(c)
                    array = _numpy_values(column, kind)
                    if array is None:
                        typed = pa.array(column, type=kind) if c in values else rows.array(c)
                        array = typed.to_numpy(zero_copy_only=False)
                    arrays[c] = array
                out = udf(arrays)
            else:
                columns = {
                    c: pa.array(values[c], type=types[c]) if c in values else rows.array(c)
                    for c in inputs
                }
                out = udf(pa.table(columns).to_pandas())
        except KeyError:
            out = None
        if out is not None and set(out.keys()) <= declared:
            return {c: _python_values(out[c]) for c in out}
    transformed = odfv.transform_arrow(_with_columns(rows.table(), values, types), False)
    return {
        name: (column.to_pylist(), column.type)
        for name, column in zip(transformed.column_names, transformed.columns, strict=True)
    }


_FLOAT64, _STRING = pa.float64(), pa.string()
_OUTPUT_TYPES = {np.dtype(t): pa.from_numpy_dtype(t) for t in (np.float64, np.int64, np.bool_)}


def _numpy_values(column: Sequence[Any] | None, kind: pa.DataType | None) -> np.ndarray | None:
    """Python values of an Arrow type as ``pa.array(column, type=kind).to_numpy(
    zero_copy_only=False)`` gives them, for float64 (None as NaN) and string (objects, None
    kept); None for other types (or no values), which go through Arrow."""
    if column is None:
        return None
    if kind == _FLOAT64:
        return np.array(column, dtype=np.float64)
    if kind == _STRING and all(v is None or type(v) is str for v in column):
        out = np.empty(len(column), dtype=object)
        out[:] = column
        return out
    return None


def _python_values(output: Any) -> tuple[list[Any], pa.DataType]:
    """An on-demand output as ``pa.array(output, from_pandas=True)`` gives it (values by
    ``to_pylist``, and the type): one-dimensional float64, int64 and bool NumPy arrays directly
    (NaN as None), anything else through Arrow."""
    if isinstance(output, np.ndarray) and output.ndim == 1 and output.dtype in _OUTPUT_TYPES:
        kind = _OUTPUT_TYPES[output.dtype]
        listed = output.tolist()
        if kind == _FLOAT64:
            listed = [None if v != v else v for v in listed]
        return listed, kind
    array = pa.array(output, from_pandas=True)
    return array.to_pylist(), array.type


def online_features_sdk(
    store: FeatureStore,
    entity_rows: pl.DataFrame | list[dict[str, Any]],
    *,
    service_name: str = SERVICE,
    at: datetime | None = None,
    time_column: str | None = None,
) -> pl.DataFrame:
    """``online_features`` through the Feast SDK (``FeatureStore.get_online_features`` and a
    Feast retrieval job for the on-demand views): the reference the fast path is tested against.
    """
    rows = entity_rows if isinstance(entity_rows, pl.DataFrame) else pl.DataFrame(entity_rows)
    at = at or datetime.now(UTC)
    if time_column is None:
        times = [at] * rows.height
    else:
        times = [t if t.tzinfo else t.replace(tzinfo=UTC) for t in rows[time_column].to_list()]
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
        floors = [_micros(t - view.ttl) for t in times] if view.ttl else None
        for name in service.features_of(view):
            column = values[name]
            if floors is not None:
                stamps = vectors[name].event_timestamps
                column = [
                    v if s.seconds * 1_000_000 + s.nanos // 1000 >= floor else None
                    for v, s, floor in zip(column, stamps, floors, strict=True)
                ]
            table = table.append_column(name, pa.array(column, type=service.arrow_types[name]))
    metadata = RetrievalMetadata(features=service.refs, keys=keys)
    return pl.from_arrow(_FeastJob(table, service.odfvs, metadata).to_arrow())


class OnlineNewest(NamedTuple):
    """A stored view's online rows at a glance: the newest event time (None: no rows) and the
    view's TTL (None: its rows never expire)."""

    newest: datetime | None
    ttl: timedelta | None


def online_newest_event_times(
    store: FeatureStore, service_name: str = SERVICE
) -> dict[str, OnlineNewest] | None:
    """Per stored view of the service, the newest event time among its online rows.

    Read from SQLite's table of each view (as ``_OnlinePlan`` names it); a table not created
    yet counts as no rows. None when the online store is not SQLite: it cannot be asked
    cheaply, and the caller treats the freshness as unknown.
    """
    if store.config.online_store.type != "sqlite":
        return None
    plan = _resolve(store, service_name).online_plan(store)
    path = Path(SqliteOnlineStore._get_db_path(store.config)).resolve()
    out: dict[str, OnlineNewest] = {}
    con = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True) if path.exists() else None
    try:
        for view, read in plan.views:
            newest = None
            if con is not None:
                try:
                    row = con.execute(f"SELECT max(event_ts) FROM {_quote(read.table)}").fetchone()
                except sqlite3.OperationalError as error:
                    if "no such table" not in str(error):
                        raise
                    row = (None,)
                if row[0] is not None:
                    newest = convert_timestamp(row[0]).replace(tzinfo=UTC)  # as the reader does
            out[view.name] = OnlineNewest(newest, view.ttl or None)
    finally:
        if con is not None:
            con.close()
    return out
