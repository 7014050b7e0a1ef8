"""Garbage-collector settings for the relay's own processes, never for a host app that embeds it.

A relay allocates a few short-lived objects per token and a few hundred per stream that live as long as the
stream. With CPython's default thresholds (700, 10, 10) the young generation is collected every 700 allocations,
so the objects of every open stream are traversed again and again, and each full collection walks the whole heap,
including the ~90,000 objects the imports leave behind. Measured with the bench's paced relay (500 streams): 6% of
the server's CPU went to collections, and each full collection paused the loop for ~50 ms, every token and every
disconnect waiting behind it.

Both settings are process-wide, which is why only the relay's own entry points (``python -m server`` and the
gunicorn worker's app) apply them: `gc.freeze()` once the app is set up moves the startup objects out of every
later collection (the use Python documents for it), and a larger young-generation threshold collects ten times
less often. Reference cycles are still collected, only later.
"""

from __future__ import annotations

import gc

from aiohttp import web

YOUNG_THRESHOLD = 10_000
OLDER_THRESHOLDS = (20, 20)


def tune_for_server() -> None:
    """Freeze what exists now (call it once the app is built) and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)


def apply_after_startup(app: web.Application) -> None:
    """Tune the collector once `app`'s startup hooks have run (the upstream client is built then)."""

    async def tune(_app: web.Application) -> None:
        tune_for_server()

    app.on_startup.append(tune)
