"""Who a request is counted against: its address, a trusted proxy's word for it, or its API key."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.app import create_app
from server.auth_failures import AuthFailurePolicy, AuthFailures
from server.client_key import (
    APIKeys,
    ClientIdentifier,
    address_key,
    client_address,
    parse_address,
    parse_networks,
)
from server.config import Config, ConfigError
from server.errors import Unauthorized
from server.state import RELAY

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]

PROXIES = parse_networks(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.7", "192.0.2.7"),
        (" 192.0.2.7 ", "192.0.2.7"),
        ("192.0.2.7:8080", "192.0.2.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        ("999.1.1.1", None),
    ],
    ids=["v4", "spaces", "v4-port", "v6", "v6-port", "v4-mapped", "unknown", "obfuscated", "empty", "bad-octet"],
)
def test_parse_address(text: str, expected: str | None) -> None:
    parsed = parse_address(text)
    assert (None if parsed is None else str(parsed)) == expected


def test_ipv6_clients_are_counted_by_their_64() -> None:
    one = ipaddress.IPv6Address("2001:db8:1:2::10")
    same_host = ipaddress.IPv6Address("2001:db8:1:2:ffff:ffff:ffff:ffff")
    neighbour = ipaddress.IPv6Address("2001:db8:1:3::10")
    assert address_key(one) == "ip:2001:db8:1:2::/64"
    assert address_key(one) == address_key(same_host)
    assert address_key(one) != address_key(neighbour)
    assert address_key(ipaddress.IPv4Address("192.0.2.7")) == "ip:192.0.2.7"


def test_a_trusted_proxy_typo_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"not an address or network: '10\.0\.0\.0/33'"):
        parse_networks(["10.0.0.0/33"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("192.0.2.7", [], "ip:192.0.2.7"),
        ("192.0.2.7", ["198.51.100.1"], "ip:192.0.2.7"),
        ("10.1.1.1", [], "ip:10.1.1.1"),
        ("10.1.1.1", ["198.51.100.1"], "ip:198.51.100.1"),
        ("10.1.1.1", ["6.6.6.6, 198.51.100.1, 10.2.2.2"], "ip:198.51.100.1"),
        ("10.1.1.1", ["6.6.6.6", "198.51.100.1"], "ip:198.51.100.1"),
        ("10.1.1.1", ["10.3.3.3, 10.2.2.2"], "ip:10.3.3.3"),
        ("10.1.1.1", ["198.51.100.1, garbage"], "ip:10.1.1.1"),
        ("10.1.1.1", ["198.51.100.1:5555"], "ip:198.51.100.1"),
        ("10.1.1.1", ["2001:db8:1:2::99"], "ip:2001:db8:1:2::/64"),
        ("fd00::1", ["[2001:db8::5]:1234"], "ip:2001:db8::/64"),
        ("::ffff:10.1.1.1", ["198.51.100.1"], "ip:198.51.100.1"),
        (None, ["198.51.100.1"], "ip:unknown"),
    ],
    ids=[
        "direct",
        "spoofed-by-a-client",
        "trusted-proxy-without-header",
        "trusted-proxy",
        "chain-read-from-the-right",
        "header-repeated",
        "all-hops-trusted",
        "garbage-stops-at-the-proxy",
        "with-port",
        "v6-client",
        "v6-proxy",
        "v4-mapped-proxy",
        "no-peer",
    ],
)
def test_client_address(peer: str | None, forwarded: list[str], expected: str) -> None:
    assert client_address(peer, forwarded, PROXIES) == expected


def test_without_trusted_proxies_the_header_is_never_read() -> None:
    assert client_address("127.0.0.1", ["198.51.100.1"], ()) == "ip:127.0.0.1"


# -- API keys ----------------------------------------------------------------------------------------------------


def _keys_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_api_keys_file_skips_comments_and_blanks(tmp_path: Path) -> None:
    keys = APIKeys.from_file(_keys_file(tmp_path, "# team A\nalpha-key\n\n   beta-key  \n#gamma\n"))
    assert len(keys) == 2
    assert keys.identify("Bearer alpha-key") != keys.identify("Bearer beta-key")


def test_an_empty_keys_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no keys"):
        APIKeys.from_file(_keys_file(tmp_path, "# nothing yet\n\n"))
    with pytest.raises(ValueError, match="no API keys"):
        APIKeys([])


def test_a_keys_file_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--api-keys-file \S+absent: No such file or directory$"):
        APIKeys.from_file(tmp_path / "absent")
    with pytest.raises(ConfigError, match="Is a directory"):
        APIKeys.from_file(tmp_path)
    binary = tmp_path / "keys.bin"
    binary.write_bytes(b"\xff\xfe key")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        APIKeys.from_file(binary)
    with pytest.raises(ConfigError, match="holds no keys"):
        APIKeys.from_file(_keys_file(tmp_path, "\n"))


def test_the_key_is_not_the_client_key() -> None:
    keys = APIKeys(["sk-secret-0123456789"])
    client = keys.identify("Bearer sk-secret-0123456789")
    assert client.startswith("key:")
    assert "secret" not in client
    assert client == keys.identify("bearer   sk-secret-0123456789 ")  # RFC 9110 §11.1: scheme is case-insensitive


@pytest.mark.parametrize(
    ("authorization", "challenge"),
    [
        (None, 'Bearer realm="llm-relay"'),
        ("", 'Bearer realm="llm-relay"'),
        ("Bearer", 'Bearer realm="llm-relay"'),
        ("Basic YWxhZGRpbjpvcGVuc2VzYW1l", 'Bearer realm="llm-relay"'),
        ("Bearer not-a-key", 'Bearer realm="llm-relay", error="invalid_token"'),
        ("Bearer good-key-but-longer", 'Bearer realm="llm-relay", error="invalid_token"'),
        # b"Bearer good-k\xe9y" as aiohttp decodes a field that is not UTF-8 ("surrogateescape").
        ("Bearer good-k\udce9y", 'Bearer realm="llm-relay", error="invalid_token"'),
    ],
    ids=["missing", "empty", "no-token", "other-scheme", "unknown", "prefix-match-is-no-match", "not-utf8"],
)
def test_without_a_known_key_401(authorization: str | None, challenge: str) -> None:
    keys = APIKeys(["good-key"])
    with pytest.raises(Unauthorized) as refused:
        keys.identify(authorization)
    assert refused.value.status == 401
    assert refused.value.headers["WWW-Authenticate"] == challenge


def test_from_config(tmp_path: Path) -> None:
    identify = ClientIdentifier.from_config(
        Config(trusted_proxies=("10.0.0.0/8",), api_keys_file=str(_keys_file(tmp_path, "k1\n")))
    )
    assert identify.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    assert identify.api_keys is not None
    assert identify.auth_failures is not None
    assert identify.auth_failures.policy == AuthFailurePolicy(10, 0.1)  # the defaults: 10 failures, 6/m
    assert ClientIdentifier.from_config(Config()).api_keys is None
    assert ClientIdentifier.from_config(Config()).auth_failures is None  # no keys, nothing to fail
    no_limit = Config(api_keys_file=str(_keys_file(tmp_path, "k1\n")), auth_failures=0)
    assert ClientIdentifier.from_config(no_limit).auth_failures is None


# -- over HTTP ---------------------------------------------------------------------------------------------------

ONE_REQUEST = Config(provider="demo", demo_delay=0.0, heartbeat=0.0, rate="1/m", burst=1)


async def _status(client: TestClient[Any, Any], headers: dict[str, str] | None = None) -> int:
    async with client.get("/api/chat", params={"prompt": "hi"}, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_a_spoofed_forwarded_for_changes_nothing(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(ONE_REQUEST))
    assert await _status(client, {"X-Forwarded-For": "198.51.100.1"}) == 200
    # Another made-up address is still the same peer, 127.0.0.1, whose one request is spent.
    assert await _status(client, {"X-Forwarded-For": "198.51.100.2"}) == 429
    assert await _status(client) == 429


async def test_a_trusted_proxy_is_believed(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(ONE_REQUEST.with_changes(trusted_proxies=("127.0.0.1",))))
    assert await _status(client, {"X-Forwarded-For": "198.51.100.1"}) == 200
    assert await _status(client, {"X-Forwarded-For": "198.51.100.2"}) == 200
    assert await _status(client, {"X-Forwarded-For": "6.6.6.6, 198.51.100.1"}) == 429


async def test_api_keys_over_http(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    config = ONE_REQUEST.with_changes(api_keys_file=str(_keys_file(tmp_path, "key-one\nkey-two\n")))
    client = await aiohttp_client(create_app(config))
    async with client.get("/api/chat", params={"prompt": "hi"}) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="llm-relay"'
        assert (await resp.json())["error"]["type"] == "unauthorized"
    async with client.get("/api/chat", params={"prompt": "hi"}, headers={"Authorization": "Bearer nope"}) as resp:
        assert resp.status == 401
        assert "key-one" not in await resp.text()
    assert await _status(client, {"Authorization": "Bearer key-one"}) == 200
    assert await _status(client, {"Authorization": "Bearer key-one"}) == 429
    assert await _status(client, {"Authorization": "Bearer key-two"}) == 200  # each key has its own budget
    async with client.get("/healthz") as resp:
        assert resp.status == 200  # health checks need no key


# -- failed authentication, per address ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_address_that_keeps_failing_gets_429_before_its_key_is_looked_at(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    config = Config(
        provider="demo", demo_delay=0.0, heartbeat=0.0, trusted_proxies=("127.0.0.1",),
        api_keys_file=str(_keys_file(tmp_path, "key-one\n")),
    )  # fmt: skip
    app = create_app(config)
    clock = FakeClock()
    app[RELAY].identify = ClientIdentifier(
        trusted_proxies=parse_networks(["127.0.0.1"]),
        api_keys=APIKeys(["key-one"]),
        auth_failures=AuthFailures(AuthFailurePolicy(failures=3, rate=0.1)),
        clock=clock,
    )
    client = await aiohttp_client(app)
    guesser = {"X-Forwarded-For": "203.0.113.9"}
    for guess in ("nope-1", "nope-2", None):  # a missing key is a failure too
        auth = {"Authorization": f"Bearer {guess}"} if guess else {}
        assert await _status(client, guesser | auth) == 401
    async with client.get(
        "/api/chat", params={"prompt": "hi"}, headers=guesser | {"Authorization": "Bearer nope-4"}
    ) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "10"  # one failure is forgiven every 10 s
        error = (await resp.json())["error"]
        assert error["type"] == "auth_rate_limited"
        assert "nope" not in error["message"]
    # The right key from that address waits too: the check comes before the key, or guessing would go on.
    assert await _status(client, guesser | {"Authorization": "Bearer key-one"}) == 429
    # Another address is not affected.
    assert await _status(client, {"X-Forwarded-For": "198.51.100.1", "Authorization": "Bearer key-one"}) == 200
    clock.now += 10
    assert await _status(client, guesser | {"Authorization": "Bearer key-one"}) == 200
    assert await _status(client, guesser | {"Authorization": "Bearer nope-5"}) == 401
    assert await _status(client, guesser | {"Authorization": "Bearer nope-6"}) == 429
