"""Decode an OpenAI-compatible ``chat.completion.chunk`` SSE stream into our events. Bytes in, events out, no IO.

Parsing the raw lines ourselves, instead of letting the ``openai`` package build a ``ChatCompletionChunk`` model
per chunk, is what keeps the relay cheap: the package still builds the request, authenticates, retries and maps
HTTP errors; we only read the body. Line handling follows WHATWG HTML §9.2.6 (CR, LF or CRLF end a line; a blank
line dispatches; only ``data`` matters for this format, and ``error``, which older llama.cpp servers send; comments
and other fields are skipped). What one upstream can make the decoder hold or do is bounded (see the constants).

What choice 0's ``delta`` becomes, in this order within one chunk:

    reasoning_content (DeepSeek, vLLM)   -> Reasoning     (vLLM's newer servers send both names with the same
    or else reasoning (vLLM, Groq,                         text: the first one present is taken, never both)
    OpenRouter)
    content                              -> Delta
    refusal (OpenAI)                     -> Refusal
    tool_calls[] (OpenAI, vLLM, Groq,    -> ToolCallDelta (index, id, function.name, function.arguments)
    Ollama, DeepSeek)

Text, a refusal and a tool call are each a reply: a stream of only a refusal or only tool calls ends in `Done`
(with its ``finish_reason``, ``tool_calls``, ``stop``…), never in "ended the stream without a reply". Reasoning
alone is progress (it feeds the relay's clocks) but not a reply: after it, a ``[DONE]`` with no finish reason is
still the protocol error, while a finish reason (``length``: the budget ran out while thinking) is a `Done`.
"""

from __future__ import annotations

import json

from .errors import UpstreamError, UpstreamProtocolError
from .events import Delta, Done, Event, Reasoning, Refusal, ToolCallDelta, Usage

# Bounds on what the decoder holds and how much work one upstream can make it do. An event of this format is one
# JSON chunk on one ``data:`` line (a few hundred bytes); these limits are far above any real chunk and far below what
# would let an upstream hold the server's memory or its event loop.
MAX_EVENT_BYTES = 1 << 20  # the data of one event (or one unfinished line): one chunk larger is not a token stream
MAX_EVENT_LINES = 1_000  # the lines of one event (data, comments, other fields): empty ``data:`` lines add no bytes
MAX_GAP_BYTES = 4 << 20  # everything read between two events: comments, blank lines, ignored fields, the event itself
# Tool calls one reply may make (``index`` 0 to this, less one): far above what a model makes in parallel, and a
# bound for whoever keeps calls in a list by their index (the page, an assembled ``chat.completion``).
MAX_TOOL_CALLS = 256
_HTTP_STATUS = range(100, 600)
_MALFORMED_TOOL_CALL = "the model provider sent a malformed tool call"
_OVERSIZED = "the model provider sent an oversized stream event"
_TOO_MUCH_WITHOUT_EVENT = "the model provider sent too much without a stream event"
_BOM = b"\xef\xbb\xbf"
_decode_json = json.JSONDecoder().decode


