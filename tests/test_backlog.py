"""server/backlog.py: the backlog the kernel really uses, and the warning when net.core.somaxconn lowers it."""

from __future__ import annotations

import doctest
import logging
from pathlib import Path

import pytest

import server.backlog
from server.backlog import effective_backlog, listen_backlog, read_kernel_limit


def test_doctests() -> None:
    failures, tried = doctest.testmod(server.backlog)
    assert tried > 0
    assert failures == 0


@pytest.mark.parametrize(
    ("requested", "limit", "expected"),
    [
        (4096, 128, 128),  # an older kernel's default somaxconn
        (4096, 4096, 4096),  # Linux 5.4+'s default
        (1024, 4096, 1024),
        (65535, 4096, 4096),
        (4096, None, 4096),  # unknown (not Linux): the kernel caps it silently, if at all
        (4096, 0, 4096),  # a limit that makes no sense is not believed
    ],
    ids=["old-default", "equal", "below", "above", "unknown", "nonsense"],
)
def test_listen_backlog(requested: int, limit: int | None, expected: int) -> None:
    assert listen_backlog(requested, limit) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096\n", 4096), ("128", 128), ("", None), ("many\n", None)],
    ids=["newline", "bare", "empty", "garbage"],
)
def test_read_kernel_limit(tmp_path: Path, text: str, expected: int | None) -> None:
    path = tmp_path / "somaxconn"
    path.write_text(text)
    assert read_kernel_limit(path) == expected


def test_read_kernel_limit_without_the_file(tmp_path: Path) -> None:
    assert read_kernel_limit(tmp_path / "absent") is None


def test_a_cap_is_logged_with_the_kernels_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "somaxconn"
    path.write_text("128\n")
    log = logging.getLogger("test_backlog")
    with caplog.at_level(logging.INFO, logger="test_backlog"):
        assert effective_backlog(4096, log, path) == 128
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "4096 capped to 128" in record.getMessage()
    assert str(path) in record.getMessage()


@pytest.mark.parametrize("limit", ["4096\n", None], ids=["room", "unknown"])
def test_no_cap_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture, limit: str | None) -> None:
    path = tmp_path / "somaxconn"
    if limit is not None:
        path.write_text(limit)
    log = logging.getLogger("test_backlog")
    with caplog.at_level(logging.INFO, logger="test_backlog"):
        assert effective_backlog(4096, log, path) == 4096
    assert caplog.records == []
