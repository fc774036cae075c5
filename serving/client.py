"""A small client for TorchServe's inference, management and metrics APIs, with its tokens.

Keys are read from TorchServe's ``key_file.json`` and re-read when a call is refused: the
server may have restarted, or a key been renewed (``serving.keys``), which makes the old one
invalid at once, so a long-lived client follows renewals by itself. Every non-2xx answer
raises a ``TorchServeError`` carrying the status and TorchServe's JSON body. Built for the
deployment steps: register a version without making it default, call a versioned endpoint,
set-default, unregister.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import requests

from serving.config import ServingConfig


class TorchServeError(RuntimeError):
    """An API call TorchServe answered with an error status (or could not be made)."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class NotRunning(TorchServeError):
    """No TorchServe answers at the configured address."""


@dataclass(frozen=True)
class Keys:
    """TorchServe's keys: ``api`` asks for new ones and never expires; the other two expire
    (``*_expires``, UTC) ``token_expiration_min`` after they were made."""

    inference: str
    management: str
    api: str | None = None
    inference_expires: datetime | None = None
    management_expires: datetime | None = None

    @classmethod
    def read(cls, key_file: str | Path) -> Keys:
        """The keys in ``key_file``. TorchServe rewrites the file in place when it renews a
        key, so a half-written file is read again for a moment before it counts as broken."""
        path = Path(key_file)
        for _ in range(20):
            try:
                data = json.loads(path.read_text())
                return cls(
                    inference=data["inference"]["key"],
                    management=data["management"]["key"],
                    api=data.get("API", {}).get("key"),
                    inference_expires=_instant(data["inference"].get("expiration time")),
                    management_expires=_instant(data["management"].get("expiration time")),
                )
            except FileNotFoundError as exc:
                raise NotRunning(
                    f"no TorchServe key file at {path}: is TorchServe running?"
                ) from exc
            except (ValueError, KeyError, TypeError) as exc:
                error = exc
                time.sleep(0.05)
        raise TorchServeError(f"unreadable TorchServe key file {path}: {error}") from error


def _instant(text: str | None) -> datetime | None:
    """An ISO-8601 instant as TorchServe (Java's ``Instant``) writes it, ``Z`` included."""
    return datetime.fromisoformat(text) if text else None


