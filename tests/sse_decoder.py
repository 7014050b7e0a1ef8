"""An independent Server-Sent Events decoder, written from WHATWG HTML §9.2.6 "Interpreting an event stream".

It shares no code with `server/framing.py` or `server/upstream_sse.py`, so the framing tests compare the server's
bytes against the spec rather than against the server's own idea of the spec. Each step below names the spec text it
implements. https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation

    decoder = SSEDecoder()
    events = decoder.feed(b"id: 1\\ndata: x\\n\\n")   # [SSEEvent(type="message", data="x", last_event_id="1")]
    events += decoder.end()                         # the spec discards an unfinished event at end of stream
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["SSEDecoder", "SSEEvent", "decode_sse"]

_LF = "\n"
_CR = "\r"
_BOM = "\ufeff"
_ASCII_DIGITS = re.compile(r"[0-9]+")


class SSEEvent(NamedTuple):
    """A dispatched event: what a browser's ``MessageEvent`` would expose (type, data, lastEventId)."""

    type: str
    data: str
    last_event_id: str


class SSEDecoder:
    """Incremental decoder: `feed` any byte chunking, then `end`. `retry` is the last valid reconnection time."""

    def __init__(self) -> None:
        # "The stream must then be parsed by ... decoding [it] using the UTF-8 decode algorithm": UTF-8 with
        # replacement of invalid sequences by U+FFFD; the incremental decoder keeps a character split across chunks.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._bom_checked = False
        self._line = ""
        # After a CR ends a line, an LF that follows belongs to the same end-of-line (CRLF), even in the next chunk.
        self._skip_lf = False
        self._data = ""
        self._event_type = ""
        self._last_event_id_buffer = ""
        self.last_event_id = ""
        self.retry: int | None = None
        self._ended = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._ended:
            raise RuntimeError("feed() after end()")
        return self._feed_text(self._utf8.decode(chunk, final=False))

    def end(self) -> list[SSEEvent]:
        """End of stream. "Once the end of the file is reached, any pending data must be discarded. (If the file
        ends in the middle of an event, before the final empty line, the incomplete event is not dispatched.)\""""
        events = self._feed_text(self._utf8.decode(b"", final=True))
        self._ended = True
        self._line = ""
        self._data = ""
        self._event_type = ""
        return events

    def _feed_text(self, text: str) -> list[SSEEvent]:
        if not self._bom_checked and text:
            # UTF-8 decode strips one leading BOM ("One leading U+FEFF BYTE ORDER MARK character must be ignored").
            self._bom_checked = True
            if text.startswith(_BOM):
                text = text[1:]
        events: list[SSEEvent] = []
        for char in text:
            if self._skip_lf:
                self._skip_lf = False
                if char == _LF:
                    continue
            if char == _CR:
                # end-of-line = ( cr lf / cr / lf ); a lone CR ends the line at once, without waiting for more bytes.
                self._skip_lf = True
                self._process_line(self._line, events)
                self._line = ""
            elif char == _LF:
                self._process_line(self._line, events)
                self._line = ""
            else:
                self._line += char
        return events

    def _process_line(self, line: str, events: list[SSEEvent]) -> None:
        if line == "":
            # "If the line is empty (a blank line): Dispatch the event."
            self._dispatch(events)
            return
        if line.startswith(":"):
            # "If the line starts with a U+003A COLON character (:): Ignore the line."
            return
        if ":" in line:
            # "Collect the characters on the line before the first U+003A COLON character (:), and let field be
            # that string. Collect the characters on the line after the first U+003A COLON character (:), and let
            # value be that string. If value starts with a U+0020 SPACE character, remove it from value."
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
        else:
            # "Otherwise, the string is not empty but does not contain a U+003A COLON character (:): ... using
            # the whole line as the field name, and the empty string as the field value."
            field, value = line, ""
        self._process_field(field, value)

    def _process_field(self, field: str, value: str) -> None:
        # The field names are compared one by one, as the spec lists them; a field that matches none is ignored.
        if field == "event":
            self._event_type = value
        elif field == "data":
            # "Append the field value to the data buffer, then append a single U+000A LINE FEED (LF) character."
            self._data += value + _LF
        elif field == "id":
            # "If the field value does not contain U+0000 NULL, then set the last event ID buffer to the field
            # value. Otherwise, ignore the field."
            self._last_event_id_buffer = value if "\0" not in value else self._last_event_id_buffer
        elif field == "retry":
            # "If the field value consists of only ASCII digits, then interpret the field value as an integer in
            # base ten, and set the event stream's reconnection time to that integer. Otherwise, ignore the field."
            self.retry = int(value) if _ASCII_DIGITS.fullmatch(value) else self.retry
        # "Otherwise: The field is ignored."

    def _dispatch(self, events: list[SSEEvent]) -> None:
        # 1. "Set the last event ID string of the event source to the value of the last event ID buffer. The buffer
        #    does not get reset, so the last event ID string of the event source remains set to this value until
        #    the next time it is set by the server."
        self.last_event_id = self._last_event_id_buffer
        # 2. "If the data buffer is an empty string, set the data buffer and the event type buffer to the empty
        #    string and return."
        if self._data == "":
            self._event_type = ""
            return
        # 3. "If the data buffer's last character is a U+000A LINE FEED (LF) character, then remove the last
        #    character from the data buffer."
        data = self._data[:-1] if self._data.endswith(_LF) else self._data
        # 4-5. The event's type is the event type buffer, or "message" when it is empty.
        events.append(SSEEvent(self._event_type or "message", data, self.last_event_id))
        # 6. "Set the data buffer and the event type buffer to the empty string."
        self._data = ""
        self._event_type = ""


def decode_sse(chunks: bytes | Iterable[bytes]) -> tuple[list[SSEEvent], int | None]:
    """Decode a whole stream given as bytes or as a sequence of chunks: (events, reconnection time or None)."""
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.end())
    return events, decoder.retry
