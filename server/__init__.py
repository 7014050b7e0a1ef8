"""llm-relay: relay OpenAI-compatible chat streams to browsers (SSE) and fetch clients (NDJSON)."""

from .app import create_app, create_relay_app, setup, setup_openai_compatible
from .config import Config, load_config
from .events import Delta, Done, Error, Event, Reasoning, Refusal, ToolCallDelta, Usage
from .framing import NDJSONFraming, SSEFraming, encode_sse, encode_sse_comment

__all__ = [
    "Config",
    "Delta",
    "Done",
    "Error",
    "Event",
    "NDJSONFraming",
    "Reasoning",
    "Refusal",
    "SSEFraming",
    "ToolCallDelta",
    "Usage",
    "create_app",
    "create_relay_app",
    "encode_sse",
    "encode_sse_comment",
    "load_config",
    "setup",
    "setup_openai_compatible",
]
