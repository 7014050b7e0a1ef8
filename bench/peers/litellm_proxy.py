"""Peer: LiteLLM's proxy, the OpenAI-compatible gateway many teams put in front of their providers (issue 17).

It runs from its own virtual environment (``bench/.venvs/litellm``, git-ignored), which `ensure_venv` creates
with ``pip install 'litellm[proxy]'`` the first time a run needs it, so its many dependencies never meet the
project's. `main` runs inside that environment: it writes nothing but a config whose one model, ``fake-model``,
is ``openai/fake-model`` at the fake upstream's ``api_base``, and serves ``litellm.proxy.proxy_server:app``
on uvicorn (one worker, uvloop, the same listen backlog as every server here), as ``litellm --config`` does with
one worker. A master key (which it requires, and clients send), no database, the bundled model-cost map: it runs
offline. Clients ``POST /v1/chat/completions`` and read OpenAI chunk SSE back.

This module imports only the standard library at its top: the project's venv and LiteLLM's both load it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
VENV = ROOT / "bench" / ".venvs" / "litellm"
REQUIREMENT = "litellm[proxy]"
BACKLOG = 4096  # bench.peers._common.BACKLOG, which this module cannot import inside LiteLLM's venv
# The proxy refuses to start without a master key (it would accept every request unauthenticated), and a real
# deployment has one, so every bench request carries it: a made-up key for a proxy that listens on loopback only.
MASTER_KEY = "sk-bench-4f1c9a7e2b8d6035c1e7a9f2b4d8c6e0"


def python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(log: object = print) -> Path:
    """LiteLLM's interpreter, after creating its venv and installing the proxy if that was not done before."""
    marker = VENV / ".installed"
    if not marker.exists():
        say = log if callable(log) else print
        say(f"installing {REQUIREMENT} into {VENV.relative_to(ROOT)} (once; a few minutes)")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        subprocess.run(
            [str(python()), "-m", "pip", "install", "-q", REQUIREMENT, "uvloop"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        marker.write_text(REQUIREMENT + "\n")
    return python()


def write_config(path: Path, upstream: str) -> None:
    # YAML by hand: the project's venv has no YAML library, and these few lines need none.
    path.write_text(
        "model_list:\n"
        "  - model_name: fake-model\n"
        "    litellm_params:\n"
        "      model: openai/fake-model\n"
        f"      api_base: {upstream}\n"
        "      api_key: bench\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )


def environment() -> dict[str, str]:
    """What keeps LiteLLM offline and quiet: the bundled model-cost map, no telemetry, warnings only."""
    return {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
        "DISABLE_SCHEMA_UPDATE": "True",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--loop", default="uvloop")
    args = parser.parse_args()
    write_config(args.config, args.upstream)
    os.environ.update(environment(), CONFIG_FILE_PATH=str(args.config))
    import uvicorn
    from litellm.proxy.proxy_server import app

    uvicorn.run(
        app, host="127.0.0.1", port=args.port, backlog=BACKLOG, loop=args.loop, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
