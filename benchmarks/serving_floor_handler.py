"""The serving benchmark's floor: a TorchServe handler that parses each request body and answers
a constant JSON, archived like Loopline's (same model files, same batching settings), so the
difference to Loopline's endpoint is the handler's own work: validation, feature lookup, model
and prediction log."""

from __future__ import annotations

import json
from typing import Any

from ts.torch_handler.base_handler import BaseHandler

ANSWER = json.dumps({"fraud_probability": 0.0, "decision": "approve", "model_version": "floor"})


class FloorHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        for item in data:
            body = item.get("body") if item.get("body") is not None else item.get("data")
            json.loads(body)
        return [ANSWER] * len(data)
