"""The built-in demo model: a simulated reply, streamed token by token, with no API key and no network.

The reply is deterministic (the same prompt gives the same tokens), quotes the prompt so a person sees the round
trip, and says plainly that it is simulated. So that the page can show every kind of event without a key:

- the model ``llm-relay-demo-reasoner`` (`DEMO_REASONER_MODEL`) streams a few sentences of simulated reasoning
  before its answer;
- a request that declares ``tools`` and ends with a user message is answered, by either demo model, with a call
  of its first tool, or of the one ``tool_choice`` names (arguments ``{"query": <the prompt>}``, streamed in
  fragments; finish reason ``tool_calls``); ``tool_choice: "none"`` gets text;
  a request that ends with the tool's result is answered in text that quotes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import re
import weakref
from collections.abc import AsyncGenerator, Iterator, Sequence

from ..chat_request import ChatRequest
from ..events import Delta, Done, Event, Reasoning, ToolCallDelta, Usage

# The demo model that streams simulated reasoning before its answer, offered beside the default demo model.
DEMO_REASONER_MODEL = "llm-relay-demo-reasoner"

_TOKEN = re.compile(r"\s*\S+|\s+")
_QUOTE_LIMIT = 200
_BATCH_AT_FULL_SPEED = 64

_BODY = (
    "This reply is simulated by llm-relay's built-in demo model: no real model was called and no API key was "
    "used. It exists so that you can watch a reply arrive token by token, exactly as it would from an "
    "OpenAI-compatible upstream.\n\n"
    "Each token you see left the server as its own frame the moment it was produced. In a browser the page "
    "reads them through EventSource as Server-Sent Events, where every event carries an id and the end of the "
    "reply is an event named done, so the page can close the connection instead of letting the browser "
    "reconnect and start a second generation. A fetch client can ask for NDJSON instead and read one JSON "
    "object per line from the response body.\n\n"
    "Behind the scenes the relay watches the client's connection while it waits for the model. If you press "
    "Stop or close the tab, the upstream request is closed within milliseconds, even before the first token, so "
    "nobody pays for words that nobody will read. A client that stops reading is dropped after the write "
    "timeout, so it cannot make the server hold an ever-growing buffer, and every event is encoded so that no "
    "text, however strange, can forge an extra event.\n\n"
    "To relay a real model, start the server with OPENAI_API_KEY set, and OPENAI_BASE_URL for any "
    "OpenAI-compatible server such as vLLM, Ollama or DeepSeek. Until then, ask me anything: I will quote your "
    "question and stream this same explanation again, at a steady pace you can change with --demo-delay."
)


# The body is the same for every reply: tokenized once, shared by every stream (an idle stream then holds only
# its opening's few tokens, not a list of a few hundred).
_BODY_TOKENS: tuple[str, ...] = tuple(_TOKEN.findall("\n\n" + _BODY))


def _quoted(text: str) -> str:
    text = " ".join(text.split())
    return text[:_QUOTE_LIMIT].rstrip() + "…" if len(text) > _QUOTE_LIMIT else text


def _opening(request: ChatRequest) -> str:
    last = request.messages[-1] if request.messages else None
    if last is not None and last.role == "tool":
        return f"The tool answered: “{_quoted(last.content)}”."
    prompt = _quoted(request.last_user_text)
    turn = sum(1 for m in request.messages if m.role == "user")
    opening = f"You asked: “{prompt}”"
    if turn > 1:
        opening += f" (your message {turn} in this conversation)"
    return opening + "."


def demo_reply(request: ChatRequest) -> str:
    """The full text the demo model answers `request` with."""
    return _opening(request) + "\n\n" + _BODY


def demo_tokens(request: ChatRequest) -> list[str]:
    """The tokens of `demo_reply`, in order; joined, they are the reply."""
    return [*_TOKEN.findall(_opening(request)), *_BODY_TOKENS]


def _reasoning_tokens(request: ChatRequest) -> list[str]:
    """The simulated thinking of the reasoner demo model (it quotes the prompt, so it differs per request)."""
    thinking = (
        f"The user wrote “{_quoted(request.last_user_text)}”. I am the demo reasoner, so there is nothing to work "
        "out: I will say that the reply is simulated, and stream it token by token. This reasoning travels as its "
        "own kind of event, which the page shows apart from the answer."
    )
    return _TOKEN.findall(thinking)


def _tool_call(request: ChatRequest) -> list[ToolCallDelta]:
    """The demo's call of the tool `tool_choice` names, else of the first tool: its id and name first, then the
    arguments in a few fragments."""
    assert request.tools
    choice = request.tool_choice
    name = str(choice["function"]["name"] if isinstance(choice, dict) else request.tools[0]["function"]["name"])
    arguments = json.dumps({"query": _quoted(request.last_user_text)}, ensure_ascii=False)
    call_id = "call_demo_" + hashlib.sha256(arguments.encode()).hexdigest()[:16]
    pieces = [arguments[i : i + 8] for i in range(0, len(arguments), 8)]
    return [ToolCallDelta(0, call_id, name), *(ToolCallDelta(0, arguments=piece) for piece in pieces)]


def demo_events(request: ChatRequest) -> tuple[list[Event], list[str], str]:
    """What the demo model streams for `request` before its answer's tokens, those tokens, and its finish reason."""
    before: list[Event] = []
    if request.model == DEMO_REASONER_MODEL:
        before.extend(Reasoning(t) for t in _reasoning_tokens(request))
    last = request.messages[-1] if request.messages else None
    if request.tools and request.tool_choice != "none" and last is not None and last.role == "user":
        before.extend(_tool_call(request))
        return before, [], "tool_calls"
    return before, _TOKEN.findall(_opening(request)), "stop"


