"""Start our server exactly as ``python -m server`` does, plus the bench's probe (see `bench.probe`).

``--bench-variant NAME`` (first, before the server's own options) applies a what-if from `bench.whatif`.
With ``BENCH_SERVER_ROOT`` set (a baseline, see `bench.runner.environment`), the server/ package under it runs,
and the process refuses to start if Python found another one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench import probe


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--bench-variant"]:
        from bench import whatif

        whatif.apply(argv[1])
        argv = argv[2:]
    probe.install()
    import server
    from server.__main__ import main as serve

    package = Path(server.__file__).resolve().parent
    print(f"bench.ours: serving server/ from {package}", flush=True)
    wanted = os.environ.get("BENCH_SERVER_ROOT")
    if wanted and package != Path(wanted).resolve() / "server":
        raise SystemExit(f"bench.ours: imported {package}, not the server/ under {wanted}")

    serve(argv)


if __name__ == "__main__":
    main()