class TorchServeClient:
    """Calls one TorchServe instance; thread-safe for concurrent predictions."""

    def __init__(
        self,
        config: ServingConfig,
        *,
        keys: Keys | None = None,
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.config = config
        self.timeout = timeout
        self._keys = keys
        self._fixed_keys = keys is not None
        self.session = session or requests.Session()

    @property
    def keys(self) -> Keys:
        if self._keys is None:
            self._keys = Keys.read(self.config.key_file)
        return self._keys

    # --- inference ------------------------------------------------------------------------

    def ping(self) -> bool:
        """True when TorchServe answers ``/ping`` with Healthy (it needs the inference key)."""
        try:
            response = self._call("GET", self.config.inference_url, "/ping", "inference")
            return response.json().get("status") == "Healthy"
        except (TorchServeError, ValueError):
            return False

    def predict(self, payload: Any, *, model: str | None = None, version: str | None = None) -> Any:
        """Scores one transaction (dict) or many (list) on the default or a given version."""
        return self._infer("predictions", payload, model, version)

    def explain(self, payload: Any, *, model: str | None = None, version: str | None = None) -> Any:
        """Like predict, with per-feature attributions under ``explanation``."""
        return self._infer("explanations", payload, model, version)

    def _infer(self, kind: str, payload: Any, model: str | None, version: str | None) -> Any:
        path = _model_path(kind, model or self.config.model_name, version)
        return self._json("POST", self.config.inference_url, path, "inference", json_body=payload)

    def metrics(self, names: list[str] | None = None) -> str:
        """The Prometheus text exposition of TorchServe's metrics endpoint."""
        query = ("?" + urlencode([("name[]", n) for n in names])) if names else ""
        response = self._call("GET", self.config.metrics_url, f"/metrics{query}", None)
        return response.text

    # --- management -----------------------------------------------------------------------

    def register(
        self,
        version: str,
        *,
        model: str | None = None,
        workers: int | None = None,
        batch_size: int | None = None,
        max_batch_delay_ms: int | None = None,
        response_timeout_s: int | None = None,
        set_default: bool = False,
    ) -> dict[str, Any]:
        """Registers ``<model>-<version>.mar`` from the model store and waits for its workers.

        The version is not the default unless ``set_default``: the deployment step can smoke
        test it on its versioned endpoint first. Waiting is a worker's start (imports, model
        and feature store loaded: 20 s and more on a busy 2-core host), so it is bounded by
        ``startup_timeout_s``, not by a request's timeout.
        """
        cfg = self.config
        params = {
            "url": cfg.mar_name(version),
            "model_name": model or cfg.model_name,
            "initial_workers": workers or cfg.workers_per_model,
            "batch_size": batch_size or cfg.batch_size,
            "max_batch_delay": cfg.max_batch_delay_ms
            if max_batch_delay_ms is None
            else max_batch_delay_ms,
            "response_timeout": response_timeout_s or cfg.response_timeout_s,
            "synchronous": "true",
        }
        result = self._json(
            "POST",
            cfg.management_url,
            "/models?" + urlencode(params),
            "management",
            timeout=max(self.timeout, cfg.startup_timeout_s),
        )
        if set_default:
            self.set_default(version, model=model)
        return result

    def set_default(self, version: str, *, model: str | None = None) -> dict[str, Any]:
        path = _model_path("models", model or self.config.model_name, version) + "/set-default"
        return self._json("PUT", self.config.management_url, path, "management")

    def unregister(self, version: str, *, model: str | None = None) -> dict[str, Any]:
        path = _model_path("models", model or self.config.model_name, version)
        return self._json("DELETE", self.config.management_url, path, "management")

    def scale(
        self, workers: int, *, version: str | None = None, model: str | None = None
    ) -> dict[str, Any]:
        path = _model_path("models", model or self.config.model_name, version)
        query = urlencode({"min_worker": workers, "max_worker": workers, "synchronous": "true"})
        return self._json("PUT", self.config.management_url, f"{path}?{query}", "management")

    def list_models(self) -> list[dict[str, Any]]:
        return self._json("GET", self.config.management_url, "/models?limit=1000", "management")[
            "models"
        ]

    def describe(
        self, *, model: str | None = None, version: str | None = None
    ) -> list[dict[str, Any]]:
        """TorchServe's description of one version, or of every version with ``version="all"``."""
        path = _model_path("models", model or self.config.model_name, version)
        return self._json("GET", self.config.management_url, path, "management")

    def versions(self, *, model: str | None = None) -> dict[str, bool]:
        """Registered versions of a model -> whether each is the default; {} when none."""
        try:
            described = self.describe(model=model, version="all")
        except TorchServeError as exc:
            if exc.status == 404:
                return {}
            raise
        default = self.default_version(model=model)
        return {d["modelVersion"]: d["modelVersion"] == default for d in described}

    def default_version(self, *, model: str | None = None) -> str | None:
        """The version that answers ``/predictions/<model>`` (None when the model is unknown)."""
        try:
            described = self.describe(model=model)
        except TorchServeError as exc:
            if exc.status == 404:
                return None
            raise
        return described[0]["modelVersion"] if described else None

    def renew_key(self, api: str) -> Keys:
        """Asks TorchServe for a new ``inference`` or ``management`` key (its token API, with
        the ``API`` key); the old key is refused from then on. Returns the keys after it."""
        if api not in ("inference", "management"):
            raise ValueError(f"TorchServe renews inference or management keys, not {api!r}")
        self._call("POST", self.config.management_url, f"/token?type={api}", "api")
        self._keys = None
        return self.keys

    # --- plumbing ---------------------------------------------------------------------------

    def _json(
        self,
        method: str,
        base: str,
        path: str,
        api: str,
        *,
        json_body: Any = None,
        timeout: float | None = None,
    ) -> Any:
        response = self._call(method, base, path, api, json_body=json_body, timeout=timeout)
        try:
            return response.json()
        except ValueError as exc:
            raise TorchServeError(
                f"{method} {path}: answer is not JSON: {response.text[:200]!r}",
                response.status_code,
            ) from exc

    def _call(
        self,
        method: str,
        base: str,
        path: str,
        api: str | None,
        *,
        json_body: Any = None,
        timeout: float | None = None,
    ) -> requests.Response:
        """One call (``timeout`` seconds, the client's when None), retried once when its key
        was renewed meanwhile."""
        for attempt in (0, 1):
            key = self._key(api) if api else None
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            data = None
            if json_body is not None:
                headers["Content-Type"] = "application/json"
                data = json.dumps(json_body)
            try:
                response = self.session.request(
                    method, base + path, headers=headers, data=data, timeout=timeout or self.timeout
                )
            except requests.ConnectionError as exc:
                raise NotRunning(f"TorchServe does not answer at {base}: {exc}") from exc
            except requests.RequestException as exc:
                raise TorchServeError(f"{method} {base}{path} failed: {exc}") from exc
            if _refused(response) and attempt == 0 and api and self._reload_keys(api, key):
                continue
            break
        if not response.ok:
            body = _body(response)
            message = (
                body.get("message") or body.get("reason") if isinstance(body, Mapping) else None
            )
            raise TorchServeError(
                f"{method} {path} -> {response.status_code}: {message or body}",
                response.status_code,
                body,
            )
        return response

    def _reload_keys(self, api: str, refused: str | None) -> bool:
        """Whether the key file now holds another key for ``api`` than the one refused. A
        renewal changes TorchServe's key a moment before its key file: the same key read back
        is read again once after a short wait."""
        if self._fixed_keys:
            return False
        for wait in (0.0, 0.3):
            time.sleep(wait)
            self._keys = None
            if self._key(api) != refused:
                return True
        return False

    def _key(self, api: str | None) -> str | None:
        keys = self.keys
        return {"management": keys.management, "inference": keys.inference, "api": keys.api}[
            api or "inference"
        ]


def _model_path(kind: str, model: str, version: str | None) -> str:
    path = f"/{kind}/{quote(model, safe='')}"
    return path if version is None else f"{path}/{quote(version, safe='')}"


def _refused(response: requests.Response) -> bool:
    if response.status_code not in (400, 401, 403):
        return False
    body = _body(response)
    return isinstance(body, Mapping) and body.get("type") == "InvalidKeyException"


def _body(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text
