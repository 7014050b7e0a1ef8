"""server/request_origin.py: which Host names are answered, and which browser requests may start a generation.

The Fetch Metadata cases are the header sets Chromium sends for each way a page can make a request (recorded
from Chromium 156 against a loopback relay; tests/test_browser.py drives the same vectors for real).
"""

from __future__ import annotations

import doctest
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import server.request_origin
from server.errors import RelayError
from server.request_origin import Origin, OriginPolicy, SourceHeaders, host_name, is_unrebindable

RELAY = "http://relay.test:8080"
BEHIND_TLS = "https://chat.example.com"
ALLOWED = "https://app.example"
POLICY = OriginPolicy.from_settings([RELAY, BEHIND_TLS], [ALLOWED])
DEFAULT = OriginPolicy()


def test_doctests() -> None:
    failures, tried = doctest.testmod(server.request_origin)
    assert (failures, tried > 0) == (0, True)


# -- origins -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed", "serialized"),
    [
        ("http://relay.test:8080", ("http", "relay.test", 8080), "http://relay.test:8080"),
        ("https://chat.example.com", ("https", "chat.example.com", 443), "https://chat.example.com"),
        ("HTTPS://Chat.Example.COM:443/", ("https", "chat.example.com", 443), "https://chat.example.com"),
        ("http://chat.example.com:80", ("http", "chat.example.com", 80), "http://chat.example.com"),
        ("http://127.0.0.1:8080", ("http", "127.0.0.1", 8080), "http://127.0.0.1:8080"),
        ("http://[::1]:8080", ("http", "::1", 8080), "http://[::1]:8080"),
        ("http://[2001:DB8::1]", ("http", "2001:db8::1", 80), "http://[2001:db8::1]"),
        ("http://xn--bcher-kva.example", ("http", "xn--bcher-kva.example", 80), "http://xn--bcher-kva.example"),
        ("http://relay_internal:8080", ("http", "relay_internal", 8080), "http://relay_internal:8080"),
    ],
    ids=["name-port", "https-default", "case-default-port-slash", "http-default", "ipv4", "ipv6", "ipv6-case",
         "punycode", "underscore"],
)  # fmt: skip
def test_origin_parse(text: str, parsed: tuple[str, str, int], serialized: str) -> None:
    origin = Origin.parse(text)
    assert (origin.scheme, origin.host, origin.port) == parsed
    assert str(origin) == serialized
    assert Origin.parse(str(origin)) == origin


@pytest.mark.parametrize(
    "text",
    ["", "relay.test", "relay.test:8080", "//relay.test", "ftp://relay.test", "ws://relay.test", "http://",
     "http://:8080", "http://relay.test/api", "http://relay.test/?", "http://relay.test#x", "http://u:p@relay.test",
     "http://relay.test:0", "http://relay.test:65536", "http://relay.test:x", "http://relay.test:80:80",
     "http://[::1", "http://[not-v6]", "http://[127.0.0.1]", "http://[::1]]", "http://-relay.test",
     "http://bücher.example", " http://relay.test", "http://relay test", "http://relay.test\\"],
    ids=["empty", "no-scheme", "no-scheme-port", "scheme-relative", "ftp", "ws", "no-host", "port-only", "path",
         "empty-query", "fragment", "userinfo", "port-0", "port-too-big", "port-text", "two-ports", "open-bracket",
         "bad-ipv6", "ipv4-in-brackets", "extra-bracket", "leading-hyphen", "non-ascii", "leading-space", "space",
         "backslash"],
)  # fmt: skip
def test_origin_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"origin|port|address|host"):
        Origin.parse(text)


def test_policy_names_the_option_in_its_error() -> None:
    with pytest.raises(ValueError, match=r"^--public-origin: .*'relay\.test'"):
        OriginPolicy.from_settings(["relay.test"])


@settings(max_examples=300, deadline=None)
@given(
    scheme=st.sampled_from(["http", "https"]),
    host=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)
    | st.ip_addresses().map(str),
    port=st.integers(1, 65535),
)
def test_an_origin_reads_back_from_its_serialization(scheme: str, host: str, port: int) -> None:
    origin = Origin(scheme, host, port)
    assert Origin.parse(str(origin)) == origin


# -- Host --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("relay.test:8080", "relay.test"),
        ("Relay.Test", "relay.test"),
        (" relay.test ", "relay.test"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("relay.test:65535", "relay.test"),
        ("", None),
        ("::1", None),
        ("[::1", None),
        ("[::1]8080", None),
        ("[evil.test]:80", None),
        ("relay.test:", None),
        ("relay.test:65536", None),
        ("relay.test:123456", None),
        ("relay.test:80:80", None),
        ("relay.test:+80", None),
        ("relay.test/", None),
        ("user@relay.test", None),
        ("relay test", None),
        ("-relay.test", None),
    ],
)
def test_host_name(value: str, name: str | None) -> None:
    assert host_name(value) == name


