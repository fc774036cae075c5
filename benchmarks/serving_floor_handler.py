"""The serving benchmark's floor: a TorchServe handler that parses each request body and answers
a constant JSON, archived like Loopline's (same model files, same batching settings), so the
difference to Loopline's endpoint is the handler's own work: validation, feature lookup, model
and prediction log. The constant answer has the active use case's score field (and a
classifier's decision word), as Loopline's answer has."""

from __future__ import annotations

import json
from typing import Any

from ts.torch_handler.base_handler import BaseHandler


def constant_answer() -> str:
    """The floor's answer for the active use case (the fraud demo's: ``fraud_probability``
    0.0, ``approve``)."""
    from core.usecase import active
    from models.tasks import of as task_of

    task = active().task
    answer: dict[str, Any] = {task.score: 0.0}
    if task_of(task.type).has_threshold:
        answer["decision"] = task.decision.negative
    answer["model_version"] = "floor"
    return json.dumps(answer)


class FloorHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        self.answer = constant_answer()
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        for item in data:
            body = item.get("body") if item.get("body") is not None else item.get("data")
            json.loads(body)
        return [self.answer] * len(data)