class ChunkStreamDecoder:
    """Incremental decoder: `feed(bytes) -> [Event]` as network reads arrive, `end() -> [Event]` at EOF.

    The work is linear in the bytes fed, whatever their chunking: an unfinished line is kept as a list of parts
    (joined once, when its end arrives), and the size and line count of the event being read are running counts.
    The bounds above are checked as the lines arrive, so an upstream that never sends a blank line, or sends only
    comments or blank lines, is refused after at most a few MiB.
    """

    __slots__ = (
        "_data", "_event_bytes", "_event_lines", "_failure", "_finish_reason", "_gap_bytes", "_parts",
        "_parts_size", "_replied", "_started", "_usage", "finished",
    )  # fmt: skip

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # the unfinished last line, as it arrived
        self._parts_size = 0
        self._data: list[bytes] = []  # the data lines of the event being read
        self._event_bytes = 0  # their total size
        self._event_lines = 0  # the event's lines so far, of any field
        self._gap_bytes = 0  # bytes of complete lines read since the last event was dispatched
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._replied = False  # some answer (text, a refusal, a tool call) was relayed
        self._started = False
        self._failure: UpstreamError | None = None
        self.finished = False

    def feed(self, chunk: bytes) -> list[Event]:
        if self._failure is not None:
            raise self._failure
        if self.finished:
            return []
        if not self._started:
            buffer = b"".join(self._parts) + chunk
            # §9.2.6: "One leading U+FEFF BYTE ORDER MARK character must be ignored if any are present."
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._parts = [buffer]
                return []
            self._started = True
            self._parts = []
            self._parts_size = 0
            chunk = buffer[len(_BOM) :] if buffer.startswith(_BOM) else buffer
        # rfind: a read nearly always ends with its line end, found at once from the right.
        if chunk.rfind(b"\n") < 0 and b"\r" not in chunk:
            # No line ends: keep the piece without copying what came before (a long line costs one join at its end).
            if chunk:
                self._parts.append(chunk)
                self._parts_size += len(chunk)
                self._check_unfinished()
            return []
        if self._parts:
            buffer = b"".join((*self._parts, chunk))
            self._parts = []
        else:
            buffer = chunk
        if b"\r" in buffer:
            # A CR at the very end may be the first half of a CRLF split across reads: keep it for later.
            held = b"\r" if buffer.endswith(b"\r") else b""
            body = buffer[:-1] if held else buffer
            lines = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            rest = lines.pop() + held
        else:
            lines = buffer.split(b"\n")
            rest = lines.pop()
        if rest:
            self._parts.append(rest)
        self._parts_size = len(rest)
        events: list[Event] = []
        # The running counts live in locals for the loop (this is the per-token path) and are stored after it;
        # after a failure they no longer matter (the decoder only raises from then on).
        gap = self._gap_bytes
        event_lines = self._event_lines
        try:
            for line in lines:
                gap += len(line) + 1
                if not line:
                    # A blank line ends the event (§9.2.6 "dispatch the event"); without data it dispatches nothing.
                    event_lines = 0
                    if self._data:
                        gap = 0
                        self._dispatch(events)
                        if self.finished:
                            return events
                    elif gap > MAX_GAP_BYTES:
                        raise UpstreamProtocolError(_TOO_MUCH_WITHOUT_EVENT)
                    continue
                event_lines += 1
                if event_lines > MAX_EVENT_LINES:
                    raise UpstreamProtocolError(_OVERSIZED)
                if line.startswith(b"data:"):
                    value = line[6:] if line.startswith(b"data: ") else line[5:]
                    self._data.append(value)
                    self._event_bytes += len(value)
                    if self._event_bytes > MAX_EVENT_BYTES:
                        raise UpstreamProtocolError(_OVERSIZED)
                elif line == b"data":  # §9.2.6: a line without a colon is a field with an empty value
                    self._data.append(b"")
                elif line.startswith(b"error:") or line == b"error":
                    # Older llama.cpp servers report a failure after the headers as an SSE field of its own,
                    # ``error: {"code": 400, "message": ...}``, followed by ``data: [DONE]``.
                    raise _reported_error(line[6:])
                elif gap > MAX_GAP_BYTES:
                    # Comments and other fields (event, id, retry) carry nothing for this format, but they count.
                    raise UpstreamProtocolError(_TOO_MUCH_WITHOUT_EVENT)
            self._gap_bytes = gap
            self._event_lines = event_lines
            if rest:
                self._check_unfinished()
        except UpstreamError as exc:
            if not events:
                raise
            # The events this read decoded before the failure are delivered first, whatever the chunking; the
            # next feed() or end() raises the failure.
            self._failure = exc
        return events

    def _check_unfinished(self) -> None:
        if self._parts_size > MAX_EVENT_BYTES:
            raise UpstreamProtocolError(_OVERSIZED)
        if self._gap_bytes + self._parts_size > MAX_GAP_BYTES:
            raise UpstreamProtocolError(_TOO_MUCH_WITHOUT_EVENT)

    def end(self) -> list[Event]:
        """The upstream closed its body. A stream that never said it finished is an error, not a quiet end."""
        if self._failure is not None:
            raise self._failure
        if self.finished:
            return []
        events = self.feed(b"\n\n") if self._parts or self._data else []
        if self.finished:
            return events
        if self._finish_reason is not None:
            # Some compatible servers omit [DONE] after a chunk that carries finish_reason: that reply is whole.
            self.finished = True
            events.append(Done(self._finish_reason, self._usage))
            return events
        raise UpstreamProtocolError("the model provider's stream ended before the reply was complete")

    def _done(self, events: list[Event]) -> None:
        if not self._replied and self._finish_reason is None:
            # Nothing was said and nothing says why: a reply that never started, not an empty answer.
            raise UpstreamProtocolError("the model provider ended the stream without a reply")
        self.finished = True
        events.append(Done(self._finish_reason, self._usage))

    def _dispatch(self, events: list[Event]) -> None:
        payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data = []
        self._event_bytes = 0
        if payload == b"[DONE]":
            self._done(events)
            return
        try:
            # §9.2.5: the stream is UTF-8. Decoding here spares json.loads its encoding detection per chunk, with
            # what json.loads does for UTF-8: surrogates encoded in it (CESU-8, Java's "modified UTF-8") pass,
            # and so does a BOM before the JSON. (Unlike json.loads, a chunk in UTF-16 or UTF-32 is refused.)
            text = payload.decode("utf-8", "surrogatepass")
            chunk = _decode_json(text[1:] if text.startswith("\ufeff") else text)
        except (ValueError, RecursionError):  # ValueError: JSONDecodeError, UnicodeDecodeError, int() digit limit
            # The openai package ends the stream on any data starting with [DONE]; we accept it with ASCII
            # whitespace around it (``data: [DONE]  ``, ``data:[DONE]\t``), and refuse anything else.
            if payload.strip() == b"[DONE]":
                self._done(events)
                return
            raise UpstreamProtocolError("the model provider sent a malformed stream chunk") from None
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError("the model provider sent a malformed stream chunk")
        error = chunk.get("error")
        if error is not None:
            # An error object inside a 200 stream (OpenAI and vLLM do this for failures after headers).
            raise _error_with_code(error)
        choices = chunk.get("choices")
        if choices:
            if (
                type(choices) is list
                and len(choices) == 1
                and type(first := choices[0]) is dict
                and type(index := first.get("index", 0)) is int
            ):
                choice = first if index == 0 else None  # one choice, the common case: spare the general walk
            else:
                choice = _first_choice(choices)
            if choice is not None:
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    # Reasoning first: a chunk that carries both ends the thinking and starts the answer.
                    reasoning = delta.get("reasoning_content")
                    if reasoning is None:
                        reasoning = delta.get("reasoning")
                    if isinstance(reasoning, str) and reasoning:
                        events.append(Reasoning(reasoning))
                    before = len(events)  # reasoning is progress, but not yet a reply (see _done)
                    content = delta.get("content")
                    if isinstance(content, str) and content:
                        events.append(Delta(content))
                    refusal = delta.get("refusal")
                    if isinstance(refusal, str) and refusal:
                        events.append(Refusal(refusal))
                    tool_calls = delta.get("tool_calls")
                    if tool_calls is not None:
                        _tool_calls(tool_calls, events)
                    if len(events) > before:
                        self._replied = True
                reason = choice.get("finish_reason")
                if isinstance(reason, str):
                    self._finish_reason = reason
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = _usage(usage)


