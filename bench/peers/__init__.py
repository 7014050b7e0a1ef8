"""The peers: small servers written the way each framework's tutorial teaches, all serving `bench.payload`.

Every peer has the same three routes (the paths differ only in how each framework spells them):

* ``GET /stream?n=N&delay=D``: the first N payload tokens as SSE ``data: {"content": ...}`` frames (NDJSON lines
  for FastAPI), then ``data: [DONE]``; with D > 0 it sleeps D seconds before each token, as tutorials do;
* ``GET /idle``: headers, then a heartbeat every ``BENCH_HEARTBEAT`` seconds and nothing else;
* ``GET /relay?prompt=P``: the reply of the fake upstream (``BENCH_UPSTREAM``) relayed through the ``openai``
  client, as each tutorial's "stream ChatGPT to the browser" example does.
"""
