"""llm-relay's benchmark: ours against the servers a user would pick instead, reproducible with ``make bench``.

Every server runs as its own process pinned to core 0; the load client (and the fake upstream) run on core 1.
Results are ratios and server CPU time measured in the same run, medians of interleaved repeats with their spread,
because the machine is shared and wall-clock rates alone are noise. See the README's Benchmarks section.
"""
