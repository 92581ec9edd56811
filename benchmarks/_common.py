"""Shared helpers for the benchmark scripts: timing and writing RESULTS.md sections."""

from __future__ import annotations

import os
import pathlib
import platform
import re
import statistics
import sys
import time
from typing import Callable

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    ``fn`` must block until its work is done (call ``block_until_ready`` on jax outputs).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    import jax

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, Python {platform.python_version()}"
    )


def write_section(name: str, body: str) -> None:
    """Replaces (or appends) the section between ``<!-- BEGIN name -->`` and ``<!-- END name -->``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def command_line() -> str:
    return "python " + " ".join([pathlib.Path(sys.argv[0]).as_posix()] + sys.argv[1:])
