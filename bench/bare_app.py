"""The yardstick of `bench/api_latency.py`: a bare FastAPI endpoint returning a constant JSON,
served by uvicorn exactly as the tuner API is."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def constant() -> dict[str, str]:
    return {"status": "ok"}
