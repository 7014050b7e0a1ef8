"""Peer: Flask's ``stream_with_context`` generator on gunicorn's thread worker, the Flask docs' streaming pattern.

Served by ``gunicorn -k gthread``: a WSGI generator holds a thread for the whole stream, so the runner gives the
worker as many threads as the scenario has streams. Flask is synchronous, so its relay uses the synchronous
``openai.OpenAI`` client, as Flask tutorials do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from flask import Flask, Response, request, stream_with_context
from openai import OpenAI

from bench.peers._common import HEARTBEAT, MODEL, UPSTREAM, tokens

app = Flask(__name__)
client = OpenAI(base_url=UPSTREAM, api_key="bench")


@app.get("/stream")
def stream() -> Response:
    n = int(request.args.get("n", "0"))
    delay = float(request.args.get("delay", "0"))

    def generate() -> Iterator[str]:
        for token in tokens()[:n]:
            if delay:
                time.sleep(delay)
            yield f"data: {json.dumps({'content': token})}\n\n"
        yield "data: [DONE]\n\n"

    return Response(stream_with_context(generate()), mimetype="text/event-stream")


@app.get("/idle")
def idle() -> Response:
    def pings() -> Iterator[str]:
        while True:
            yield ": ping\n\n"
            time.sleep(HEARTBEAT)

    return Response(stream_with_context(pings()), mimetype="text/event-stream")


@app.get("/relay")
def relay() -> Response:
    prompt = request.args["prompt"]

    def generate() -> Iterator[str]:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield f"data: {json.dumps({'content': chunk.choices[0].delta.content})}\n\n"
        yield "data: [DONE]\n\n"

    return Response(stream_with_context(generate()), mimetype="text/event-stream")
