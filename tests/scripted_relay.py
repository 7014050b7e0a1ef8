"""The standalone relay (page, ``/api``, ``/v1``) around a provider that answers each prompt with a fixed script of
events: every kind of the event model, and failures, with no upstream decoder in between.

Tests in Python build it with `scripted_relay_app`; the node tests (tests/js/) run it as a process:
``python -m tests.scripted_relay --port 8765``. The prompt (the last user message) picks the script; a reply to a
``tool`` message is the tool-answer script; any other prompt is echoed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence

from aiohttp import web

from server.chat_request import ChatRequest
from server.config import Config
from server.events import Delta, Done, Error, Event, Reasoning, Refusal, ToolCallDelta, Usage

from .scripted import relay_host

USAGE = Usage(prompt_tokens=9, completion_tokens=4, total_tokens=13)

SCRIPTS: dict[str, list[list[Event]]] = {
    "text": [[Delta("Hello")], [Delta(", wörld")], [Delta(" 🦀")], [Done("stop", USAGE)]],
    "reasoning": [
        [Reasoning("The user asks")],
        [Reasoning(" for 2 + 2.")],
        [Delta("It is ")],
        [Delta("4.")],
        [Done("stop", USAGE)],
    ],
    "tool": [
        [Delta("Let me look.")],
        [ToolCallDelta(0, "call_weather_1", "get_weather", "")],
        [ToolCallDelta(0, arguments='{"city": ')],
        [ToolCallDelta(0, arguments='"Paris"}')],
        [Done("tool_calls", USAGE)],
    ],
    "tool-answer": [[Delta("It is sunny in Paris.")], [Done("stop", USAGE)]],
    "refusal": [[Refusal("I can't")], [Refusal(" help with that.")], [Done("stop", USAGE)]],
    "error": [[Delta("Partial")], [Delta(" answer")], [Error("upstream_error", "the model provider failed")]],
    "error-first": [[Error("upstream_error", "the model provider failed")]],
    "slow": [*([Delta(f"{i} ")] for i in range(40)), [Done("stop", USAGE)]],
    "quiet": [[Delta("a")], [Delta("b")], [Done("stop", USAGE)]],
}
# Seconds between the batches of these scripts (others use the provider's pause): long enough to cut and resume,
# or for heartbeats to go out between the events.
SLOW_PAUSE = {"slow": 0.08, "quiet": 0.3}


class ScriptedByPrompt:
    """Plays `SCRIPTS[prompt]`, one batch at a time (a loop turn apart, so each batch is its own write)."""

    name = "scripted"

    def __init__(self, pause: float = 0.0) -> None:
        self.pause = pause
        self.requests: list[ChatRequest] = []

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        self.requests.append(request)
        prompt = "tool-answer" if request.messages[-1].role == "tool" else request.last_user_text
        script = SCRIPTS.get(prompt) or [[Delta(f"You said: {prompt}")], [Done("stop", None)]]
        pause = SLOW_PAUSE.get(prompt, self.pause)
        for batch in script:
            await asyncio.sleep(pause)
            yield batch

    async def aclose(self) -> None:
        return None


def scripted_relay_app(config: Config, provider: object) -> web.Application:
    """The standalone relay's routes (``/api``, ``/v1``) around `provider` (without the page)."""
    host, _ = relay_host(config, provider, openai_prefix="/v1")
    return host


async def _serve(port: int, pause: float, heartbeat: float) -> None:
    config = Config(provider="demo", limits_enabled=False, heartbeat=heartbeat)
    runner = web.AppRunner(scripted_relay_app(config, ScriptedByPrompt(pause)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    host, bound = runner.addresses[0][:2]
    # The one line a test reads to learn the port (with --port 0, the kernel picks it).
    print(f"scripted relay at http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description="The relay around a provider that plays fixed scripts")
    parser.add_argument("--port", type=int, default=8765, help="0: any free port (printed)")
    parser.add_argument("--pause", type=float, default=0.001, help="seconds between batches")
    parser.add_argument("--heartbeat", type=float, default=15.0, help="seconds between heartbeats (0 = off)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.pause, args.heartbeat))


if __name__ == "__main__":
    main()
