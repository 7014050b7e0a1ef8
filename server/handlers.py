"""HTTP handlers: take the request in (`server/intake.py`: origin, identity, admission, then the body), start a
`Generation` and read it with a `Reader`; resume and stop streams.

Everything that can be refused is refused here, before a byte of the response is written, so that every refusal
is a proper status with a JSON body ``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from .admission import Admission
from .budget_backends import BudgetReservation
from .chat_request import ChatRequest
from .errors import (
    RelayError,
    RequestError,
    ResumeUnavailable,
)
from .framing import Framing
from .generation import Generation, Outcome
from .intake import accept_chat, check_host, check_origin, negotiated_framing, read_body
from .logs import READING, ReadingRequest
from .reader import Reader
from .registry import StreamRegistry
from .responses import Respond, error_response, refusal_for
from .resume import is_stream_id, parse_after, parse_last_event_id
from .state import RELAY, RelayState


async def chat(request: web.Request) -> web.StreamResponse:
    """``GET /chat?prompt=...`` (EventSource) and ``POST /chat`` with a JSON body (fetch) start a generation; a
    GET with ``Last-Event-ID`` is a reconnecting EventSource, which resumes its stream instead."""
    state = request.app[RELAY]
    if request.method == hdrs.METH_GET and hdrs.LAST_EVENT_ID in request.headers:
        # Only a reconnecting EventSource sends Last-Event-ID: never a second generation, but the same one from
        # after the last event it saw (WHATWG HTML §9.2.3), or a defined error.
        try:
            check_origin(request, state.origin_policy)
            framing = negotiated_framing(request)
            point = parse_last_event_id(request.headers[hdrs.LAST_EVENT_ID])
            state.identify(request)
            return await _resume(request, point.stream_id, point.after, framing)
        except RelayError as error:
            return error_response(error)
    accepted = await accept_chat(request, state)  # identified and admitted before the body is read
    if isinstance(accepted, web.StreamResponse):
        return accepted
    framing, chat_req = accepted.taken
    generation = await start_generation(state, chat_req, accepted.admission, accepted.reservation, framing=framing.name)
    # A resumable stream opens at once (its id first), unless it ended as it started (shutdown had begun): then
    # its status says so (503, Retry-After), as for any stream, rather than an opening and an error whose id a
    # reconnecting browser would resume into "stop reconnecting".
    opens = chat_req.resume and not generation.ended
    reading = _read(request, generation, framing, prepare_now=opens, announce=opens, headers=accepted.headers)
    # This frame stays suspended for as long as the stream is open: not with the admission's record in it.
    del accepted
    return await reading


async def start_generation(
    state: RelayState,
    chat: ChatRequest,
    admission: Admission,
    reservation: BudgetReservation | None,
    *,
    resumable: bool | None = None,
    framing: str = "unknown",
) -> Generation:
    """Start the generation of an admitted request (every endpoint's one way in); resumable as the request asked
    unless `resumable` says otherwise.

    The generation holds the admission (its concurrency slot) until it ends, with readers or without, and the token
    budget's reservation, which it settles with what the stream consumed when it ends.
    """
    generation = Generation(
        state.provider,
        chat,
        state.generation_settings,
        resumable=chat.resume if resumable is None else resumable,
        admission=admission,
        budget=reservation,
    )
    state.streams.start(generation, framing=framing)  # (the framing of the request that started it, for metrics)
    if state.shared_streams is not None:
        # Findable on every instance before its id goes out (X-Stream-Id, the opening event).
        try:
            await state.shared_streams.announce(generation)
        except BaseException:
            # No reader will ever attach (a host with handler_cancellation cancelled this handler, or a bug):
            # nothing else would end it, and it holds a concurrency slot and a budget reservation.
            generation.cancel(Outcome.ABANDONED)
            raise
    return generation


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /streams/{id}``: read a stream from its start, or resume it (``Last-Event-ID`` or ``?after=N``)."""
    state = request.app[RELAY]
    try:
        check_origin(request, state.origin_policy)
        framing = negotiated_framing(request)
        stream_id = request.match_info["id"]
        if not is_stream_id(stream_id):
            raise ResumeUnavailable("no such stream")
        after = parse_after(request.query.get("after"))
        if hdrs.LAST_EVENT_ID in request.headers:
            point = parse_last_event_id(request.headers[hdrs.LAST_EVENT_ID])
            if point.stream_id != stream_id:
                raise RequestError("Last-Event-ID names another stream")
            after = point.after if after is None else max(after, point.after)
        state.identify(request)
        return await _resume(request, stream_id, after or 0, framing)
    except RelayError as error:
        return error_response(error)


async def stop(request: web.Request) -> web.Response:
    """``DELETE /streams/{id}``: stop a stream now (the page's Stop button); its readers get ``stopped``."""
    state = request.app[RELAY]
    try:
        check_origin(request, state.origin_policy)
        state.identify(request)
        stream_id = request.match_info["id"]
        generation = state.streams.get(stream_id)
        if generation is None:
            # Perhaps another instance runs it (--stream-store redis): its owner is told to stop it.
            if (
                state.shared_streams is None
                or not is_stream_id(stream_id)
                or not await state.shared_streams.stop(stream_id)
            ):
                raise ResumeUnavailable("no such stream")
            return web.Response(status=204, headers={"Cache-Control": "no-store"})
    except RelayError as error:
        return error_response(error)
    state.streams.stop(generation)
    return web.Response(status=204, headers={"Cache-Control": "no-store"})


async def _resume(request: web.Request, stream_id: str, after: int, framing: Framing) -> web.StreamResponse:
    """A reader of an existing generation from after event `after`; never a second generation."""
    state = request.app[RELAY]
    generation = state.streams.get(stream_id)
    registry = state.streams
    # Events that may exist beyond what this instance knows of: a remote stream's owner writes Redis a flush behind
    # its own readers, so a client may hold an event its replica has not read yet (the reader then waits for it).
    lag = False
    if generation is not None:
        first_seq, last_seq, ended = generation.log.first_seq, generation.log.last_seq, generation.ended
    elif state.shared_streams is not None:
        # Another instance's stream (--stream-store redis): a replica of it here, replayed and followed from Redis.
        opened = await state.shared_streams.open(stream_id, after)
        if opened is None:  # ended, and the client has its terminal event
            return web.Response(status=204, headers={"Cache-Control": "no-store"})
        generation, registry = opened.generation, opened.registry
        first_seq, last_seq, ended = opened.first_seq, opened.last_seq, opened.ended
        lag = not ended
    else:
        raise ResumeUnavailable("this stream cannot be resumed here: it is unknown, expired or evicted")
    if after > last_seq and not lag:
        raise RequestError("the stream has no such event yet")
    if ended and after >= last_seq:
        # The client has the terminal event: 204 is the spec's "stop reconnecting" (WHATWG HTML §9.2.3).
        return web.Response(status=204, headers={"Cache-Control": "no-store"})
    if after + 1 < first_seq:
        raise ResumeUnavailable("the events after this one are no longer kept")
    return await _read(request, generation, framing, after=after, prepare_now=True, resumed=True, registry=registry)


def _read(
    request: web.Request,
    generation: Generation,
    framing: Framing,
    *,
    after: int = 0,
    prepare_now: bool = False,
    announce: bool = False,
    headers: Mapping[str, str] | None = None,
    resumed: bool = False,
    registry: StreamRegistry | None = None,
) -> Coroutine[Any, Any, web.StreamResponse]:
    """A `Reader` of `generation` for this request (see `Reader` for the options), run by the coroutine returned;
    `resumed`: it joins an existing generation. (Not a coroutine itself: its frame would stay suspended, a few
    hundred bytes, for as long as the stream is open.)"""
    state = request.app[RELAY]
    reader = Reader(
        request,
        generation,
        registry or state.streams,
        framing,
        state.reader_settings,
        after=after,
        prepare_now=prepare_now,
        announce=announce,
        # Heartbeats on SSE always (proxies, half-open peers); on NDJSON only when asked for.
        keepalive=framing.name == "sse" or state.config.ndjson_keepalive,
        headers=dict(headers) if headers else None,
    )
    return run_reader(request, reader, resumed=resumed)


def run_reader(
    request: web.Request, reader: Reader, *, resumed: bool = False
) -> Coroutine[Any, Any, web.StreamResponse]:
    """The coroutine that runs `reader` for `request`, seen by the access line and the observer (every endpoint's
    readers go here). (Not a coroutine itself: the reader's own tells the observer, one suspended frame less per
    open stream.)"""
    request[READING] = ReadingRequest(reader, resumed)  # for the access line (server/logs.py)
    return reader.run(request.app[RELAY].observer, resumed=resumed)


async def healthz(request: web.Request) -> web.Response:
    state = request.app[RELAY]
    streams = state.streams
    shared = state.shared_streams
    return web.json_response(
        {
            "status": "ok",
            "provider": state.provider.name,
            "open_streams": len(streams),  # running generations
            "readers": streams.readers,
            "retained_streams": streams.retained,  # running and recently ended, resumable
            "log_bytes": streams.total_bytes,
            **({"stream_store": shared.report()} if shared is not None else {}),  # --stream-store redis
            # Token budgets (budget_backends.BudgetStats): tokens reserved, charged, refunded; refusals.
            **({"token_budget": state.budgets.stats.as_dict()} if state.budgets is not None else {}),
        },
        headers={"Cache-Control": "no-store"},
    )


def refusals_as(respond: Respond) -> Middleware:
    """A middleware answering aiohttp's own 404 and 405, and any `RelayError` a handler raises, with `respond`
    (`server.responses.refusal_for`). The relay's own applications have `access_middleware` do this instead (one
    middleware, one suspended frame less per open stream); this one is for an application without it."""

    @web.middleware
    async def refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (web.HTTPException, RelayError) as exc:
            refusal = refusal_for(exc, respond)
            if refusal is None:
                raise
            return refusal

    return refusals


json_errors = refusals_as(error_response)


__all__ = ["chat", "check_host", "check_origin", "healthz", "json_errors", "read_body", "stop", "stream"]