def _first_choice(choices: object) -> dict[str, object] | None:
    """The choice whose ``index`` is 0, or None when this chunk carries only other choices.

    The relay asks for one choice, but an upstream or a proxy may force n > 1: the chunks of the choices then
    interleave, each naming its ``index``, in any order. Only choice 0 is relayed, found by its index, not its
    position. A choice without an index is taken at its position (minimal servers omit it for a single choice).
    """
    if not isinstance(choices, list):
        raise UpstreamProtocolError("the model provider sent a malformed stream chunk")
    found: dict[str, object] | None = None
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise UpstreamProtocolError("the model provider sent a malformed stream chunk")
        index = choice.get("index", position)
        if not isinstance(index, int) or isinstance(index, bool):
            raise UpstreamProtocolError("the model provider sent a malformed stream chunk")
        if index == 0 and found is None:
            found = choice
    return found


def _tool_calls(value: object, events: list[Event]) -> None:
    """The pieces of ``delta.tool_calls``, one `ToolCallDelta` each, in their order.

    OpenAI, vLLM and Groq send a call's ``id`` and ``function.name`` in its first piece and its JSON arguments in
    fragments after it, each piece naming the call by ``index``; Ollama sends each call whole, in one piece (and its
    older versions without an ``index``: the position in the list stands in for it, as for choices). A piece that
    carries nothing (no id, no name, no arguments) is no progress and yields nothing.
    """
    if not isinstance(value, list):
        raise UpstreamProtocolError(_MALFORMED_TOOL_CALL)
    for position, item in enumerate(value):
        if not isinstance(item, dict):
            raise UpstreamProtocolError(_MALFORMED_TOOL_CALL)
        index = item.get("index", position)
        if type(index) is not int or not 0 <= index < MAX_TOOL_CALLS:
            raise UpstreamProtocolError(_MALFORMED_TOOL_CALL)
        call_id = item.get("id")
        function = item.get("function")
        if function is None:
            function = {}
        elif not isinstance(function, dict):
            raise UpstreamProtocolError(_MALFORMED_TOOL_CALL)
        name = function.get("name")
        arguments = function.get("arguments")
        if arguments is None:
            arguments = ""
        elif type(arguments) is dict:
            # OpenAI's arguments are JSON text; some servers send the object itself (llama.cpp's server in some
            # versions, ggml-org/llama.cpp#20198; TGI, huggingface/text-generation-inference#2136): relayed as text.
            arguments = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
        if not (
            (call_id is None or type(call_id) is str) and (name is None or type(name) is str) and type(arguments) is str
        ):
            raise UpstreamProtocolError(_MALFORMED_TOOL_CALL)
        # Some servers repeat an empty id or name on every piece: empty says nothing, like absent.
        call_id = call_id or None
        name = name or None
        if call_id is not None or name is not None or arguments:
            events.append(ToolCallDelta(index, call_id, name, arguments))


def _reported_error(value: bytes) -> UpstreamError:
    """The upstream's SSE ``error`` field. Its text is never relayed (it can quote a key or a prompt); a code that
    is an HTTP status is named."""
    try:
        error: object = json.loads(value)
    except (ValueError, RecursionError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("error"), dict):
        error = error["error"]  # the shape of an error response body, {"error": {...}}
    return _error_with_code(error)


def _error_with_code(error: object) -> UpstreamError:
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, int) and not isinstance(code, bool) and code in _HTTP_STATUS:
        return UpstreamError(f"the model provider reported an error during generation (code {code})")
    return UpstreamError("the model provider reported an error during generation")


def _usage(data: dict[str, object]) -> Usage | None:
    values = [data.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        prompt, completion, total = (int(v) for v in values)  # type: ignore[call-overload]
        return Usage(prompt, completion, total)
    return None
