"""TorchServe handler of a use case's model (``serving.entry``, archived as ``loopline_handler.py``,
subclasses it).

TorchServe hands ``handle`` a batch: one item per HTTP request (dynamic batching), each body a
transaction object or a list of them. Every body is validated on its own; a bad one gets its
own 400/413 with a JSON reason while the rest of the batch is scored. All valid transactions
of the batch share one feature lookup and one model call. ``/explanations/<model>`` requests
(TorchServe sets the ``explain`` header) get Integrated Gradients attributions as well.

The worker is a process entry point, so it reads ``LOOPLINE_HOME`` (``serving.entry`` sets it and
``LOOPLINE_USECASE`` from the archive) to find the feature store and the prediction log; the
model itself, its FeatureService and threshold come from the archive (a worker never opens the
model registry, so it needs no Postgres connection in the scale profile). An archive built for a
release drill carries faults (``serving.faults``): a delay before each batch, a 500 on every
Nth request.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from ts.torch_handler.base_handler import BaseHandler

from core.settings import local_path
from features.store import redis_online_store
from serving.explain import explain
from serving.faults import Faults
from serving.prediction_log import PredictionLog
from serving.requests import Record, RequestError, parse_request
from serving.scoring import SERVING_FILE, Scorer, ServingInfo

logger = logging.getLogger(__name__)

HOME_ENV = "LOOPLINE_HOME"
PROFILE_ENV, REDIS_ENV = "LOOPLINE_PROFILE", "LOOPLINE_REDIS_URL"
JSON = "application/json"


class LooplineHandler(BaseHandler):
    """Validates, looks up features, scores, explains and logs one TorchServe batch."""

    def initialize(self, context: Any) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        if not os.environ.get(HOME_ENV):
            raise RuntimeError(f"{HOME_ENV} is not set in the TorchServe worker environment")
        home = local_path(os.environ[HOME_ENV])  # a path or a file:// URI, as Settings takes it
        settings = json.loads((model_dir / SERVING_FILE).read_text())
        info = ServingInfo.from_model_dir(model_dir)
        self.context = context
        self.scorer = Scorer.load(model_dir, home, info, online_store=online_store(os.environ))
        self.max_body_bytes = int(settings.get("max_body_bytes", 256 << 10))
        self.max_items = int(settings.get("max_items_per_request", 512))
        # A drill's faults (serving.faults); None in normal operation: no work per request.
        self.faults = Faults.from_dict(settings["faults"]) if settings.get("faults") else None
        if self.faults:
            logger.warning("drill faults injected by this archive: %s", self.faults.to_dict())
        self.log = PredictionLog(
            home / "predictions" / info.model_name,
            prefix=f"{info.model_name}-{info.model_version}",
        ).start()
        self._close_log_on_sigterm()
        self.initialized = True
        logger.info("loaded %s %s from %s", info.model_name, info.model_version, model_dir)

    def _close_log_on_sigterm(self) -> None:
        """Stopping TorchServe sends SIGTERM to its process group: publish the open log file
        first, then die as the default action would. (Unregistering a version SIGKILLs its
        worker instead; that file is published by the next worker or by ``stop``.)"""
        previous = signal.getsignal(signal.SIGTERM)

        def close_and_exit(signum: int, frame: Any) -> None:
            self.log.close(timeout=2.0)
            signal.signal(signal.SIGTERM, previous if callable(previous) else signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, close_and_exit)
        atexit.register(self.log.close, 2.0)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str | bytes]:
        started = time.perf_counter()
        now = datetime.now(UTC)
        self.context = context
        responses: list[str | bytes | None] = [None] * len(data)
        accepted: list[tuple[int, list[Record], bool, bool]] = []
        failing = self.faults.strike(len(data)) if self.faults else ()
        for i, item in enumerate(data):
            context.set_response_content_type(i, JSON)
            if i in failing:
                responses[i] = self._refuse(context, i, item, self.faults.error(), now)
                continue
            try:
                records, single = parse_request(
                    _body(item), max_bytes=self.max_body_bytes, max_items=self.max_items, now=now
                )
            except RequestError as exc:
                responses[i] = self._refuse(context, i, item, exc, now)
                continue
            except Exception:  # a bug met validating one request must not fail the batch
                logger.exception("validating request %d failed", i)
                error = RequestError(
                    "the request could not be validated (a server error, logged)",
                    status=500,
                    error="internal_error",
                )
                responses[i] = self._refuse(context, i, item, error, now)
                continue
            accepted.append((i, records, single, _is_explain(context, i)))

        flat = [t for _, txs, _, _ in accepted for t in txs]
        if flat:
            found = self.scorer.lookup(flat)  # TTLs at each transaction's own time
            features = found.columns
            scores = self.scorer.score(features)
            outputs = self.scorer.responses(flat, scores)
            wanted = [k for _, txs, _, exp in accepted for k in [exp] * len(txs)]
            if any(wanted):
                rows = [j for j, w in enumerate(wanted) if w]
                picked = {c: [features[c][j] for j in rows] for c in self.scorer.columns}
                details = explain(self.scorer.module, self.scorer.preprocessor, picked)
                for j, detail in zip(rows, details, strict=True):
                    outputs[j] = {**outputs[j], "explanation": detail}
            latency_ms = round((time.perf_counter() - started) * 1000.0, 3)
            finite = bool(np.isfinite(scores.predictions).all())
            request_ids: list[str | None] = []
            endpoints: list[str] = []
            start = 0
            for i, txs, single, exp in accepted:
                part = outputs[start : start + len(txs)]
                answer = part[0] if single else part
                responses[i] = _body_json(answer) if finite and not exp else json.dumps(answer)
                request_ids += [_request_id(context, i)] * len(txs)
                endpoints += ["explanations" if exp else "predictions"] * len(txs)
                start += len(txs)
            # One line of columns per batch (serving.prediction_log): no dict per row here.
            layout = self.scorer.layout
            self.log.log_rows(
                {
                    "logged_at": now.isoformat(),
                    "status": 200,
                    "model_name": self.scorer.info.model_name,
                    "model_version": self.scorer.info.model_version,
                    "batch_size": len(flat),
                    "latency_ms": latency_ms,
                },
                {
                    "request_id": request_ids,
                    "endpoint": endpoints,
                    layout.id: [t[layout.id] for t in flat],
                    "request": flat,
                    "features": scores.inputs,
                    "missing_features": scores.missing_features,
                    "unknown_entities": scores.unknown_entities,
                    "feature_age_s": found.feature_age_s,  # per view: seconds, None if absent
                    layout.score: scores.predictions,
                    "decision": scores.decisions or [None] * len(flat),  # a regressor's none
                },
                len(flat),
            )
        return [r if r is not None else "" for r in responses]

    def _refuse(self, context: Any, i: int, item: Any, exc: RequestError, now: datetime) -> str:
        """Request ``i``'s status and JSON body for ``exc``; the refusal is logged."""
        context.set_response_status(exc.status, exc.error, i)
        self._log_refusal(context, i, item, exc, now)
        return json.dumps(exc.to_dict())

    def _log_refusal(
        self, context: Any, i: int, item: Any, exc: RequestError, now: datetime
    ) -> None:
        body = _body(item)
        if isinstance(body, bytes | bytearray):
            body = bytes(body[:512]).decode("utf-8", errors="replace")
        elif not isinstance(body, str):
            body = json.dumps(body, default=str)[:512]
        self.log.log(
            {
                "logged_at": now.isoformat(),
                "request_id": _request_id(context, i),
                "endpoint": "explanations" if _is_explain(context, i) else "predictions",
                "status": exc.status,
                "model_name": self.scorer.info.model_name,
                "model_version": self.scorer.info.model_version,
                "error": exc.to_dict(),
                "request_excerpt": body[:512],
            }
        )


