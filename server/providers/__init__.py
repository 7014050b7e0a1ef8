"""Where replies come from. A provider turns a `ChatRequest` into batches of events.

Adding a provider is one small module with a class that has ``stream(request)`` and ``aclose()``.
"""

from .base import Provider
from .demo import DemoProvider
from .openai_compat import OpenAIProvider, make_openai_client

__all__ = ["DemoProvider", "OpenAIProvider", "Provider", "make_openai_client"]
