"""Scaling: time and peak memory as N grows (certify) and as d grows (samplers, radius tables).

Every measurement runs in a fresh child process, so one measurement's memory
high-water mark cannot hide another's. Memory is the process's resident set
(RSS): ``jax.devices()[0].memory_stats()`` is ``None`` on the CPU backend, so a
thread samples ``/proc/self/statm`` every 2 ms during the timed calls and the
table reports the peak *increase* over the RSS just before them (after imports,
model loading and compilation). The host-side exact l2 table (numpy/scipy) also
reports ``tracemalloc``'s peak of Python/numpy allocations.

1. ``certify`` with the default model (small CNN, 8x8x1 digits, Gaussian
   sigma = 0.25, n0 = 100, batch 1000), one image, N = 1e3, 1e4, 1e5: seconds
   per image and peak RSS increase. The counting loop keeps one batch of noise
   on the device, so memory should not grow with N.
2. Samplers (MixedLinf k = 5, L2Family k = 10, sigma matched to a Gaussian 0.25)
   at a fixed batch of 128 rows, d = 64, 3072 (CIFAR), 150528 (ImageNet): time
   per call and peak RSS increase against the size of the output (128 d float32);
   at d = 150528 also a batch of 32, to show memory follows the batch.
3. Radius tables: L2Family exact route (k = 10, default radii) and MixedLinf
   Monte Carlo route (k = 5, n = 1000, batch 64 rows), d = 64, 3072, 150528; for
   MixedLinf at d = 150528 also n = 4000 (same batch) and batch 256 (same n).
   Tables are timed once, first call (compilation included).

Usage:
  python benchmarks/bench_scaling.py [--write] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))

MB = 2**20
SAMPLER_BATCH = 128


# --------------------------------------------------------------------------- child side


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager sampling the RSS every 2 ms; ``.increase`` = peak - RSS at entry (bytes)."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.increase = self.peak - self.start


def _timed_runs(fn, repeats: int) -> tuple[float, int]:
    """(median seconds of ``repeats`` calls, peak RSS increase during them)."""
    times = []
    with PeakRSS() as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.increase


def child(kind: str, a: int, b: int, c: int) -> dict:
    import jax

    from soapbubble import noise

    out: dict = {"memory_stats": jax.devices()[0].memory_stats() is not None}
    if kind == "certify":
        import tempfile

        from soapbubble import data, main_job
        from soapbubble import cached_radius_table, certify

        n = a
        logits_fn, _ = main_job.default_model(progress=False, log=lambda *_: None)
        x = data.load_digits("test").images[0].astype("float32")
        family = noise.Gaussian(0.25)
        table = cached_radius_table(family, x.size, "l2", table_dir=tempfile.mkdtemp())
        run = lambda: certify(jax.random.key(0), logits_fn, x, family, n0=100, n=n,
                              batch_size=1000, table=table)
        run()  # compile
        out["seconds"], out["rss_increase"] = _timed_runs(run, 3)
    elif kind in ("mixed", "l2"):
        d, batch = a, b
        family = (noise.MixedLinf(noise.matched_sigma(0.25, d, 5.0), 5.0) if kind == "mixed"
                  else noise.L2Family(noise.matched_sigma(0.25, d, 10.0), 10.0))
        fn = jax.jit(lambda k: family.sample(k, batch, (d,)))
        fn(jax.random.key(0)).block_until_ready()  # compile
        keys = iter(jax.random.split(jax.random.key(1), 100))
        out["seconds"], out["rss_increase"] = _timed_runs(lambda: fn(next(keys)).block_until_ready(), 5)
        out["output_bytes"] = batch * d * 4
    elif kind == "table_l2":
        import tracemalloc

        from soapbubble.bounds import radius_table

        d = a
        family = noise.L2Family(noise.matched_sigma(0.25, d, 10.0), 10.0)
        tracemalloc.start()
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            radius_table(None, family, d, "l2")
        out["seconds"] = time.perf_counter() - t0
        out["tracemalloc_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out["rss_increase"] = mem.increase
    elif kind == "table_mixed":
        from soapbubble.bounds import radius_table

        d, n, batch = a, b, c
        family = noise.MixedLinf(noise.matched_sigma(0.25, d, 5.0), 5.0)
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            radius_table(jax.random.key(0), family, d, "linf", n_samples=n, batch_size=batch)
        out["seconds"] = time.perf_counter() - t0
        out["rss_increase"] = mem.increase
    else:
        raise ValueError(f"unknown child kind {kind!r}")
    import resource

    out["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return out


# --------------------------------------------------------------------------- parent side


def measure(kind: str, a: int, b: int = 0, c: int = 0) -> dict:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", kind, str(a), str(b), str(c)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mb(x: float) -> str:
    return f"{x / MB:,.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="N <= 1e4 and d <= 3072 (smoke test)")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "A", "B", "C"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *nums = args.child
        print(json.dumps(child(kind, *map(int, nums))))
        return
    from _common import command_line, cpu_snapshot, machine, others_share, sharing_sentence, write_section

    ns = (1_000, 10_000) if args.quick else (1_000, 10_000, 100_000)
    ds = (64, 3072) if args.quick else (64, 3072, 150528)
    big = ds[-1]
    start = cpu_snapshot()
    lines = [  # the machine line goes first once the run is over (how busy it was)
        f"Command: `{command_line()}`",
        "",
        ("Each row is a fresh process. Memory = peak resident-set increase during the timed calls over the "
        "RSS just before them (sampled every 2 ms from /proc/self/statm; the CPU backend has no "
        "`memory_stats()`), so imports, model and compiled programs are excluded; 'max RSS' is the whole "
        "process's high-water mark (ru_maxrss, compilation included)."),
        "",
        "### certify vs N (default model, one image, n0 = 100, batch 1000, median of 3)",
        "",
        "| N | seconds / image | samples / s | peak RSS increase (MiB) | max RSS (MiB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in ns:
        m = measure("certify", n)
        lines.append(f"| {n:,} | {m['seconds']:.3f} | {(n + 100) / m['seconds']:,.0f} "
                     f"| {_mb(m['rss_increase'])} | {_mb(m['maxrss'])} |")

    lines += [
        "",
        "### Samplers vs d (median of 5 calls; output = rows x d float32)",
        "",
        "| family | d | rows | ms / call | samples / s | output (MiB) | peak RSS increase (MiB) | max RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sampler_runs = [(kind, d, SAMPLER_BATCH) for kind in ("mixed", "l2") for d in ds]
    sampler_runs += [("mixed", big, 32)]
    for kind, d, batch in sampler_runs:
        m = measure(kind, d, batch)
        label = "MixedLinf(k=5)" if kind == "mixed" else "L2Family(k=10)"
        lines.append(f"| {label} | {d:,} | {batch} | {m['seconds'] * 1e3:,.1f} | {batch / m['seconds']:,.0f} "
                     f"| {_mb(m['output_bytes'])} | {_mb(m['rss_increase'])} | {_mb(m['maxrss'])} |")

    lines += [
        "",
        "### Radius tables vs d (one call each, compilation included)",
        "",
        "| table | d | n | batch rows | seconds | peak RSS increase (MiB) | tracemalloc peak (MiB) | max RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in ds:
        m = measure("table_l2", d)
        lines.append(f"| L2Family(k=10) exact | {d:,} | - | - | {m['seconds']:.2f} | {_mb(m['rss_increase'])} "
                     f"| {_mb(m['tracemalloc_peak'])} | {_mb(m['maxrss'])} |")
    n_small = 500 if args.quick else 1000
    table_runs = [(d, n_small, 64) for d in ds] + [(big, 4 * n_small, 64), (big, n_small, 256)]
    for d, n, batch in table_runs:
        m = measure("table_mixed", d, n, batch)
        lines.append(f"| MixedLinf(k=5) Monte Carlo | {d:,} | {n:,} | {batch} | {m['seconds']:.2f} "
                     f"| {_mb(m['rss_increase'])} | - | {_mb(m['maxrss'])} |")
    lines.insert(0, f"Machine: {machine()}. {sharing_sentence(others_share(start, cpu_snapshot()))}")
    body = "## Scaling in N and d (issue 8)\n\n" + "\n".join(lines)
    print(body)
    if args.write:
        write_section("scaling", body)


if __name__ == "__main__":
    main()
