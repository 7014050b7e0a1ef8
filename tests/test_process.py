"""``python -m server`` as a real process: it starts on its defaults, serves, and shuts down gracefully on SIGTERM;
it listens with its backlog, relays the upstream it is given, and a startup error is one line and exit status 2."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from server.backlog import read_kernel_limit

from .fake_upstream import FakeUpstream
from .processes import ROOT, clean_env, free_port, listen_backlog, needs_ss, running_server, start_server, wait_up
from .raw_http import closed_by_server, connect, post_head, read_response
from .wire import ndjson_objects, sse_events, sse_text

SOMAXCONN = read_kernel_limit()


async def test_sigterm_ends_open_streams_in_band_and_exits_within_the_grace_period(tmp_path: Path) -> None:
    port = free_port()
    proc = start_server(port, "--demo-delay", "0.05", "--shutdown-grace", "3", stderr=tmp_path / "stderr")
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_up(base, http)
            async with http.get(f"{base}/healthz") as resp:
                assert (await resp.json())["provider"] == "demo"  # the embedded default, no key needed
            sse = await http.get(f"{base}/api/chat", params={"prompt": "x"})
            ndjson = await http.get(f"{base}/api/chat", params={"prompt": "x", "format": "ndjson"})
            await sse.content.readuntil(b"\n\n")
            await ndjson.content.readline()
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            sse_body = await asyncio.wait_for(sse.read(), 10)
            ndjson_body = await asyncio.wait_for(ndjson.read(), 10)
        code = await asyncio.to_thread(proc.wait, 10)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0
    assert took < 3 + 2  # the grace period, plus interpreter exit
    # The reconnection hint is jittered per stream, between the configured hint and twice it.
    retry = re.search(rb"\nretry: (\d+)\n\n", sse_body)
    assert retry is not None
    assert 3000 <= int(retry[1]) <= 6000
    assert sse_events(sse_body)[-1][1]["error"]["type"] == "server_shutdown"
    assert ndjson_objects(ndjson_body)[-1]["error"]["type"] == "server_shutdown"
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr
    with socket.socket() as sock:  # no longer accepting
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_help_lists_every_option_with_its_environment_variable() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    options = (
        "--host", "--port", "--provider", "--base-url", "--api-key", "--model", "--demo-delay",
        "--first-token-timeout", "--idle-timeout", "--total-timeout", "--write-timeout", "--heartbeat",
        "--cors-origin", "--rate", "--burst", "--redis-url", "--trusted-proxy", "--api-keys-file",
        "--request-head-timeout", "--request-body-timeout", "--auth-failures", "--auth-failure-rate",
    )  # fmt: skip
    for option in options:
        assert option in out
        assert "LLM_RELAY_" + option[2:].upper().replace("-", "_") in out.replace("\n", "").replace(" ", "")
    assert "OPENAI_API_KEY" in out


# -- listening, upstream, startup errors ----------------------------------------------------------------------------


@needs_ss
@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], min(4096, SOMAXCONN or 4096)), (["--backlog", "1000"], 1000)],
    ids=["default", "option"],
)
async def test_listens_with_the_backlog(tmp_path: Path, argv: list[str], expected: int) -> None:
    async with running_server(tmp_path, *argv) as server:
        assert listen_backlog(server.port) == expected
    assert f"(backlog {expected})" in server.stderr.read_text()
    assert "capped" not in server.stderr.read_text()


@needs_ss
@pytest.mark.skipif(SOMAXCONN is None or SOMAXCONN >= 65535, reason="needs a readable somaxconn below 65535")
async def test_a_backlog_above_the_kernels_limit_is_capped_and_logged(tmp_path: Path) -> None:
    async with running_server(tmp_path, "--backlog", "65535") as server:
        assert listen_backlog(server.port) == SOMAXCONN
    text = server.stderr.read_text()
    assert f"listen backlog 65535 capped to {SOMAXCONN} by the kernel (/proc/sys/net/core/somaxconn)" in text
    assert f"(backlog {SOMAXCONN})" in text


async def test_a_base_url_without_an_api_key_relays_that_upstream(tmp_path: Path, fake_upstream: FakeUpstream) -> None:
    # Ollama and vLLM need no key.
    argv = ("--base-url", fake_upstream.url, "--model", "fake-model", "--limits", "false", "--heartbeat", "0")
    async with running_server(tmp_path, *argv) as server, aiohttp.ClientSession() as http:
        async with http.get(f"{server.base}/healthz") as resp:
            assert (await resp.json())["provider"] == "openai"
        async with http.get(f"{server.base}/api/chat", params={"prompt": "x"}) as resp:
            assert resp.status == 200
            body = await resp.read()
    assert sse_text(body) == "Hello, world!"  # the fake upstream's tokens, not the demo's reply
    assert fake_upstream.last.body["model"] == "fake-model"
    lines = server.stderr.read_text().splitlines()
    [line] = [line for line in lines if "listening on" in line]
    assert f"provider openai, upstream {fake_upstream.url} without an API key, model fake-model" in line
    [host_check] = [line for line in lines if "Host check:" in line]  # right after it, once
    assert lines.index(host_check) == lines.index(line) + 1


def _exits(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *argv],
        cwd=ROOT,
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _assert_one_line_error(done: subprocess.CompletedProcess[str], problem: str) -> None:
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("llm-relay: error: ")
    assert problem in line
    assert done.returncode == 2


def test_a_port_in_use_is_one_line_and_status_2() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = _exits(["--port", str(port)])
    # No startup line either: it is logged once the server listens.
    _assert_one_line_error(done, f"cannot listen on 127.0.0.1:{port}: Address already in use")


@pytest.mark.parametrize(
    ("argv", "env", "problem"),
    [
        (["--api-keys-file", "{tmp}/absent"], {}, "--api-keys-file {tmp}/absent: No such file or directory"),
        (["--api-keys-file", "{tmp}"], {}, "--api-keys-file {tmp}: Is a directory"),
        (["--redis-url", "http://127.0.0.1:6379/0"], {}, "--redis-url is not a Redis URL"),
        (["--redis-url", "redis://:s3cret/x@127.0.0.1:6379/0"], {}, "--redis-url is not a Redis URL"),
        (["--port", "x"], {}, "argument --port: invalid int value: 'x'"),
        (["--backlog", "0"], {}, "argument --backlog: not a listen backlog (1-65535): '0'"),
        ([], {"LLM_RELAY_BACKLOG": "x"}, "LLM_RELAY_BACKLOG: invalid literal for int()"),
        (["--base-url", "s3cret"], {}, "argument --base-url: not an http:// or https:// URL"),
        (["--base-url", "http://relay:s3cret@127.0.0.1:1/v1"], {}, "--base-url: must not carry user:password@"),
    ],
    ids=["keys-file-missing", "keys-file-a-directory", "redis-url-scheme", "redis-url-unencoded", "bad-int",
         "bad-backlog", "bad-env", "bad-base-url", "base-url-credentials"],
)  # fmt: skip
def test_a_startup_error_is_one_line_and_status_2(
    tmp_path: Path, argv: list[str], env: dict[str, str], problem: str
) -> None:
    done = _exits(["--port", "0", *(arg.format(tmp=tmp_path) for arg in argv)], env)
    _assert_one_line_error(done, problem.format(tmp=tmp_path))
    assert "s3cret" not in done.stderr


async def test_the_request_timeouts_apply_to_the_standalone_server(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env()
    argv = ["--port", str(port), "--demo-delay", "0", "--request-head-timeout", "1", "--request-body-timeout", "1"]
    log = (tmp_path / "stderr").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once; the test then talks to it over sockets
        [sys.executable, "-m", "server", *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_up(base, http)
            # A head that never ends is closed after the head timeout.
            reader, writer = await connect(base)
            writer.write(b"GET /api/chat?prompt=x HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started = time.monotonic()
            assert await closed_by_server(reader, timeout=4)
            assert time.monotonic() - started >= 0.9
            writer.close()
            # A body that never ends gets 408 after the body timeout, and the connection closes.
            reader, writer = await connect(base)
            writer.write(post_head("/api/chat", 100) + b'{"prompt": ')
            response = await read_response(reader, timeout=4)
            assert response.status == 408
            assert response.json()["error"]["type"] == "request_timeout"
            assert await closed_by_server(reader, timeout=4)
            writer.close()
            async with http.post(f"{base}/api/chat", json={"prompt": "hi"}) as resp:
                assert resp.status == 200
                assert sse_events(await resp.read())[-1][0] == "done"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 10)
        log.close()
    assert "Traceback" not in (tmp_path / "stderr").read_text()
