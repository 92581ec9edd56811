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


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, busy CPU s of the whole machine, CPU s of this process and its waited-for children).

    Machine-wide busy time comes from /proc/stat (Linux); two snapshots give
    :func:`others_share`, the work of *other* processes in between.
    """
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait
    return time.perf_counter(), busy / hz, sum(os.times()[:4])


def others_share(before, after) -> float:
    """Mean number of cores used by other processes between two :func:`cpu_snapshot` readings."""
    wall = after[0] - before[0]
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / max(wall, 1e-9)


def sharing_sentence(cores_used: float) -> str:
    """How busy the machine was with other work, for a RESULTS.md header."""
    text = f"Other processes used {cores_used:.1f} of the {os.cpu_count()} cores on average (from /proc/stat)"
    if cores_used < 0.2:
        return text + ": a quiet machine."
    return (text + ": **a shared machine**, so absolute times are noisy; runs alternate between the "
            "sides compared, which keeps ratios fairer than absolute figures.")

