"""Peer: FastAPI's ``StreamingResponse`` of NDJSON lines on uvicorn, the FastAPI tutorial's streaming pattern."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from openai import AsyncOpenAI

from bench.peers._common import BACKLOG, HEARTBEAT, MODEL, UPSTREAM, UVLOOP, port_from_argv, tokens

app = FastAPI()
client = AsyncOpenAI(base_url=UPSTREAM, api_key="bench")


@app.get("/stream")
async def stream(n: int = 0, delay: float = 0.0) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        for token in tokens()[:n]:
            if delay:
                await asyncio.sleep(delay)
            yield json.dumps({"content": token}) + "\n"
        yield json.dumps({"done": True}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@app.get("/idle")
async def idle() -> StreamingResponse:
    async def pings() -> AsyncIterator[str]:
        while True:
            yield '{"type":"ping"}\n'
            await asyncio.sleep(HEARTBEAT)

    return StreamingResponse(pings(), media_type="application/x-ndjson")


@app.get("/relay")
async def relay(prompt: str) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield json.dumps({"content": chunk.choices[0].delta.content}) + "\n"
        yield json.dumps({"done": True}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def main() -> None:
    port = port_from_argv(sys.argv[1:])
    loop = "uvloop" if UVLOOP else "asyncio"
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop=loop, backlog=BACKLOG)


if __name__ == "__main__":
    main()
