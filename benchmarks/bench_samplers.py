"""Samples per second of each smoothing family, and the mixed l_inf sampler against numpy/scipy.

Two numpy/scipy baselines implement the same exact mixed l_inf construction
(radius by tabulated inverse CDF, arg-max coordinate and sign uniform, the other
coordinates truncated normals), in the same process and at the same d and batch:

* ``scipy truncnorm``: the plain route, ``scipy.stats.truncnorm.rvs`` with per-row bounds.
* ``numpy inversion``: hand-vectorised inversion ``ndtri(Phi(-t) + u (1/2 - Phi(-t)))``
  in float64, the fastest plain numpy route we know.

Usage:
  python benchmarks/bench_samplers.py            # print the table
  python benchmarks/bench_samplers.py --write    # also update benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import command_line, machine, median_seconds, write_section  # noqa: E402

from numpy_reference import mixed_linf_samples  # noqa: E402

from soapbubble import counting, noise  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=3072)
    parser.add_argument("--n", type=int, default=2000, help="samples per call (batch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    d, n = args.d, args.n
    key = jax.random.key(0)
    # certify draws its noise with threefry4x32 keys (counting.chunk_key); jax's default is threefry2x32.
    key4 = counting.chunk_key(key, 0)
    families = {
        "Gaussian(0.5)": noise.Gaussian(0.5),
        "L2Family(0.55, k=500)": noise.L2Family(0.55, 500.0),
        "MixedLinf(0.52, k=250)": noise.MixedLinf(0.52, 250.0),
        "PureLinf(0.01, k=250)": noise.PureLinf(0.01, 250.0),
    }
    rows = []
    rates = {}
    for label, family in families.items():
        fn = jax.jit(lambda k, f=family: f.sample(k, n, (d,)))
        sec = median_seconds(lambda: fn(key).block_until_ready(), args.repeats)
        sec4 = median_seconds(lambda: fn(key4).block_until_ready(), args.repeats)
        rates[label] = n / sec4
        rows.append((f"soapbubble {label}", n / sec, n / sec4))
    table = noise.mixed_linf_radial_table(250.0, d)
    rng = np.random.default_rng(0)
    for label, route in (("numpy inversion (float64)", False), ("scipy truncnorm", True)):
        m = n if not route else max(n // 10, 10)  # truncnorm is slow: time fewer rows
        sec = median_seconds(lambda: mixed_linf_samples(rng, table, 0.52, d, m, route), max(args.repeats // 2, 2))
        rates[label] = m / sec
        rows.append((f"MixedLinf(0.52, k=250), {label}", m / sec, None))
    mixed = rates["MixedLinf(0.52, k=250)"]
    lines = [
        f"Samplers at d = {d}, {n} samples per call, median of {args.repeats} runs, one process.",
        f"Machine: {machine()}.",
        f"Command: `{command_line()}`",
        "",
        "| sampler | samples/s, threefry2x32 key (jax's default) | samples/s, threefry4x32 key (certify's) |",
        "|---|---:|---:|",
        *[f"| {label} | {rate:,.0f} | {'' if rate4 is None else f'{rate4:,.0f}'} |" for label, rate, rate4 in rows],
        "",
        "Ratios use the threefry4x32 column, the keys certify draws its noise with.",
        f"Mixed l_inf, soapbubble / numpy inversion: **{mixed / rates['numpy inversion (float64)']:.1f}x**; "
        f"soapbubble / scipy truncnorm: **{mixed / rates['scipy truncnorm']:.1f}x**.",
    ]
    body = "## Samplers (issue 3)\n\n" + "\n".join(lines)
    print(body)
    if args.write:
        write_section("samplers", body)


if __name__ == "__main__":
    main()
