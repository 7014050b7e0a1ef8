"""The garbage-collector settings belong to the standalone server only: `python -m server` applies them once its
startup hooks have run; `--gc-tuning false` leaves Python's defaults; an app that embeds the relay keeps its own."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from server.app import create_app
from server.config import load_config
from server.gc_tuning import OLDER_THRESHOLDS, YOUNG_THRESHOLD

ROOT = Path(__file__).resolve().parents[1]

# Runs server.__main__.main with run_app replaced by "start the app, report the GC settings, stop": the settings
# are read after the app's own startup, as they would be while serving.
_PROBE = """
import asyncio, gc, json, sys
from aiohttp import web

def run_app(app, **kwargs):
    async def go():
        runner = web.AppRunner(app)
        await runner.setup()
        print(json.dumps({"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
        await runner.cleanup()
    asyncio.run(go())

web.run_app = run_app
from server.__main__ import main
main(sys.argv[1:])
"""


def _settings_of_main(*argv: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, "--port", "0", "--uvloop", "false", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_standalone_server_freezes_its_startup_objects_and_collects_less_often() -> None:
    settings = _settings_of_main()
    assert settings["threshold"] == [YOUNG_THRESHOLD, *OLDER_THRESHOLDS]
    # The imports alone leave tens of thousands of objects; all of them are out of later collections.
    frozen = settings["frozen"]
    assert isinstance(frozen, int)
    assert frozen > 10_000


def test_gc_tuning_false_leaves_pythons_defaults() -> None:
    defaults = _settings_of_main("--gc-tuning", "false")
    assert defaults["threshold"] == list(gc.get_threshold()) != [YOUNG_THRESHOLD, *OLDER_THRESHOLDS]
    assert defaults["frozen"] == 0


def test_the_gunicorn_worker_app_applies_them_too() -> None:
    probe = """
import asyncio, gc, json
from aiohttp import web
from server.gunicorn import app

async def go():
    runner = await app()  # a runner, which aiohttp's gunicorn worker sets up and serves as it is
    assert isinstance(runner, web.AppRunner)
    await runner.setup()
    print(json.dumps({"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
    await runner.cleanup()
asyncio.run(go())
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin"}, check=True,
    )  # fmt: skip
    settings = json.loads(done.stdout.strip().splitlines()[-1])
    assert settings["threshold"] == [YOUNG_THRESHOLD, *OLDER_THRESHOLDS]
    assert settings["frozen"] > 10_000


async def test_an_embedding_app_keeps_its_own_gc_settings() -> None:
    before = (gc.get_threshold(), gc.get_freeze_count())
    host = web.Application()
    host.add_subapp("/relay", create_app(load_config([], {})))
    server = TestServer(host)
    await server.start_server()
    try:
        assert (gc.get_threshold(), gc.get_freeze_count()) == before
    finally:
        await server.close()
