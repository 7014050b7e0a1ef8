"""The listen backlog: how many connections the kernel holds for the relay before it accepts them.

After a restart every browser's EventSource reconnects at once. Connections beyond the backlog are dropped by the
kernel (``TcpExtListenOverflows`` in ``/proc/net/netstat``) and their clients wait for a SYN retransmit (1 s, then
3 s, 7 s...) before they are even accepted, so the backlog has to cover a reconnect storm, not the steady arrival
rate; aiohttp's default of 128 does not. Linux silently lowers any ``listen()`` backlog to
``net.core.somaxconn`` (listen(2)), so the relay reads that limit and says so when it applies.

`listen_backlog` is the arithmetic (no IO); `effective_backlog` reads the kernel's limit and logs the cap.
"""

from __future__ import annotations

import logging
from pathlib import Path

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def listen_backlog(requested: int, kernel_limit: int | None) -> int:
    """The backlog the kernel will really use for `requested` (None: the limit is unknown).

    >>> listen_backlog(4096, 128)
    128
    >>> listen_backlog(1024, 4096)
    1024
    >>> listen_backlog(4096, None)
    4096
    """
    if kernel_limit is None or kernel_limit <= 0:
        return requested
    return min(requested, kernel_limit)


def read_kernel_limit(path: Path = SOMAXCONN) -> int | None:
    """``net.core.somaxconn``, or None where it cannot be read (not Linux, no /proc)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def effective_backlog(requested: int, log: logging.Logger, path: Path = SOMAXCONN) -> int:
    """The backlog to listen with; a warning names the kernel's limit when it lowers `requested`."""
    limit = read_kernel_limit(path)
    backlog = listen_backlog(requested, limit)
    if backlog < requested:
        log.warning(
            "listen backlog %d capped to %d by the kernel (%s); raise it with sysctl net.core.somaxconn=%d",
            requested,
            backlog,
            path,
            requested,
        )
    return backlog
