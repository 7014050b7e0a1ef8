"""Start our server exactly as ``python -m server`` does, plus the bench's probe (see `bench.probe`).

``--bench-variant NAME`` (first, before the server's own options) applies a what-if from `bench.whatif`.
"""

from __future__ import annotations

import sys

from bench import probe


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--bench-variant"]:
        from bench import whatif

        whatif.apply(argv[1])
        argv = argv[2:]
    probe.install()
    from server.__main__ import main as serve

    serve(argv)


if __name__ == "__main__":
    main()
