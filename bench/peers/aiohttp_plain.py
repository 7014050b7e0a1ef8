"""Peer: a plain aiohttp ``StreamResponse`` loop, the pattern of aiohttp's own docs and most blog posts."""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web
from openai import AsyncOpenAI

from bench.peers._common import BACKLOG, HEARTBEAT, MODEL, UPSTREAM, port_from_argv, tokens, use_uvloop

client = AsyncOpenAI(base_url=UPSTREAM, api_key="bench")


async def _start(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


async def stream(request: web.Request) -> web.StreamResponse:
    n = int(request.query.get("n", "0"))
    delay = float(request.query.get("delay", "0"))
    response = await _start(request)
    for token in tokens()[:n]:
        if delay:
            await asyncio.sleep(delay)
        await response.write(f"data: {json.dumps({'content': token})}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def idle(request: web.Request) -> web.StreamResponse:
    response = await _start(request)
    while True:
        await response.write(b": ping\n\n")
        await asyncio.sleep(HEARTBEAT)


async def relay(request: web.Request) -> web.StreamResponse:
    response = await _start(request)
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": request.query["prompt"]}], stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            await response.write(f"data: {json.dumps({'content': chunk.choices[0].delta.content})}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
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
