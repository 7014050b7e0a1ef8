"""The process at its file-descriptor limit: recognised, answered with 503, and logged once per episode.

Every socket, file and pipe takes a descriptor; at the limit (``ulimit -n``) the kernel refuses new ones with
EMFILE (ENFILE when the whole system is out). Two places fail then:

* **accepting** a connection. asyncio's accept loop hands "socket.accept() out of system resource" to the loop's
  exception handler, with a traceback, for each failed ``accept()`` (its loop goes on after the error, up to the
  backlog, and schedules a retry each time: CPython gh-151615), and stops accepting for a second; uvloop (libuv)
  accepts the connection and closes it again, silently. Either way that client gets no answer: there is no
  descriptor to answer on. `install_accept_warning` replaces asyncio's tracebacks with the warning below, in the
  relay's own processes only.
* **inside a request**: opening the upstream connection, or anything else that needs a descriptor (the openai
  client's first request imports a module, which opens its file). The provider turns that into
  `server.errors.OutOfDescriptors`: the client whose connection was accepted gets 503 ``server_overloaded``
  with Retry-After, not a 500 and a traceback.

Both report through `warn_out_of_descriptors`, which logs one warning when an episode starts (no failure in the
last `EPISODE_QUIET` seconds), not one per failure: `EpisodeLog` decides, with the time passed in. Descriptors
belong to the process, so there is one `EpisodeLog` per process.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})
EPISODE_QUIET = 30.0  # seconds without a failure that end an episode
_CHAIN_DEPTH = 16

log = logging.getLogger("llm_relay.descriptors")


def out_of_descriptors(exc: BaseException) -> bool:
    """True if `exc`, or an exception it was raised from or during, is EMFILE or ENFILE.

    Clients wrap the error (aiohttp in ``ClientConnectorError``, the openai package in ``APIConnectionError``);
    the original `OSError` stays in the chain of causes.

    >>> out_of_descriptors(OSError(errno.EMFILE, "Too many open files"))
    True
    >>> try:
    ...     try:
    ...         raise OSError(errno.ENFILE, "Too many open files in system")
    ...     except OSError as cause:
    ...         raise RuntimeError("connection failed") from cause
    ... except RuntimeError as wrapped:
    ...     out_of_descriptors(wrapped)
    True
    >>> out_of_descriptors(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    False
    """
    seen: BaseException | None = exc
    for _ in range(_CHAIN_DEPTH):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in OUT_OF_DESCRIPTORS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class EpisodeLog:
    """Tells the first failure of an episode from the rest: an episode ends after `quiet` seconds without one.

    >>> episodes = EpisodeLog(quiet=30.0)
    >>> [episodes.starts_episode(now) for now in (100.0, 101.0, 125.0, 154.0, 160.0)]
    [True, False, False, False, False]
    >>> episodes.starts_episode(190.0), episodes.failures
    (True, 1)
    """

    __slots__ = ("_last", "failures", "quiet")

    def __init__(self, quiet: float = EPISODE_QUIET) -> None:
        self.quiet = quiet
        self._last: float | None = None
        self.failures = 0  # in the current episode

    def starts_episode(self, now: float) -> bool:
        new = self._last is None or now - self._last >= self.quiet
        self._last = now
        self.failures = 1 if new else self.failures + 1
        return new


# -- in the process -----------------------------------------------------------------------------------------------

_EPISODES = EpisodeLog()


def warn_out_of_descriptors(
    while_doing: str, *, episodes: EpisodeLog = _EPISODES, clock: Callable[[], float] = time.monotonic
) -> None:
    """Log the start of an episode at the descriptor limit; later failures of the episode only at debug level."""
    if episodes.starts_episode(clock()):
        log.warning(
            "out of file descriptors (EMFILE/ENFILE) while %s: clients are refused (503) or not accepted until "
            "descriptors free up; raise the limit (ulimit -n, LimitNOFILE=) or lower --max-streams",
            while_doing,
        )
    else:
        log.debug("out of file descriptors while %s (%d in this episode)", while_doing, episodes.failures)


def install_accept_warning(loop: asyncio.AbstractEventLoop, *, episodes: EpisodeLog = _EPISODES) -> None:
    """Report the loop's accept failures at the descriptor limit through `warn_out_of_descriptors`.

    Only for the relay's own processes (``python -m server``, the gunicorn app): the loop's exception handler is
    the process's to set, never an embedding app's. Every other report goes on to the handler that was set before
    (or the loop's default one).
    """
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and out_of_descriptors(exc):
            warn_out_of_descriptors("accepting connections", episodes=episodes)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


__all__ = ["EpisodeLog", "install_accept_warning", "out_of_descriptors", "warn_out_of_descriptors"]