def _host_verdict(policy: OriginPolicy, host: str | None) -> str:
    try:
        policy.check_host(host)
    except RelayError as error:
        return f"{error.status} {error.type}"
    return "answered"


_ANSWERED = "answered"
_MISDIRECTED = "421 misdirected_request"
_MALFORMED = "400 invalid_request"


@pytest.mark.parametrize(
    ("host", "by_default", "configured"),
    [
        # Unrebindable: an address, or localhost, whatever the port (port mappings and proxies change it).
        ("127.0.0.1:8080", _ANSWERED, _ANSWERED),
        ("127.0.0.1:1", _ANSWERED, _ANSWERED),
        ("127.0.0.1", _ANSWERED, _ANSWERED),
        ("localhost:8080", _ANSWERED, _ANSWERED),
        ("LocalHost:5173", _ANSWERED, _ANSWERED),
        ("[::1]:8080", _ANSWERED, _ANSWERED),
        ("10.0.0.5:8080", _ANSWERED, _ANSWERED),
        ("0.0.0.0:8080", _ANSWERED, _ANSWERED),
        ("[2001:db8::1]", _ANSWERED, _ANSWERED),
        # Names: only the listed ones; the port is not compared.
        ("relay.test:8080", _MISDIRECTED, _ANSWERED),
        ("relay.test", _MISDIRECTED, _ANSWERED),
        ("relay.test:9999", _MISDIRECTED, _ANSWERED),
        ("RELAY.test:8080", _MISDIRECTED, _ANSWERED),
        ("chat.example.com", _MISDIRECTED, _ANSWERED),
        ("evil.test:8080", _MISDIRECTED, _MISDIRECTED),
        ("api.relay.test:8080", _MISDIRECTED, _MISDIRECTED),
        ("relay.test.evil.test", _MISDIRECTED, _MISDIRECTED),
        ("127.0.0.1.nip.io:8080", _MISDIRECTED, _MISDIRECTED),
        ("localhost.evil.test", _MISDIRECTED, _MISDIRECTED),
        ("localhost.:8080", _MISDIRECTED, _MISDIRECTED),
        ("127.1:8080", _MISDIRECTED, _MISDIRECTED),
        # No Host: not a browser (they all send one).
        (None, _ANSWERED, _ANSWERED),
        # Not a host: RFC 9112 §3.2 makes it a 400.
        ("", _MALFORMED, _MALFORMED),
        ("relay.test/api", _MALFORMED, _MALFORMED),
        ("relay.test:http", _MALFORMED, _MALFORMED),
        ("::1", _MALFORMED, _MALFORMED),
    ],
    ids=["loopback", "loopback-other-port", "loopback-no-port", "localhost", "localhost-case", "ipv6-loopback",
         "lan-address", "any-address", "ipv6", "listed", "listed-no-port", "listed-other-port", "listed-case",
         "listed-https", "rebinding", "subdomain-of-listed", "listed-as-prefix", "name-resolving-to-loopback",
         "localhost-label", "localhost-trailing-dot", "shortened-ipv4", "no-host", "empty", "path", "port-text",
         "ipv6-without-brackets"],
)  # fmt: skip
def test_check_host(host: str | None, by_default: str, configured: str) -> None:
    assert _host_verdict(DEFAULT, host) == by_default
    assert _host_verdict(POLICY, host) == configured


_LABEL = r"[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?"
_NAMES = st.from_regex(rf"{_LABEL}(\.{_LABEL}){{0,4}}", fullmatch=True) | st.sampled_from(
    ["localhost", "relay.test", "chat.example.com", "127.0.0.1", "10.1.2.3"]
)


@settings(max_examples=300, deadline=None)
@given(name=_NAMES, port=st.none() | st.integers(1, 65535))
def test_no_unlisted_name_is_answered(name: str, port: int | None) -> None:
    host = name if port is None else f"{name}:{port}"
    listed = name in {"relay.test", "chat.example.com"}
    unrebindable = name == "localhost" or _is_ip(name)
    assert _host_verdict(DEFAULT, host) == (_ANSWERED if unrebindable else _MISDIRECTED)
    assert _host_verdict(POLICY, host) == (_ANSWERED if unrebindable or listed else _MISDIRECTED)


