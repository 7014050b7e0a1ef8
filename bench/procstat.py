"""CPU time and memory of a server's process tree, and the kernel's listen overflows, read from /proc (Linux only).

The tree, not the pid alone: gunicorn serves from a worker process forked by its master.
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    # /proc/<pid>/task/<tid>/children needs CONFIG_PROC_CHILDREN, which this kernel lacks: scan every process.
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 onwards), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: the fields start after the last ')'.
    return stat[stat.rindex(b")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    tree = [pid]
    index = 0
    while index < len(tree):
        tree.extend(_children(tree[index]))
        index += 1
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of `pids` (fields 14 and 15 of /proc/<pid>/stat), in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _TICK


def rss_bytes(pids: list[int]) -> int:
    """Resident set size (VmRSS of /proc/<pid>/status) of `pids`, summed, in bytes."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def write_syscalls(pids: list[int]) -> int | None:
    """write(2)-family calls made by `pids` (``syscw`` of /proc/<pid>/io; a socket's write and writev count, its
    send and sendmsg do not, and asyncio's and uvloop's transports write with write/writev), or None if any of
    them cannot be read."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io", "rb") as f:
                for line in f:
                    if line.startswith(b"syscw:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            return None
    return total


def core_busy_seconds(core: str) -> float:
    """Busy time of one core (``cpu0``) from /proc/stat: everything but idle and iowait, in seconds."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(core.encode() + b" "):
                values = [int(v) for v in line.split()[1:]]
                idle = values[3] + values[4]
                # guest time is already counted in user time
                return (sum(values[:8]) - idle) / _TICK
    return 0.0


def listen_overflows() -> int | None:
    """Connections the kernel dropped because a listen queue was full (``TcpExtListenOverflows`` of
    /proc/net/netstat, for the whole network namespace), or None where it cannot be read."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # The file is pairs of lines: the counters' names, then their values, each line starting with its group.
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            counters = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            if "ListenOverflows" in counters:
                return int(counters["ListenOverflows"])
    return None
