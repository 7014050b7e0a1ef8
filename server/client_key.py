"""Who is asking: the key that admission control counts a request against.

* With ``--api-keys-file``, the client is its API key (``Authorization: Bearer <key>``): a missing or unknown key
  is refused with 401 before anything else is counted. The key itself is never stored: the client key is
  ``key:`` and the start of its SHA-256, which is all that reaches the limiter (and Redis). Failures are counted
  per client address (`server/auth_failures.py`): past ``--auth-failures`` of them, the address gets 429 with
  Retry-After, before its key is even looked at.
* Otherwise the client is its address, ``ip:<address>``. The address is the peer of the TCP connection, unless
  that peer is one of ``--trusted-proxy``: then ``X-Forwarded-For`` is read from the right, skipping trusted
  proxies, and the first address no trusted proxy vouches for is the client. Anyone else's ``X-Forwarded-For``
  is ignored: it is a header any client can write.
* An IPv6 client is counted by its /64 network: one host is routinely given a whole /64 (RFC 6177 recommends
  at least that per site, SLAAC needs it), so counting single IPv6 addresses would give one machine 2^64 buckets.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from aiohttp import hdrs, web

from .auth_failures import AuthFailurePolicy, AuthFailures
from .budget_backends import KeyBudget
from .config import Config, ConfigError
from .errors import TooManyAuthFailures, Unauthorized
from .limits import parse_rate

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_IPV6_CLIENT_PREFIX = 64
_KEY_ID_HEX = 16  # 64 bits of SHA-256: tells keys apart, and is useless for guessing one
# RFC 6750 §3: a 401 for a bearer token says so in WWW-Authenticate (RFC 9110 §11.6.1 makes the field a MUST).
_CHALLENGE = 'Bearer realm="llm-relay"'


def parse_address(text: str) -> IPAddress | None:
    """An address as proxies write it in ``X-Forwarded-For``: bare, ``[v6]:port`` or ``v4:port``; else None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has at least two colons
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # the same IPv4 client, whichever socket family it arrived on
    return address


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``--trusted-proxy`` values: addresses or networks (``10.0.0.0/8``, ``::1``); a typo is an error."""
    networks: list[IPNetwork] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"--trusted-proxy: not an address or network: {entry!r}") from None
    return tuple(networks)


def address_key(address: IPAddress) -> str:
    """The client key of an address: IPv4 as is, IPv6 by its /64."""
    if isinstance(address, ipaddress.IPv6Address):
        network = ipaddress.IPv6Network((address, _IPV6_CLIENT_PREFIX), strict=False)
        return f"ip:{network}"
    return f"ip:{address}"


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]) -> str:
    """The client key for a connection from `peer` carrying the ``X-Forwarded-For`` values `forwarded_for`.

    Each proxy appends the address it received the request from, so the list reads left to right from the
    client towards us, and only the entries appended by proxies we trust are true. Walking from the right, the
    first address that is not a trusted proxy is the client. The leftmost entry is whatever the client chose to
    write, so it is used only when every hop is trusted.
    """
    address = parse_address(peer) if peer else None
    if address is None:
        return "ip:unknown"  # a Unix socket (or a test transport) has no address: one shared key
    if not trusted or not _is_trusted(address, trusted):
        return address_key(address)
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        reported = parse_address(hop)
        if reported is None:
            break  # a trusted proxy wrote something that is not an address: stop at that proxy
        address = reported
        if not _is_trusted(address, trusted):
            break
    return address_key(address)


def _is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


def _digest(key: str) -> bytes:
    # A header's bytes that are not UTF-8 (a key typed with an accent and sent as Latin-1, a pasted non-breaking
    # space) reach us as lone surrogates (aiohttp decodes with "surrogateescape"): hashed as the bytes they were,
    # such a key is simply not a valid one.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class APIKeys:
    """The accepted client keys, held as SHA-256 digests and compared in constant time."""

    __slots__ = ("_budgets", "_digests")

    def __init__(self, keys: Iterable[str], budgets: Mapping[str, KeyBudget] | None = None) -> None:
        self._digests = tuple(dict.fromkeys(_digest(key) for key in keys))
        if not self._digests:
            raise ValueError("no API keys given")
        # Per-key token budgets, by client key (never by the key itself).
        self._budgets = {_client_key(_digest(key)): budget for key, budget in (budgets or {}).items()}

    @property
    def budgets(self) -> Mapping[str, KeyBudget]:
        """Each key's own token budget values from the keys file, by client key (``key:...``)."""
        return self._budgets

    @classmethod
    def from_file(cls, path: str | Path) -> APIKeys:
        """One key per line; blank lines and lines starting with ``#`` are skipped, spaces around a key too.

        A key may be followed by its own token budget: ``<key> tokens_per_minute=20000 tokens_per_day=1000000``
        (either or both; they replace ``--tokens-per-minute`` and ``--tokens-per-day`` for that key, and 0 turns
        one off). A bearer token never holds a space (RFC 6750 §2.1), so the first word is always the key.

        A file that cannot be read or holds no key is a `ConfigError`: the relay must not start open to everyone.
        """
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--api-keys-file {path}: {exc.strerror or 'cannot be read'}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--api-keys-file {path}: not UTF-8 text") from None
        keys: list[str] = []
        budgets: dict[str, KeyBudget] = {}
        for number, line in enumerate(lines, 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            keys.append(words[0])
            if len(words) > 1:
                budgets[words[0]] = _key_budget(words[1:], f"--api-keys-file {path}, line {number}")
        if not keys:
            raise ConfigError(f"--api-keys-file {path}: the file holds no keys")
        return cls(keys, budgets)

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, authorization: str | None) -> str:
        """The client key for an ``Authorization`` field value; `Unauthorized` without a known key."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        # RFC 9110 §11.1: the auth-scheme is case-insensitive.
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "send your API key as Authorization: Bearer <key>",
                headers={hdrs.WWW_AUTHENTICATE: _CHALLENGE},
            )
        presented = _digest(token)
        # Compare against every key, with no early exit: the time taken says nothing about which key, or how
        # much of one, matched. Comparing digests makes it independent of the keys' lengths too.
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(presented, digest)
        if not found:
            raise Unauthorized(
                "this API key is not valid",
                headers={hdrs.WWW_AUTHENTICATE: f'{_CHALLENGE}, error="invalid_token"'},
            )
        return _client_key(presented)


def _client_key(digest: bytes) -> str:
    return f"key:{digest.hex()[:_KEY_ID_HEX]}"


_KEY_BUDGET_FIELDS = ("tokens_per_minute", "tokens_per_day")


def _key_budget(words: Sequence[str], where: str) -> KeyBudget:
    """``name=value`` words after a key. The message names the line, never the key on it."""
    values: dict[str, int] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or name not in _KEY_BUDGET_FIELDS:
            raise ConfigError(f"{where}: expected tokens_per_minute=N or tokens_per_day=N after the key")
        if not value.isdigit():
            raise ConfigError(f"{where}: {name} must be a whole number of tokens")
        values[name] = int(value)
    return KeyBudget(**values)


class ClientIdentifier:
    """``(request) -> client key``, as `server.app.build_identify` installs it; raises `Unauthorized`, or
    `TooManyAuthFailures` for an address that failed to authenticate too often."""

    __slots__ = ("api_keys", "auth_failures", "clock", "trusted_proxies")

    def __init__(
        self,
        *,
        trusted_proxies: Sequence[IPNetwork] = (),
        api_keys: APIKeys | None = None,
        auth_failures: AuthFailures | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trusted_proxies = tuple(trusted_proxies)
        self.api_keys = api_keys
        self.auth_failures = auth_failures
        self.clock = clock

    @classmethod
    def from_config(cls, config: Config) -> ClientIdentifier:
        api_keys = APIKeys.from_file(config.api_keys_file) if config.api_keys_file else None
        policy = AuthFailurePolicy(config.auth_failures, parse_rate(config.auth_failure_rate))
        return cls(
            trusted_proxies=parse_networks(config.trusted_proxies),
            api_keys=api_keys,
            auth_failures=AuthFailures(policy) if api_keys is not None and policy.enabled else None,
        )

    def address(self, request: web.Request) -> str:
        """The client key of the request's address (``ip:...``), whether or not API keys are configured."""
        forwarded: list[str] = request.headers.getall(hdrs.X_FORWARDED_FOR, []) if self.trusted_proxies else []
        return client_address(request.remote, forwarded, self.trusted_proxies)

    def __call__(self, request: web.Request) -> str:
        if self.api_keys is None:
            return self.address(request)
        authorization = request.headers.get(hdrs.AUTHORIZATION)
        failures = self.auth_failures
        if failures is None:
            return self.api_keys.identify(authorization)
        address = self.address(request)
        now = self.clock()
        wait = failures.retry_after(address, now)
        if wait is not None:
            raise TooManyAuthFailures(
                f"too many failed attempts to authenticate from your address; try again in {math.ceil(wait)} s",
                retry_after=wait,
            )
        try:
            return self.api_keys.identify(authorization)
        except Unauthorized:
            failures.failed(address, now)
            raise
