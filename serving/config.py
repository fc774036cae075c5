"""TorchServe settings for one Loopline home, rendered as ``config.properties``.

Everything TorchServe writes (key file, logs, extracted archives, worker sockets) goes under
``serving_dir``; archives live in ``model_store`` and nothing else may be registered. The
defaults suit a 2-core host: two Netty threads each side, one worker per model version, and
dynamic batching (32 requests or 5 ms) so concurrent clients share one model call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from core.storage import write_bytes_atomic
from core.usecase import active

if TYPE_CHECKING:
    from core.settings import Settings

# TorchServe serves the model under the name of its use case.
MODEL_NAME = active().name
PROPERTIES = "config.properties"
LOG_CONFIG = "log4j2.xml"
KEY_FILE = "key_file.json"
# TorchServe's own log4j2 logs (the files its shipped configuration writes, under log_dir):
# file -> (logger, level, also on the console, i.e. in torchserve.out).
LOGS = {
    "access_log": ("ACCESS_LOG", "info", False),
    "model_log": ("MODEL_LOG", "all", True),
    "model_metrics": ("MODEL_METRICS", "all", False),
    "ts_log": ("org.pytorch.serve", "debug", True),
    "ts_metrics": ("TS_METRICS", "all", False),
}


@dataclass(frozen=True)
class ServingConfig:
    """Where a TorchServe instance keeps its state, its ports and its capacity settings."""

    serving_dir: Path
    model_store: Path
    home: Path
    model_name: str = MODEL_NAME
    host: str = "127.0.0.1"
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    # TorchServe always starts its gRPC APIs (7070/7071 unless told otherwise), so a second
    # instance on the machine would fail to bind them. Loopline uses REST only: 0 lets the OS
    # pick free loopback ports.
    grpc_inference_port: int = 0
    grpc_management_port: int = 0
    batch_size: int = 32
    max_batch_delay_ms: int = 5
    workers_per_model: int = 1
    job_queue_size: int = 1000
    netty_threads: int = 2
    netty_client_threads: int = 2
    # Netty's hard bound: larger bodies get a bare 413 before reaching a worker. The handler
    # applies its own, smaller limit (max_body_bytes) so ordinary oversize requests get a
    # JSON reason.
    max_request_size: int = 1 << 20
    max_response_size: int = 4 << 20
    max_body_bytes: int = 256 << 10
    max_items_per_request: int = 512
    response_timeout_s: int = 30
    startup_timeout_s: int = 120
    # Keys expire this long after they were made (TorchServe takes fractions of a minute);
    # serving.keys renews them when half of it is left.
    token_expiration_min: float = 7 * 24 * 60
    # Every log TorchServe writes (its log4j2 files and torchserve.out) is rotated past this
    # size, keeping this many older files: at most 6 * (backups + 1) * max_bytes in all.
    log_max_bytes: int = 8 << 20
    log_backups: int = 3

    def __post_init__(self) -> None:
        ports = (self.inference_port, self.management_port, self.metrics_port)
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise ValueError(f"inference, management and metrics ports must differ: {ports}")
        grpc = [p for p in (self.grpc_inference_port, self.grpc_management_port) if p]
        if len(set(ports) | set(grpc)) != 3 + len(grpc) or not all(0 < p < 65536 for p in grpc):
            raise ValueError(f"gRPC ports must differ from each other and from {ports}: {grpc}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", self.model_name):
            raise ValueError(f"invalid model name {self.model_name!r}")
        if self.batch_size < 1 or self.max_batch_delay_ms < 0 or self.workers_per_model < 1:
            raise ValueError("batch_size and workers_per_model must be >= 1, delay >= 0")
        if self.log_max_bytes < 1024 or self.log_backups < 1:
            raise ValueError("log_max_bytes must be >= 1024 and log_backups >= 1")
        if self.token_expiration_min <= 0:
            raise ValueError("token_expiration_min must be > 0")
        if self.max_body_bytes > self.max_request_size:
            raise ValueError("max_body_bytes must not exceed max_request_size")

    @classmethod
    def for_home(
        cls, home: Path, serving_dir: Path | None = None, **overrides: object
    ) -> ServingConfig:
        """The default layout: ``<home>/serving`` (or a platform's shared ``serving_dir``) and
        its ``model-store``."""
        home = Path(home).resolve()
        serving_dir = Path(serving_dir).resolve() if serving_dir else home / "serving"
        base = cls(serving_dir=serving_dir, model_store=serving_dir / "model-store", home=home)
        if not overrides.get("token_expiration_min"):  # None or 0: TorchServe's week
            overrides.pop("token_expiration_min", None)
        return replace(base, **overrides)  # type: ignore[arg-type]

    @classmethod
    def for_settings(cls, settings: Settings, **overrides: object) -> ServingConfig:
        """``for_home`` with the settings' serving folder, ports (LOOPLINE_SERVING_PORTS) and
        key lifetime (LOOPLINE_SERVING_KEY_MINUTES)."""
        inference, management, metrics = settings.serving_ports
        base = {
            "inference_port": inference,
            "management_port": management,
            "metrics_port": metrics,
            "token_expiration_min": settings.serving_key_minutes,
        }
        return cls.for_home(settings.home, settings.serving_dir, **(base | overrides))

    def to_dict(self) -> dict[str, object]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ServingConfig:
        paths = {"serving_dir", "model_store", "home"}
        known = set(cls.__dataclass_fields__)
        kwargs = {k: Path(str(v)) if k in paths else v for k, v in data.items() if k in known}
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    @property
    def properties_path(self) -> Path:
        return self.serving_dir / PROPERTIES

    @property
    def log_config_path(self) -> Path:
        return self.serving_dir / LOG_CONFIG

    @property
    def key_file(self) -> Path:
        """TorchServe writes its keys into its working directory, which is ``serving_dir``."""
        return self.serving_dir / KEY_FILE

    @property
    def log_dir(self) -> Path:
        return self.serving_dir / "logs"

    @property
    def prediction_log_dir(self) -> Path:
        return self.home / "predictions" / self.model_name

    def mar_name(self, version: str) -> str:
        return f"{self.model_name}-{version}.mar"


def version_entry(config: ServingConfig, version: str, *, default: bool) -> dict[str, object]:
    """One version's block of TorchServe's ``models`` property (batching and workers)."""
    return {
        "marName": config.mar_name(version),
        "batchSize": config.batch_size,
        "maxBatchDelay": config.max_batch_delay_ms,
        "minWorkers": config.workers_per_model,
        "maxWorkers": config.workers_per_model,
        "responseTimeout": config.response_timeout_s,
        "defaultVersion": default,
    }


def allowed_urls_pattern(model_store: Path) -> str:
    """A regex admitting only ``.mar`` files directly inside the model store."""
    return "file://" + re.escape(str(Path(model_store).resolve())) + r"/[^/]+\.mar"


def render_properties(config: ServingConfig, champion: str | None = None) -> str:
    """``config.properties`` text; with a champion version, TorchServe loads it at boot."""
    props: dict[str, str] = {
        "inference_address": config.inference_url,
        "management_address": config.management_url,
        "metrics_address": config.metrics_url,
        "grpc_inference_port": str(config.grpc_inference_port),
        "grpc_management_port": str(config.grpc_management_port),
        "enable_model_api": "true",
        "disable_token_authorization": "false",
        "token_expiration_min": str(config.token_expiration_min),
        "model_store": str(Path(config.model_store).resolve()),
        "allowed_urls": allowed_urls_pattern(config.model_store),
        "metrics_mode": "prometheus",
        "enable_metrics_api": "true",
        "default_workers_per_model": str(config.workers_per_model),
        "job_queue_size": str(config.job_queue_size),
        "number_of_netty_threads": str(config.netty_threads),
        "netty_client_threads": str(config.netty_client_threads),
        "max_request_size": str(config.max_request_size),
        "max_response_size": str(config.max_response_size),
        "default_response_timeout": str(config.response_timeout_s),
        "default_startup_timeout": str(config.startup_timeout_s),
        # The handler parses bodies itself, so malformed JSON reaches it and gets a JSON 400.
        "decode_input_request": "false",
        "install_py_dep_per_model": "false",
        "enable_envvars_config": "false",
    }
    if champion is not None:
        props["load_models"] = config.mar_name(champion)
        models = {config.model_name: {champion: version_entry(config, champion, default=True)}}
        props["models"] = json.dumps(models, separators=(",", ":"))
    return "".join(f"{k}={_escape(v)}\n" for k, v in props.items())


def write_properties(config: ServingConfig, champion: str | None = None) -> Path:
    """Writes ``config.properties`` atomically into ``serving_dir``; returns its path."""
    text = "# Generated by Loopline (serving/config.py); edits are overwritten on start.\n"
    text += render_properties(config, champion)
    return write_bytes_atomic(text.encode(), config.properties_path)


def render_log_config(config: ServingConfig) -> str:
    """TorchServe's log4j2 configuration: its own files, each rotated by size into
    ``log_backups`` gzipped older files. (The one TorchServe ships rolls by size and day with
    no index: one file a day is kept for a year, and a second roll within a day overwrites the
    first.) Per-request and metrics lines go only to their files, not to the console
    (``torchserve.out``) too; nothing is written twice."""
    appenders, loggers = [], []
    for name, (logger, level, console) in LOGS.items():
        pattern = _LINE if console else "%d{ISO8601} - %m%n"
        appenders.append(
            f'<RollingFile name="{name}" fileName="${{env:LOG_LOCATION:-logs}}/{name}.log" '
            f'filePattern="${{env:LOG_LOCATION:-logs}}/{name}.%i.log.gz">'
            f'<PatternLayout pattern="{pattern}"/>'
            f'<SizeBasedTriggeringPolicy size="{config.log_max_bytes}"/>'
            f'<DefaultRolloverStrategy max="{config.log_backups}"/></RollingFile>'
        )
        refs = f'<AppenderRef ref="{name}"/>' + ('<AppenderRef ref="STDOUT"/>' if console else "")
        loggers.append(
            f'<Logger name="{logger}" level="{level}" additivity="false">{refs}</Logger>'
        )
    console = (
        f'<Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="{_LINE}"/></Console>'
    )
    quiet = '<Logger name="io.netty" level="error"/><Logger name="org.apache" level="off"/>'
    root = '<Root level="info"><AppenderRef ref="STDOUT"/><AppenderRef ref="ts_log"/></Root>'
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<!-- Generated by Loopline (serving/config.py); edits are overwritten on start. -->\n"
        "<Configuration>\n<Appenders>\n"
        + "\n".join([console, *appenders])
        + "\n</Appenders>\n<Loggers>\n"
        + "\n".join([quiet, *loggers, root])
        + "\n</Loggers>\n</Configuration>\n"
    )


_LINE = "%d{ISO8601} [%-5p] %t %c - %m%n"


def write_log_config(config: ServingConfig) -> Path:
    """Writes ``log4j2.xml`` atomically into ``serving_dir``; returns its path."""
    return write_bytes_atomic(render_log_config(config).encode(), config.log_config_path)


def _escape(value: str) -> str:
    """Java properties treat a backslash as an escape, so regex backslashes are doubled."""
    return value.replace("\\", "\\\\")
