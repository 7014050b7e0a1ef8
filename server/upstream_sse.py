"""Decode an OpenAI-compatible ``chat.completion.chunk`` SSE stream into our events. Bytes in, events out, no IO.

Parsing the raw lines ourselves, instead of letting the ``openai`` package build a ``ChatCompletionChunk`` model
per chunk, is what keeps the relay cheap: the package still builds the request, authenticates, retries and maps
HTTP errors; we only read the body. Line handling follows WHATWG HTML §9.2.6 (CR, LF or CRLF end a line; a blank
line dispatches; only ``data`` matters for this format; comments and other fields are skipped).
"""

from __future__ import annotations

import json

from .errors import UpstreamError, UpstreamProtocolError
from .events import Delta, Done, Event, Usage

MAX_EVENT_BYTES = 1 << 20  # one chunk larger than this is not a token stream; refuse to buffer it
_BOM = b"\xef\xbb\xbf"
_decode_json = json.JSONDecoder().decode


class ChunkStreamDecoder:
    """Incremental decoder: `feed(bytes) -> [Event]` as network reads arrive, `end() -> [Event]` at EOF."""

    __slots__ = ("_data", "_failure", "_finish_reason", "_pending", "_started", "_usage", "finished")

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[bytes] = []
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._started = False
        self._failure: UpstreamError | None = None
        self.finished = False

    def feed(self, chunk: bytes) -> list[Event]:
        if self._failure is not None:
            raise self._failure
        if self.finished:
            return []
        buffer = self._pending + chunk if self._pending else chunk
        if not self._started:
            # §9.2.6: "One leading U+FEFF BYTE ORDER MARK character must be ignored if any are present."
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._pending = buffer
                return []
            self._started = True
            if buffer.startswith(_BOM):
                buffer = buffer[len(_BOM) :]
        if b"\r" in buffer:
            # A CR at the very end may be the first half of a CRLF split across reads: keep it for later.
            held = b"\r" if buffer.endswith(b"\r") else b""
            body = buffer[:-1] if held else buffer
            buffer = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            lines = buffer.split(b"\n")
            self._pending = lines.pop() + held
        else:
            lines = buffer.split(b"\n")
            self._pending = lines.pop()
        events: list[Event] = []
        try:
            for line in lines:
                if not line:
                    if self._data:
                        self._dispatch(events)
                        if self.finished:
                            break
                elif line.startswith(b"data:"):
                    value = line[6:] if line.startswith(b"data: ") else line[5:]
                    self._data.append(value)
                    if sum(map(len, self._data)) > MAX_EVENT_BYTES:
                        raise UpstreamProtocolError("the model provider sent an oversized stream event")
                # Other fields (event, id, retry) and comments carry nothing for this format.
            if not self.finished and len(self._pending) > MAX_EVENT_BYTES:
                raise UpstreamProtocolError("the model provider sent an oversized stream event")
        except UpstreamError as exc:
            if not events:
                raise
            # The events this read decoded before the failure are delivered first, whatever the chunking; the
            # next feed() or end() raises the failure.
            self._failure = exc
        return events

    def end(self) -> list[Event]:
        """The upstream closed its body. A stream that never said it finished is an error, not a quiet end."""
        if self._failure is not None:
            raise self._failure
        if self.finished:
            return []
        events = self.feed(b"\n\n") if self._pending or self._data else []
        if self.finished:
            return events
        if self._finish_reason is not None:
            # Some compatible servers omit [DONE] after a chunk that carries finish_reason: that reply is whole.
            self.finished = True
            events.append(Done(self._finish_reason, self._usage))
            return events
        raise UpstreamProtocolError("the model provider's stream ended before the reply was complete")

    def _dispatch(self, events: list[Event]) -> None:
        payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data = []
        if payload == b"[DONE]":
            self.finished = True
            events.append(Done(self._finish_reason, self._usage))
            return
        try:
            # §9.2.5: the stream is UTF-8. Decoding here spares json.loads its encoding detection per chunk, with
            # what json.loads does for UTF-8: surrogates encoded in it (CESU-8, Java's "modified UTF-8") pass,
            # and so does a BOM before the JSON. (Unlike json.loads, a chunk in UTF-16 or UTF-32 is refused.)
            text = payload.decode("utf-8", "surrogatepass")
            chunk = _decode_json(text[1:] if text.startswith("\ufeff") else text)
        except (ValueError, RecursionError):  # ValueError: JSONDecodeError, UnicodeDecodeError, int() digit limit
            raise UpstreamProtocolError("the model provider sent a malformed stream chunk") from None
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError("the model provider sent a malformed stream chunk")
        if chunk.get("error") is not None:
            # An error object inside a 200 stream (OpenAI and vLLM do this for failures after headers).
            raise UpstreamError("the model provider reported an error during generation")
        choices = chunk.get("choices")
        if choices:
            choice = choices[0] if isinstance(choices, list) else None
            if not isinstance(choice, dict):
                raise UpstreamProtocolError("the model provider sent a malformed stream chunk")
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str) and content:
                    events.append(Delta(content))
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self._finish_reason = reason
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = _usage(usage)


def _usage(data: dict[str, object]) -> Usage | None:
    values = [data.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        prompt, completion, total = (int(v) for v in values)  # type: ignore[call-overload]
        return Usage(prompt, completion, total)
    return None
