"""The baseline for benchmarks/ingest.py: a FastAPI endpoint that only parses and answers 202."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI()


@app.post("/webhooks/clopos")
async def bare(request: Request) -> JSONResponse:
    document = json.loads(await request.body())
    return JSONResponse({"accepted": True, "id": document.get("data", {}).get("id")}, 202)