def online_store(env: Mapping[str, str]) -> dict[str, Any] | None:
    """The scale profile's Redis online store, else None (the home's SQLite). TorchServe starts
    this process, so like LOOPLINE_HOME the profile comes from its environment: the variables
    core/settings.py reads, inherited from the process that started TorchServe."""
    if env.get(PROFILE_ENV) != "scale":
        return None
    return redis_online_store(env[REDIS_ENV])


def _body_json(answer: Any) -> bytes:
    """A prediction's response body through orjson (a tenth of ``json.dumps``'s time): the
    values ``json.dumps`` would write, spelt compactly in UTF-8 (decision 19). The handler
    sends it only answers of text, lists of text and finite floats; explanations and answers
    with a non-finite probability keep ``json.dumps``, as does anything orjson refuses."""
    try:
        return orjson.dumps(answer)
    except orjson.JSONEncodeError:
        return json.dumps(answer).encode("utf-8")


def _body(item: Any) -> Any:
    if isinstance(item, dict):
        body = item.get("body")
        return item.get("data") if body is None else body
    return item


def _is_explain(context: Any, i: int) -> bool:
    return context.get_request_header(i, "explain") == "True"


def _request_id(context: Any, i: int) -> str | None:
    ids = getattr(context, "request_ids", None) or {}
    return ids.get(i)
