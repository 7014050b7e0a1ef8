"""Peer: sse-starlette's ``EventSourceResponse`` on uvicorn, as in its README (an async generator of dicts)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator

import uvicorn
from openai import AsyncOpenAI
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from bench.peers._common import BACKLOG, HEARTBEAT, MODEL, UPSTREAM, UVLOOP, port_from_argv, tokens

client = AsyncOpenAI(base_url=UPSTREAM, api_key="bench")


async def stream(request: Request) -> EventSourceResponse:
    n = int(request.query_params.get("n", "0"))
    delay = float(request.query_params.get("delay", "0"))

    async def events() -> AsyncIterator[dict[str, str]]:
        for token in tokens()[:n]:
            if delay:
                await asyncio.sleep(delay)
            yield {"data": json.dumps({"content": token})}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events())


async def idle(request: Request) -> EventSourceResponse:
    async def nothing() -> AsyncIterator[dict[str, str]]:
        while True:
            await asyncio.sleep(3600)
            yield {"data": "still here"}

    return EventSourceResponse(nothing(), ping=HEARTBEAT)


async def relay(request: Request) -> EventSourceResponse:
    prompt = request.query_params["prompt"]

    async def events() -> AsyncIterator[dict[str, str]]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield {"data": json.dumps({"content": chunk.choices[0].delta.content})}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events())


app = Starlette(routes=[Route("/stream", stream), Route("/idle", idle), Route("/relay", relay)])


def main() -> None:
    port = port_from_argv(sys.argv[1:])
    loop = "uvloop" if UVLOOP else "asyncio"
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop=loop, backlog=BACKLOG)


if __name__ == "__main__":
    main()
