"""Smoke test of a benchmark script: it still runs against the library and prints its table.

Speed itself is measured in ``benchmarks/`` (see benchmarks/RESULTS.md), never
asserted here; this only guards the scripts against API drift. The others need
the trained default model or a ResNet and run in ``benchmarks/run_all.sh``.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_samplers_runs_small():
    # d = 1024: the script's families have k up to 500 < d.
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_samplers.py", "--d", "1024", "--n", "64", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    rows = re.findall(r"^\| soapbubble (\w+)\(.*?\) \| ([\d,]+) \| ([\d,]+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["Gaussian", "L2Family", "MixedLinf", "PureLinf"], out
    assert all(int(a.replace(",", "")) > 0 and int(b.replace(",", "")) > 0 for _, a, b in rows)
    assert "soapbubble / numpy inversion" in out and "RESULTS.md" not in out


def test_readme_performance_paragraph_is_generated_from_results():
    """README.md's "Performance, in short" is what benchmarks/summarize.py writes from RESULTS.md."""
    done = subprocess.run([sys.executable, "benchmarks/summarize.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, "README.md's performance paragraph is stale: run benchmarks/summarize.py\n" + (
        done.stdout + done.stderr)
