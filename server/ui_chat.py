"""The AI SDK's chat endpoint: ``POST /api/ui-chat`` (what ``useChat`` posts) and ``GET /api/ui-chat/{chatId}/stream``
(what its ``resume`` option calls).

``POST`` takes ``useChat``'s body (`server/ui_messages.py`) the same way as ``POST /api/chat`` (`server/intake.py`:
origin, identity, admission, then the body), starts a resumable `Generation` and answers with the UI message
stream (`server/ui_stream.py`), through a `Reader` like every other stream. It records the stream as its chat's
running stream in `ChatStreams`, and a new request of the same chat stops the previous stream (a chat has one reply
being written at a time).

``GET .../{chatId}/stream`` is ``DefaultChatTransport.reconnectToStream``: the chat's running stream, replayed from
its start (the transport treats a resumed stream as a replay), or 204 when the chat has none. A chat is looked up
under the client's identity too (its API key, or its address), so a chat id alone never reads another client's
reply.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web

from . import chat_request
from .chat_request import ChatRequest
from .errors import RelayError, ResumeUnavailable
from .framing import UIMessageStreamFraming
from .generation import Generation
from .handlers import run_reader, start_generation
from .intake import admit_then, check_origin, expect_handler, read_json_body
from .openai_request import decode_json_object
from .reader import Reader
from .responses import error_response
from .state import RELAY
from .ui_messages import parse_chat_id, ui_chat_body
from .ui_stream import UI_STREAM_HEADERS

__all__ = ["UI_CHATS", "ChatStreams", "add_ui_chat_routes", "ui_chat", "ui_chat_stream"]

log = logging.getLogger("llm_relay.ui_chat")

# Chats whose running stream is remembered, at most: past it, entries of streams that ended go first, then the
# oldest. An entry is two short strings and a stream id.
MAX_CHATS = 10_000


class ChatStreams:
    """The running stream of each chat, by (client, chat id): bounded, and an entry goes when its stream has ended.

    `running(stream_id)` says whether a stream still runs (the registry knows); entries are dropped when a reader
    of theirs sees the end, when a lookup finds the stream ended, and when the table is full.
    """

    __slots__ = ("_max", "_running", "_streams")

    def __init__(self, running: Callable[[str], bool], max_chats: int = MAX_CHATS) -> None:
        self._streams: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._running = running
        self._max = max(1, max_chats)

    def __len__(self) -> int:
        return len(self._streams)

    def set(self, client: str, chat_id: str, stream_id: str) -> str | None:
        """Make `stream_id` the chat's running stream; returns the stream it replaces, if any."""
        key = (client, chat_id)
        previous = self._streams.pop(key, None)
        if len(self._streams) >= self._max:
            for stale in [k for k, s in self._streams.items() if not self._running(s)]:
                del self._streams[stale]
            while len(self._streams) >= self._max:
                self._streams.popitem(last=False)
        self._streams[key] = stream_id
        return previous

    def get(self, client: str, chat_id: str) -> str | None:
        """The chat's running stream, if it has one."""
        key = (client, chat_id)
        stream_id = self._streams.get(key)
        if stream_id is not None and not self._running(stream_id):
            del self._streams[key]
            return None
        return stream_id

    def drop(self, client: str, chat_id: str, stream_id: str) -> None:
        """Forget the chat's stream if it still is `stream_id` (a newer one of the same chat stays)."""
        key = (client, chat_id)
        if self._streams.get(key) == stream_id:
            del self._streams[key]


UI_CHATS = web.AppKey("llm_relay_ui_chats", ChatStreams)


async def ui_chat(request: web.Request) -> web.StreamResponse:
    """``POST /api/ui-chat``: ``useChat``'s request, answered with the UI message stream."""
    state = request.app[RELAY]
    chats = request.app[UI_CHATS]

    async def take(request: web.Request) -> tuple[str, ChatRequest]:
        chat = ui_chat_body(decode_json_object(await read_json_body(request, state)))
        # Resumable unless the client says otherwise (``resume: false`` in the transport's ``body``): the resume
        # option of useChat needs the reply to outlive a reload.
        body = {"resume": True, **chat.body}
        return chat.chat_id, chat_request.parse_chat_body(body, state.rules)

    admitted = await admit_then(request, state, take, lambda taken: taken[1])
    if isinstance(admitted, web.StreamResponse):
        return admitted
    (chat_id, chat), client = admitted.taken, admitted.client
    generation = await start_generation(state, chat, admitted.admission, admitted.reservation, framing="ui")
    replaced = chats.set(client, chat_id, generation.id)
    previous = None if replaced is None else state.streams.get(replaced)
    if previous is not None:
        state.streams.stop(previous)  # a chat has one reply being written at a time
    return await _read(request, generation, client, chat_id, headers={**admitted.headers, **UI_STREAM_HEADERS})


async def ui_chat_stream(request: web.Request) -> web.StreamResponse:
    """``GET /api/ui-chat/{chat_id}/stream``: the chat's running stream from its start, or 204."""
    state = request.app[RELAY]
    chats = request.app[UI_CHATS]
    try:
        check_origin(request, state.origin_policy)
        client = state.identify(request)
        chat_id = parse_chat_id(request.match_info["chat_id"])
        stream_id = chats.get(client, chat_id)
        generation = None if stream_id is None else state.streams.get(stream_id)
        if generation is None or generation.ended:
            # No reply is being written for this chat: the transport's "nothing to resume".
            return web.Response(status=204, headers={"Cache-Control": "no-store"})
        if generation.log.first_seq > 1:
            raise ResumeUnavailable("the start of this chat's reply is no longer kept")
    except RelayError as error:
        return error_response(error)
    return await _read(
        request, generation, client, chat_id, headers=dict(UI_STREAM_HEADERS), prepare_now=True, resumed=True
    )


async def _read(
    request: web.Request,
    generation: Generation,
    client: str,
    chat_id: str,
    *,
    headers: dict[str, str],
    prepare_now: bool = False,
    resumed: bool = False,
) -> web.StreamResponse:
    state = request.app[RELAY]
    reader = Reader(
        request,
        generation,
        state.streams,
        UIMessageStreamFraming(),  # its own: the parts it has opened are this response's
        state.reader_settings,
        prepare_now=prepare_now,
        headers=headers,
    )
    try:
        return await run_reader(request, reader, resumed=resumed)
    finally:
        if generation.ended:
            request.app[UI_CHATS].drop(client, chat_id, generation.id)


def add_ui_chat_routes(api: web.Application) -> list[web.ResourceRoute]:
    """Add the two routes to the relay API `api` (its state is already set); returns them (for CORS)."""
    streams = api[RELAY].streams

    def running(stream_id: str) -> bool:
        generation = streams.get(stream_id)
        return generation is not None and not generation.ended

    api[UI_CHATS] = ChatStreams(running)
    chat = api.router.add_resource("/ui-chat", name="ui-chat")
    resume = api.router.add_resource("/ui-chat/{chat_id}/stream", name="ui-chat-stream")
    return [
        chat.add_route("POST", ui_chat, expect_handler=expect_handler),
        resume.add_route("GET", ui_chat_stream, expect_handler=expect_handler),
    ]