def _reply(request: ChatRequest) -> tuple[Iterator[Event], int, Done]:
    """The events the demo model streams for `request` (the token limit applied), their count, and its `Done`."""
    before, opening, finish = demo_events(request)
    body = _BODY_TOKENS if finish == "stop" else ()
    count = len(before) + len(opening) + len(body)
    limit = request.token_limit
    if limit is not None and count > limit:
        count = limit
        finish = "length"
    tokens = itertools.islice(itertools.chain(before, map(Delta, opening), map(Delta, body)), count)
    prompt_tokens = sum(len(_TOKEN.findall(m.content)) for m in request.messages)
    return tokens, count, Done(finish, Usage(prompt_tokens, count, prompt_tokens + count))


class _Pacer:
    """Wakes every stream whose next token falls due in the same tick with one timer.

    A thousand paced streams make 50,000 tokens a second. Alone, a timer per token per stream (a timer handle, the
    loop's timer heap, a callback) measured ~2 µs per token and this ~1 µs; in the paced bench the CPU stayed
    within its noise, while the first-frame p99 of 1,000 streams fell from ~106 to ~55 ms (A/B, 4 pairs). A token
    is due at most one tick late.

    A tick is a millisecond, or a thousandth of the delay when that is longer (`tick_for`): a slow pace (the
    bench's idle streams wait an hour for their first token) then shares one timer between every stream started
    in the same second or so, instead of one timer, list and two table entries per stream (~0.5 KiB each), for at
    most 0.1% of the delay's lateness.
    """

    # No reference to its loop: the provider keeps one pacer per loop in a WeakKeyDictionary, whose keys a value
    # holding them would keep alive (while a stream waits, its timer does refer to the loop).
    __slots__ = ("_timers", "_waiting")
    TICK_MS = 1

    def __init__(self) -> None:
        # By due time in whole milliseconds (a multiple of the tick of the streams that wait for it).
        self._waiting: dict[int, list[asyncio.Future[None]]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}

    @classmethod
    def tick_for(cls, delay: float) -> int:
        """The tick (ms) of streams paced at one token per `delay` seconds: 1 ms, or delay/1000 if longer."""
        return max(cls.TICK_MS, int(delay))

    @staticmethod
    def _key(due: float, tick: int) -> int:
        return math.ceil(due * 1000 / tick) * tick

    def wake_at(self, loop: asyncio.AbstractEventLoop, due: float, tick: int = TICK_MS) -> asyncio.Future[None]:
        """A future that the end of `due`'s tick (ms) resolves; whoever stops waiting for it before then calls
        `forget`.

        A future to await rather than a coroutine that waits: the generator below awaits it directly, one
        coroutine less to make, resume and suspend per token (~0.5 CPU-µs per frame at 1,000 paced streams).
        """
        key = self._key(due, tick)
        waiting = self._waiting.get(key)
        if waiting is None:
            waiting = self._waiting[key] = []
            self._timers[key] = loop.call_at(key / 1000, self._fire, key)
        woken: asyncio.Future[None] = loop.create_future()
        waiting.append(woken)
        return woken

    def forget(self, woken: asyncio.Future[None], due: float, tick: int = TICK_MS) -> None:
        """The waiter of `woken` left (cancelled: its stream ended): nothing of it stays, however far its tick."""
        if woken.done() and not woken.cancelled():
            return  # its tick came: nothing is left of it
        key = self._key(due, tick)
        waiting = self._waiting.get(key)
        if waiting is None or woken not in waiting:  # cancelled after its tick had fired
            return
        waiting.remove(woken)
        if not waiting:
            del self._waiting[key]
            self._timers.pop(key).cancel()

    def _fire(self, key: int) -> None:
        del self._timers[key]
        for woken in self._waiting.pop(key):
            if not woken.done():
                woken.set_result(None)


class DemoProvider:
    """Streams `demo_reply` at one token per `delay` seconds (0: as fast as the relay takes them)."""

    name = "demo"

    def __init__(self, delay: float = 0.03) -> None:
        self.delay = delay
        self._pacers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pacer] = weakref.WeakKeyDictionary()

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        if self.delay <= 0:
            tokens, count, done = _reply(request)
            while batch := list(itertools.islice(tokens, _BATCH_AT_FULL_SPEED)):
                yield batch
                await asyncio.sleep(0)
            yield [done]
            return
        loop = asyncio.get_running_loop()
        pacer = self._pacers.get(loop)
        if pacer is None:
            pacer = self._pacers[loop] = _Pacer()
        delay = self.delay
        tick = _Pacer.tick_for(delay)
        # Each token waits until its due time rather than for a fixed delay, so the pace does not drift when the
        # loop is busy: a late token is followed by an earlier one.
        due = loop.time() + delay
        # The first token's wait comes before the reply is built: a stream waiting for it (an hour, in the idle
        # bench) holds only its request meanwhile, not the reply's tokens, iterators and final event. (One loop
        # for every wait: a coroutine of its own would be one more suspended frame per open stream.)
        reply: tuple[Iterator[Event], int, Done] | None = None
        index = 0
        while True:
            if due > loop.time() and (reply is not None or request.token_limit != 0):
                woken = pacer.wake_at(loop, due, tick)
                try:
                    await woken
                except BaseException:
                    pacer.forget(woken, due, tick)
                    raise
            if reply is None:
                reply = _reply(request)
            tokens, count, done = reply
            if not count:
                yield [done]
                return
            yield (next(tokens), done) if index == count - 1 else (next(tokens),)
            index += 1
            if index == count:
                return
            due += delay

    async def aclose(self) -> None:
        return None
