"""The two-hop setup users build today, as bench_serving's peer: a FastAPI model endpoint that
asks ``feast serve`` (Feast's Python feature server, same repo and home) for the FeatureService's
features over HTTP, then runs the same model. One request is one transaction.

Runs under uvicorn in the peer's environment (``benchmarks/.venv-peer``, for httpx), configured
by environment variables: ``PEER_MODEL_DIR``, ``PEER_FEAST_URL``, ``PEER_FEATURE_SERVICE``,
``PEER_MODEL_VERSION``, ``PEER_THRESHOLD``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
import torch
from fastapi import FastAPI
from pydantic import BaseModel

from models.artifact import load_model
from models.evaluate import predict as predict_scores


class Transaction(BaseModel):
    transaction_id: str
    card_id: str
    merchant_id: str
    amount: float
    channel: str
    country: str
    timestamp: datetime


state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    torch.set_num_threads(1)  # as in Loopline's TorchServe worker (OMP_NUM_THREADS=1)
    module, preprocessor = load_model(os.environ["PEER_MODEL_DIR"])
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=os.environ["PEER_FEAST_URL"], limits=limits, timeout=30.0
    ) as feast:
        state.update(
            feast=feast,
            module=module,
            preprocessor=preprocessor,
            service=os.environ.get("PEER_FEATURE_SERVICE", "fraud_model_v1"),
            version=os.environ.get("PEER_MODEL_VERSION", "peer"),
            threshold=float(os.environ.get("PEER_THRESHOLD", "0.5")),
        )
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/predict")
async def predict(tx: Transaction) -> dict[str, Any]:
    lookup = {
        "feature_service": state["service"],
        "entities": {
            "card_id": [tx.card_id],
            "merchant_id": [tx.merchant_id],
            "amount": [tx.amount],
            "country": [tx.country],
            "transaction_timestamp": [tx.timestamp.isoformat()],
        },
    }
    response = await state["feast"].post("/get-online-features", json=lookup)
    response.raise_for_status()
    answer = response.json()
    names = answer["metadata"]["feature_names"]
    row = {name: result["values"][0] for name, result in zip(names, answer["results"], strict=True)}
    row.update(amount=tx.amount, channel=tx.channel, country=tx.country)
    probability = float(predict_scores(state["module"], state["preprocessor"], [row])[0])
    return {
        "transaction_id": tx.transaction_id,
        "fraud_probability": probability,
        "decision": "decline" if probability >= state["threshold"] else "approve",
        "model_version": state["version"],
    }
