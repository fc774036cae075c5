"""Alerts: drift, decay, missing or stale features (availability), a rejected challenger, a
rollback, a sensor that stopped ticking, a TorchServe restarted after it died, a served
version changed behind the registry's back (serving_drift), torn prediction-log lines skipped
(prediction_log_damaged), prediction-log writers that failed or dropped records
(prediction_log_dropping), a promotion or rollback TorchServe was not seen serving for minutes
(release_stuck).

Each alert is one structured (JSON) log line on the ``loopline.alerts`` logger and, when a
webhook URL is configured, a JSON POST to it. Delivery never raises: a dead receiver must not
fail the run that noticed the problem; the failure is logged instead.
"""

import json
import logging
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

KINDS = (
    "drift",
    "decay",
    "availability",
    "challenger_rejected",
    "rollback",
    "promotion",
    "sensor_stalled",
    "serving_restarted",
    "serving_drift",
    "prediction_log_damaged",
    "prediction_log_dropping",
    "release_stuck",
    "release_refused",
    "override",
)
logger = logging.getLogger("loopline.alerts")


@dataclass(frozen=True)
class Alert:
    kind: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    severity: str = "warning"
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown alert kind {self.kind!r}; expected one of {KINDS}")

    def to_json(self) -> str:
        return json.dumps({"alert": self.kind, **asdict(self)}, default=str, sort_keys=True)


def send(alert: Alert, webhook_url: str | None = None, timeout_s: float = 3.0) -> bool:
    """Log the alert; POST it to ``webhook_url`` if given. True when every delivery succeeded."""
    line = alert.to_json()
    logger.warning(line)
    if not webhook_url:
        return True
    if not webhook_url.startswith(("http://", "https://")):
        logger.error(json.dumps({"alert_delivery": "refused", "reason": "not an http(s) URL"}))
        return False
    request = urllib.request.Request(
        webhook_url,
        data=line.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            ok = 200 <= response.status < 300
    except OSError as exc:
        logger.error(
            json.dumps({"alert_delivery": "failed", "kind": alert.kind, "error": str(exc)})
        )
        return False
    if not ok:
        logger.error(json.dumps({"alert_delivery": "failed", "status": response.status}))
    return ok
