"""The one payload every target serves: the first N tokens of llm-relay's demo reply to the prompt ``bench``.

Our server produces it with its demo provider (``max_tokens=N``); the peers and the fake upstream read the same
token list from the JSON file named by ``BENCH_PAYLOAD``, which the runner writes before it starts anything.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

PROMPT = "bench"
ENV = "BENCH_PAYLOAD"


def demo_tokens() -> list[str]:
    """Our demo model's reply to `PROMPT`, computed by the server's own code so the two can never drift."""
    from server.app import _rules
    from server.chat_request import from_query
    from server.config import Config
    from server.providers.demo import demo_tokens as tokens_for

    return tokens_for(from_query({"prompt": PROMPT}, _rules(Config(provider="demo"))))


def write(path: Path) -> list[str]:
    tokens = demo_tokens()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"prompt": PROMPT, "tokens": tokens}))
    return tokens


@cache
def tokens() -> list[str]:
    """The token list, in a server or upstream process started by the runner."""
    path = os.environ.get(ENV)
    if not path:
        raise RuntimeError(f"{ENV} is not set: start peers through `python -m bench`")
    data = json.loads(Path(path).read_text())
    return list(data["tokens"])
