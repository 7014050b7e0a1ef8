"""Where a request was sent (``Host``) and which page sent it (``Origin``, Fetch Metadata). No IO.

A browser is the relay's client and, for a page on another site, an unwitting one: it sends whatever requests a
page asks for, and the relay pays for every generation it starts. Two questions are answered here, from the
request's headers and the configuration alone:

* **Was the request sent to this relay?** (`OriginPolicy.check_host`) The ``Host`` header is chosen by the
  requester. Under DNS rebinding a page on ``evil.example`` has its own name resolve to the relay's address: the
  browser then sends ``Host: evil.example`` and treats the relay's replies as the page's own, same-origin. So a
  name is answered only when the operator listed it (``--public-origin``). An IP address and ``localhost`` are
  always answered: no DNS answer can point them elsewhere (browsers resolve ``localhost`` to loopback themselves,
  RFC 6761 §6.3), so a browser that sends them reached the relay by that very address. Ports are not compared:
  a port cannot be rebound, and what arrives behind a port mapping or proxy is not the port the relay listens on.
* **May this request start a generation?** (`OriginPolicy.check_api_request`) Browsers send no ``Origin`` on
  ``<img>``, ``<script>``, ``<iframe>``, prefetch, a no-cors ``fetch()``, a form GET or a navigation, but they
  do send Fetch Metadata (W3C Fetch Metadata Request Headers): ``Sec-Fetch-Site`` (whose page asked),
  ``Sec-Fetch-Mode`` and ``Sec-Fetch-Dest`` (what for). The API's browser clients are ``EventSource`` and
  ``fetch()``, both with the empty request destination, ``Sec-Fetch-Dest: empty`` (WHATWG HTML §9.2.2 creates
  EventSource's request with destination ""; fetch()'s is "" unless set): every other destination, and every
  navigation, is a page loading the API as something it is not. A request from another site is a
  CORS request from an origin listed in ``--cors-origin``, or refused. A request with no Fetch Metadata is a
  client that is not a browser (curl, SDKs) or an older browser: its ``Origin``, when it sends one, must be the
  relay's own or an allowed one.

Browsers send Fetch Metadata only to potentially trustworthy URLs (Fetch Metadata, "set the Fetch metadata
headers for a request", step 1; Secure Contexts, "potentially trustworthy URL"): https, ``localhost`` and
loopback addresses. Over plain http to any other address, a cross-site ``<img>`` looks like curl; serve such a
relay over https.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import Forbidden, MisdirectedRequest, RequestError

__all__ = ["Origin", "OriginPolicy", "SourceHeaders", "host_name", "is_unrebindable"]

DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 1123 host names as browsers send them (WHATWG URL §3.5: lowercase, non-ASCII labels as punycode), plus "_",
# which some internal DNS names carry.
_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_.])?")
_PORT = re.compile(r"[0-9]{1,5}")
_BRACKETED = re.compile(r"\[[0-9a-f:.]+\](:[0-9]+)?", re.IGNORECASE)
# Fetch Metadata's values: Sec-Fetch-Site has exactly these four.
_OWN_SITE = frozenset({"same-origin", "none"})  # "none": the user's own act (typed URL, bookmark)
_OTHER_SITE = frozenset({"same-site", "cross-site"})
# "nested-navigate" is the frame navigations' mode in the draft and in Chromium before version 80.
_NAVIGATE_MODES = frozenset({"navigate", "nested-navigate"})
_API_DEST = "empty"  # EventSource and fetch()


@dataclass(frozen=True, slots=True)
class Origin:
    """A web origin as ``Origin`` headers and ``--public-origin`` write it (RFC 6454 §6.2): scheme, host, port.

    >>> Origin.parse("https://Chat.Example.com:443/")
    Origin(scheme='https', host='chat.example.com', port=443)
    >>> str(Origin.parse("http://[::1]:8080"))
    'http://[::1]:8080'
    """

    scheme: str
    host: str  # lowercase; an IPv6 address without its brackets
    port: int

    @classmethod
    def parse(cls, text: str) -> Origin:
        """`text` as an origin, or ValueError saying what is wrong with it."""
        example = "write it as scheme://host[:port], e.g. https://chat.example.com"
        if not text.isascii():
            raise ValueError(f"not an origin: {text!r} (write a non-ASCII name in its xn-- form, as browsers send it)")
        if not text or any(c.isspace() or c in "?#\\" for c in text):
            raise ValueError(f"not an origin: {text!r} ({example})")
        try:
            parts = urlsplit(text)
        except ValueError:  # an unclosed IPv6 bracket
            raise ValueError(f"not an origin: {text!r} ({example})") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"not an http or https origin: {text!r} ({example})")
        if "@" in parts.netloc or parts.path not in {"", "/"}:
            raise ValueError(f"an origin has no user name and no path: {text!r} ({example})")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"not a TCP port in {text!r} (1-65535)") from None
        host = (parts.hostname or "").lower()
        if parts.netloc.startswith("["):
            try:
                ipaddress.IPv6Address(host)
            except ValueError:  # pragma: no cover - urlsplit refuses it itself since Python 3.11.4
                raise ValueError(f"not an IPv6 address in {text!r}") from None
            if not _BRACKETED.fullmatch(parts.netloc):  # urlsplit reads "[::1]]" as [::1]
                raise ValueError(f"not an origin: {text!r} ({example})")
        elif not _NAME.fullmatch(host):
            raise ValueError(f"not a host name in {text!r} ({example})")
        if port == 0:
            raise ValueError(f"not a TCP port in {text!r} (1-65535)")
        return cls(scheme, host, DEFAULT_PORTS[scheme] if port is None else port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == DEFAULT_PORTS[self.scheme]:
            return f"{self.scheme}://{host}"
        return f"{self.scheme}://{host}:{self.port}"


def host_name(host_header: str) -> str | None:
    """The host of a ``Host`` header (RFC 9110 §7.2: ``uri-host [ ":" port ]``), lowercase, an IPv6 address
    without its brackets; None if the value is not a host with an optional port.

    >>> host_name("Relay.Example:8080"), host_name("[::1]:8080"), host_name("evil.example/"), host_name("::1")
    ('relay.example', '::1', None, None)
    """
    value = host_header.strip().lower()
    if value.startswith("["):
        name, bracket, port = value[1:].partition("]")
        if not bracket:
            return None
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
    else:
        name, _, port = value.partition(":")
        if not _NAME.fullmatch(name):
            return None
        port = value[len(name) :]
    if port and not (port.startswith(":") and _PORT.fullmatch(port[1:]) and int(port[1:]) <= 65535):
        return None
    return name


# Every request is checked, nearly always against one of a handful of names; parsing an address costs ~25 µs.
# Bounded, so a client sending a new Host each time only ever costs the parse.
@functools.lru_cache(maxsize=256)
def is_unrebindable(name: str) -> bool:
    """True for a host name no DNS answer can point elsewhere: an IP address, or ``localhost`` (RFC 6761 §6.3;
    browsers resolve it to loopback themselves).

    >>> [is_unrebindable(n) for n in ("127.0.0.1", "::1", "10.1.2.3", "localhost", "localhost.example", "127.1")]
    [True, True, True, True, False, False]
    """
    if name == "localhost":
        return True
    if ":" not in name and not name.replace(".", "").isdigit():
        return False  # not an address; spares raising and catching ipaddress's ValueError on every request
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_prefetch(purpose: str) -> bool:
    """``Sec-Purpose`` is a structured-field list (RFC 8941 §3.1): ``prefetch``, ``prefetch;prerender``..."""
    return any(item.split(";", 1)[0].strip() == "prefetch" for item in purpose.split(","))


@dataclass(frozen=True, slots=True)
class SourceHeaders:
    """The headers that say where a request was sent and which page sent it; None where absent."""

    host: str | None = None
    origin: str | None = None
    site: str | None = None  # Sec-Fetch-Site
    mode: str | None = None  # Sec-Fetch-Mode
    dest: str | None = None  # Sec-Fetch-Dest
    purpose: str | None = None  # Sec-Purpose (prefetch and prerender, https://wicg.github.io/nav-speculation/)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> SourceHeaders:
        """From a request's headers; `headers` must look names up case-insensitively, as aiohttp's do."""
        return cls(
            host=headers.get("Host"),
            origin=headers.get("Origin"),
            site=headers.get("Sec-Fetch-Site"),
            mode=headers.get("Sec-Fetch-Mode"),
            dest=headers.get("Sec-Fetch-Dest"),
            purpose=headers.get("Sec-Purpose"),
        )


@dataclass(frozen=True, slots=True)
class OriginPolicy:
    """The relay's own origins (``--public-origin``) and the other origins whose pages may call it
    (``--cors-origin``, compared as written, as aiohttp-cors compares them)."""

    public_origins: tuple[Origin, ...] = ()
    cors_origins: frozenset[str] = frozenset()
    # The host names (not addresses) the relay answers for besides localhost.
    names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        names = frozenset(o.host for o in self.public_origins if not is_unrebindable(o.host))
        object.__setattr__(self, "names", names)  # a frozen dataclass sets derived fields this way

    @classmethod
    def from_settings(cls, public_origins: Iterable[str] = (), cors_origins: Iterable[str] = ()) -> OriginPolicy:
        """The policy of a configuration; ValueError names a ``--public-origin`` that is not an origin."""
        parsed: list[Origin] = []
        for text in public_origins:
            try:
                parsed.append(Origin.parse(text))
            except ValueError as exc:
                raise ValueError(f"--public-origin: {exc}") from None
        return cls(tuple(parsed), frozenset(cors_origins))

    def describe(self) -> str:
        """What `check_host` accepts, for the log at startup."""
        if not self.names:
            return (
                "answering requests sent to an IP address or to localhost; requests sent to a host name are refused "
                "with 421 until the name is listed with --public-origin"
            )
        return "answering requests sent to an IP address, to localhost or to " + ", ".join(sorted(self.names))

    def answers_for(self, name: str) -> bool:
        return name in self.names or is_unrebindable(name)

    def check_host(self, host: str | None) -> None:
        """Refuse a request sent to a host name the relay does not answer for (421, RFC 9110 §15.5.20).

        No ``Host`` at all is a client that is not a browser (every browser sends one): it is answered.
        """
        if host is None:
            return
        name = host_name(host)
        if name is None:
            # RFC 9112 §3.2: a Host with an invalid value is a 400.
            raise RequestError("the Host header is not a host with an optional port (RFC 9110 §7.2)")
        if not self.answers_for(name):
            raise MisdirectedRequest(
                "this server does not answer for the host name the request was sent to; "
                "the names it answers for are listed with --public-origin"
            )

    def check_api_request(self, source: SourceHeaders, scheme: str) -> None:
        """Refuse a request that must not start a generation: sent to a name the relay does not answer for, or
        made by a browser on a page's behalf in a way the API's clients never use. `scheme` is the request's
        (``http`` or ``https``), used only to compare an ``Origin`` with a request that has no Fetch Metadata.
        """
        self.check_host(source.host)
        if source.purpose is not None and _is_prefetch(source.purpose):
            # A speculative load (link rel=prefetch, speculation rules, prerender) that nobody may ever read.
            raise Forbidden("a prefetch or prerender does not start a generation")
        if source.mode in _NAVIGATE_MODES or (source.dest is not None and source.dest != _API_DEST):
            # A document, frame, image, script, style... load: never an EventSource or fetch() client, so a page
            # (ours included, by a link) is using the API as something it is not. A destination unknown today is
            # refused too: the spec asks servers to ignore values they do not know, but this is an allow-list,
            # and whatever a future one is for, it is not one of the API's two clients.
            raise Forbidden("the API answers EventSource and fetch() requests only, not page or resource loads")
        if source.site in _OTHER_SITE:
            # A CORS request (mode "cors") is the one whose Origin the browser vouches for and whose reply it
            # shows the page only if CORS allows; only an allowed origin's page may start a generation.
            if source.mode != "cors" or source.origin not in self.cors_origins:
                raise Forbidden("a page of another site may use the API only from an origin listed in --cors-origin")
        elif source.site not in _OWN_SITE:
            # No Fetch Metadata, or a Sec-Fetch-Site value that the spec asks servers to ignore (forward
            # compatibility): the Origin decides, as for a client that is not a browser.
            self._check_origin_without_fetch_metadata(source, scheme)

    def _check_origin_without_fetch_metadata(self, source: SourceHeaders, scheme: str) -> None:
        origin = source.origin
        if origin is None or origin in self.cors_origins:
            return
        # The Host has passed check_host, so the origin it names is one of the relay's own.
        if source.host is not None and origin == f"{scheme}://{source.host.strip().lower()}":
            return
        if any(origin == str(own) for own in self.public_origins):
            return
        raise Forbidden("this origin is not allowed to use the API")
