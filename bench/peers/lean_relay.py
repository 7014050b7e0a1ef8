"""Peer: the relay a skilled engineer writes in an afternoon with aiohttp alone (issue 17's "lean relay").

One shared ``aiohttp.ClientSession`` to the upstream, its SSE body read as raw lines, each ``data:`` line parsed
with ``json.loads``, the text written with ``StreamResponse.write``, and the upstream response released in a
``finally`` (so a client that leaves closes the upstream connection at its next write). No validation, no
admission, no timeouts, no resume, no heartbeats: what it does not do is what ours adds.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from bench.peers._common import BACKLOG, MODEL, UPSTREAM, port_from_argv, use_uvloop

SESSION = web.AppKey("session", aiohttp.ClientSession)


async def relay(request: web.Request) -> web.StreamResponse:
    body = {"model": MODEL, "messages": [{"role": "user", "content": request.query["prompt"]}], "stream": True}
    upstream = await request.app[SESSION].post(f"{UPSTREAM}/chat/completions", json=body)
    try:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        async for line in upstream.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                continue  # read on to the body's end, so the connection goes back to the pool
            choices = json.loads(data).get("choices")
            text = choices[0]["delta"].get("content") if choices else None
            if text:
                await response.write(b"data: %s\n\n" % json.dumps({"content": text}).encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    finally:
        # After the body's end the connection is already back in the pool and this does nothing; before it (the
        # client left: a write raised), it closes the upstream connection, which stops the upstream's generation.
        upstream.close()


async def _session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[SESSION].close()


def main() -> None:
    use_uvloop()
    app = web.Application()
    app.cleanup_ctx.append(_session)
    app.router.add_get("/relay", relay)
    port = port_from_argv(sys.argv[1:])
    web.run_app(app, host="127.0.0.1", port=port, backlog=BACKLOG, access_log=None, print=None)


if __name__ == "__main__":
    main()
