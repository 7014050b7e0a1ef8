"""Compact JSON as the framings write it: UTF-8 bytes, valid even for strings holding lone surrogates. No IO.

Shared by every framing (`server/framing.py` and the larger ones in their own modules), so that they all write the
same bytes for the same value.
"""

from __future__ import annotations

import json
from typing import Final

__all__ = ["json_bytes", "json_str"]

# Built once: json.dumps with any non-default option builds a new JSONEncoder on every call.
_dumps_utf8: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_dumps_ascii: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode
# The encoders json.dumps itself uses for a str (C when available), called directly on the hot path of every
# delta: JSONEncoder.encode would add a Python-level call per token.
_encode_str_utf8 = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring
_encode_str_ascii = getattr(json.encoder, "c_encode_basestring_ascii", None) or json.encoder.py_encode_basestring_ascii


def json_bytes(value: object) -> bytes:
    """Compact JSON as UTF-8 bytes, valid even when strings hold lone surrogates.

    Upstream JSON may decode to lone surrogates (``"\\ud800"``); UTF-8 cannot carry them, so in that case the
    text is re-encoded with ``\\u`` escapes, which JSON readers turn back into the very same string.

    >>> json_bytes({"a": "ü", "b": "\\ud800"})
    b'{"a":"\\\\u00fc","b":"\\\\ud800"}'
    """
    try:
        return _dumps_utf8(value).encode()
    except UnicodeEncodeError:
        return _dumps_ascii(value).encode()


def json_str(text: str) -> bytes:
    """A JSON string literal as bytes (the hot path of every delta).

    >>> json_str('say "hi"')
    b'"say \\\\"hi\\\\""'
    """
    try:
        return _encode_str_utf8(text).encode()
    except UnicodeEncodeError:
        return _encode_str_ascii(text).encode()