@settings(max_examples=500, deadline=None)
@given(host=st.text(max_size=40))
def test_any_host_value_is_answered_or_refused_with_a_relay_error(host: str) -> None:
    verdict = _host_verdict(POLICY, host)
    assert verdict in {_ANSWERED, _MISDIRECTED, _MALFORMED}
    if verdict == _ANSWERED:
        name = host_name(host)
        assert name is not None
        assert is_unrebindable(name) or name in POLICY.names


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def test_names_and_the_startup_description() -> None:
    assert DEFAULT.names == frozenset()
    assert "refused with 421 until the name is listed with --public-origin" in DEFAULT.describe()
    # An address listed as a public origin is answered anyway; it is not a name to mention.
    policy = OriginPolicy.from_settings([RELAY, BEHIND_TLS, "http://192.0.2.1:8080"])
    assert policy.names == frozenset({"relay.test", "chat.example.com"})
    assert policy.describe().endswith("to localhost or to chat.example.com, relay.test")


# -- Fetch Metadata ----------------------------------------------------------------------------------------------

_OK = "ok"
_FORBIDDEN = "403 forbidden"


def _source(
    site: str | None = None,
    mode: str | None = None,
    dest: str | None = None,
    origin: str | None = None,
    host: str | None = "relay.test:8080",
    purpose: str | None = None,
) -> SourceHeaders:
    return SourceHeaders(host=host, origin=origin, site=site, mode=mode, dest=dest, purpose=purpose)


def _verdict(source: SourceHeaders, scheme: str = "http", policy: OriginPolicy = POLICY) -> str:
    try:
        policy.check_api_request(source, scheme)
    except RelayError as error:
        return f"{error.status} {error.type}"
    return _OK


_CASES: list[tuple[str, SourceHeaders, str]] = [
    # A page of another site, each way Chromium lets it send a request (no Origin on any of the first seven).
    ("img", _source("cross-site", "no-cors", "image"), _FORBIDDEN),
    ("script", _source("cross-site", "no-cors", "script"), _FORBIDDEN),
    ("iframe", _source("cross-site", "navigate", "iframe"), _FORBIDDEN),
    ("link-prefetch", _source("cross-site", "no-cors", "empty", purpose="prefetch"), _FORBIDDEN),
    ("no-cors-fetch", _source("cross-site", "no-cors", "empty"), _FORBIDDEN),
    ("form-get-into-a-frame", _source("cross-site", "navigate", "iframe"), _FORBIDDEN),
    ("top-level-navigation", _source("cross-site", "navigate", "document"), _FORBIDDEN),
    ("cors-fetch", _source("cross-site", "cors", "empty", "http://evil.test"), _FORBIDDEN),
    ("same-site-eventsource", _source("same-site", "cors", "empty", "http://other.relay.test"), _FORBIDDEN),
    ("cross-site-without-origin", _source("cross-site", "cors", "empty"), _FORBIDDEN),
    # A page of an origin in --cors-origin: CORS requests only, and only the API's kind.
    ("allowed-eventsource", _source("cross-site", "cors", "empty", ALLOWED), _OK),
    ("allowed-same-site-fetch", _source("same-site", "cors", "empty", ALLOWED), _OK),
    ("allowed-no-cors", _source("cross-site", "no-cors", "empty", ALLOWED), _FORBIDDEN),
    ("allowed-image", _source("cross-site", "no-cors", "image", ALLOWED), _FORBIDDEN),
    ("allowed-navigation", _source("cross-site", "navigate", "document", ALLOWED), _FORBIDDEN),
    ("allowed-prefetch", _source("cross-site", "cors", "empty", ALLOWED, purpose="prefetch"), _FORBIDDEN),
    # The relay's own page.
    ("own-eventsource", _source("same-origin", "cors", "empty"), _OK),
    ("own-fetch-post", _source("same-origin", "cors", "empty", RELAY), _OK),
    ("own-fetch-no-referrer", _source("same-origin", "cors", "empty", "null"), _OK),
    ("own-no-cors-fetch", _source("same-origin", "no-cors", "empty"), _OK),
    ("own-link-to-the-api", _source("same-origin", "navigate", "document"), _FORBIDDEN),
    ("own-prefetch", _source("same-origin", "no-cors", "empty", purpose="prefetch"), _FORBIDDEN),
    ("own-prerender", _source("same-origin", "navigate", "document", purpose="prefetch;prerender"), _FORBIDDEN),
    ("own-worker-script", _source("same-origin", "same-origin", "worker"), _FORBIDDEN),
    # The user's own act: a URL typed or bookmarked is a navigation; a browser's own fetch is not.
    ("typed-into-the-address-bar", _source("none", "navigate", "document"), _FORBIDDEN),
    ("user-initiated-fetch", _source("none", "cors", "empty"), _OK),
    # An unknown Sec-Fetch-Site is ignored, as the spec asks (the Origin decides); an unknown destination is not
    # one of the API's clients.
    ("unknown-site", _source("cross-origin", "cors", "empty"), _OK),
    ("unknown-site-foreign-origin", _source("cross-origin", "cors", "empty", "http://evil.test"), _FORBIDDEN),
    ("unknown-dest", _source("same-origin", "cors", "eventsource"), _FORBIDDEN),
    ("navigate-without-dest", _source("same-origin", "navigate"), _FORBIDDEN),
    ("nested-navigate", _source("cross-site", "nested-navigate", "document"), _FORBIDDEN),
    ("nested-navigate-same-origin", _source("same-origin", "nested-navigate"), _FORBIDDEN),
    ("dest-without-site", _source(None, None, "image"), _FORBIDDEN),
    # DNS rebinding: same-origin to the browser, but sent to the attacker's name.
    ("rebinding", _source("same-origin", "cors", "empty", "http://evil.test:8080", "evil.test:8080"),
     "421 misdirected_request"),
    ("rebinding-old-browser", _source(origin="http://evil.test:8080", host="evil.test:8080"),
     "421 misdirected_request"),
    # Clients that are not browsers (or browsers without Fetch Metadata): the Origin, when sent, is checked.
    ("curl", _source(), _OK),
    ("curl-by-address", _source(host="127.0.0.1:8080"), _OK),
    ("curl-without-host", _source(host=None), _OK),
    ("curl-by-unlisted-name", _source(host="relay.internal:8080"), "421 misdirected_request"),
    ("malformed-host", _source(host="relay.test/x"), "400 invalid_request"),
    ("old-browser-own-origin", _source(origin=RELAY), _OK),
    ("old-browser-own-origin-case", _source(origin=RELAY, host="Relay.Test:8080"), _OK),
    ("old-browser-allowed-origin", _source(origin=ALLOWED), _OK),
    ("old-browser-foreign-origin", _source(origin="http://evil.test"), _FORBIDDEN),
    ("old-browser-null-origin", _source(origin="null"), _FORBIDDEN),
    ("old-browser-other-scheme", _source(origin="https://relay.test:8080"), _FORBIDDEN),
    ("old-browser-other-port", _source(origin="http://127.0.0.1:9000", host="127.0.0.1:8080"), _FORBIDDEN),
    ("old-browser-prefetch", _source(purpose="prefetch"), _FORBIDDEN),
]  # fmt: skip


