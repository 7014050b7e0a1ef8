"""Peer: aiohttp-sse's ``sse_response``, as in its README."""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web
from aiohttp_sse import sse_response
from openai import AsyncOpenAI

from bench.peers._common import BACKLOG, HEARTBEAT, MODEL, UPSTREAM, port_from_argv, tokens, use_uvloop

client = AsyncOpenAI(base_url=UPSTREAM, api_key="bench")


async def stream(request: web.Request) -> web.StreamResponse:
    n = int(request.query.get("n", "0"))
    delay = float(request.query.get("delay", "0"))
    async with sse_response(request) as response:
        for token in tokens()[:n]:
            if delay:
                await asyncio.sleep(delay)
            await response.send(json.dumps({"content": token}))
        await response.send("[DONE]")
    return response


async def idle(request: web.Request) -> web.StreamResponse:
    # aiohttp-sse's own ping task sends the heartbeats; the handler waits until the client leaves.
    async with sse_response(request, ping_interval=HEARTBEAT) as response:
        await response.wait()
    return response


async def relay(request: web.Request) -> web.StreamResponse:
    async with sse_response(request) as response:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": request.query["prompt"]}], stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                await response.send(json.dumps({"content": chunk.choices[0].delta.content}))
        await response.send("[DONE]")
    return response


def main() -> None:
    use_uvloop()
    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/idle", idle)
    app.router.add_get("/relay", relay)
    web.run_app(app, host="127.0.0.1", port=port_from_argv(sys.argv[1:]), backlog=BACKLOG, access_log=None, print=None)


if __name__ == "__main__":
    main()
