"""gunicorn workers that serve the relay with gunicorn's ``backlog`` setting.

aiohttp's `GunicornWebWorker` starts a `web.SockSite` on each of gunicorn's listening sockets without a backlog, so
the event loop's ``create_server`` listens on them again with aiohttp's default of 128, whatever ``--backlog``
said (aio-libs/aiohttp#5283, open in aiohttp 3.14). Linux lets a listening socket be given a new backlog by another
``listen()``, so these workers listen once more with gunicorn's setting (capped by net.core.somaxconn, and logged
when it is) as soon as the sites have started.

No public hook runs after aiohttp's worker has started its sites; it calls gunicorn's ``notify()`` (the worker's
heartbeat, a public method of gunicorn's `Worker`) right after, and then every second. The first call is the hook.
tests/test_gunicorn.py pins this against a real gunicorn, reading the backlog the kernel reports.
"""

from __future__ import annotations

from typing import Any

from aiohttp.worker import GunicornUVLoopWebWorker, GunicornWebWorker

from .backlog import effective_backlog


class _ListensWithGunicornsBacklog:
    cfg: Any
    log: Any
    sockets: list[Any]
    _backlog_applied = False

    def notify(self) -> None:
        if not self._backlog_applied:
            self._backlog_applied = True
            self._apply_backlog()
        super().notify()  # type: ignore[misc]

    def _apply_backlog(self) -> None:
        backlog = effective_backlog(self.cfg.backlog, self.log)
        for sock in self.sockets:
            try:
                sock.listen(backlog)
            except OSError as exc:  # gunicorn notes that a second listen() can be denied (SELinux)
                self.log.warning("could not set the listen backlog of %s to %d: %s", sock, backlog, exc)


class RelayWebWorker(_ListensWithGunicornsBacklog, GunicornWebWorker):
    """aiohttp's worker on asyncio's event loop, listening with gunicorn's backlog."""


class RelayUVLoopWebWorker(_ListensWithGunicornsBacklog, GunicornUVLoopWebWorker):
    """aiohttp's worker on uvloop, listening with gunicorn's backlog."""