@pytest.mark.parametrize(("source", "expected"), [case[1:] for case in _CASES], ids=[case[0] for case in _CASES])
def test_check_api_request(source: SourceHeaders, expected: str) -> None:
    assert _verdict(source) == expected


def test_a_listed_https_origin_is_the_relays_own_behind_a_tls_proxy() -> None:
    # The proxy speaks http to the relay: the request's scheme is http, the page's origin https.
    source = _source(origin=BEHIND_TLS, host="chat.example.com")
    assert _verdict(source, scheme="http") == _OK
    assert _verdict(source, scheme="http", policy=OriginPolicy()) == "421 misdirected_request"
    by_address = _source(origin="https://127.0.0.1:8443", host="127.0.0.1:8443")
    assert _verdict(by_address, scheme="https", policy=OriginPolicy()) == _OK
    assert _verdict(by_address, scheme="http", policy=OriginPolicy()) == _FORBIDDEN


def test_without_cors_origins_no_other_site_may_call() -> None:
    policy = OriginPolicy.from_settings([RELAY])
    assert _verdict(_source("cross-site", "cors", "empty", ALLOWED), policy=policy) == _FORBIDDEN
    assert _verdict(_source("same-origin", "cors", "empty"), policy=policy) == _OK


@pytest.mark.parametrize(
    ("headers", "source"),
    [
        ({}, SourceHeaders()),
        (
            {"Host": "relay.test", "Origin": ALLOWED, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors",
             "Sec-Fetch-Dest": "empty", "Sec-Purpose": "prefetch", "Accept": "*/*"},
            SourceHeaders("relay.test", ALLOWED, "cross-site", "cors", "empty", "prefetch"),
        ),
    ],
    ids=["none", "all"],
)  # fmt: skip
def test_source_headers_from_headers(headers: dict[str, str], source: SourceHeaders) -> None:
    assert SourceHeaders.from_headers(headers) == source


@pytest.mark.parametrize(
    ("purpose", "prefetch"),
    [("prefetch", True), ("prefetch;prerender", True), ("prefetch; anonymous-client-ip", True),
     ("other, prefetch", True), ("prefetcher", False), ("", False)],
)  # fmt: skip
def test_sec_purpose(purpose: str, prefetch: bool) -> None:
    expected = _FORBIDDEN if prefetch else _OK
    assert _verdict(_source("same-origin", "cors", "empty", purpose=purpose)) == expected
