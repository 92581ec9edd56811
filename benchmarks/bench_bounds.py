"""Radius tables: soapbubble against straightforward numpy/scipy, in one run.

1. l2 family (d = 3072, k = 500, 200 radii): soapbubble's exact quadrature route
   against a numpy/scipy Monte Carlo table at 1e6 samples and 4001 lambdas
   (time, and radius at pA = 0.999 against the exact value).
2. The Monte Carlo dual curve with its DKW band (mixed l_inf, d = 3072, 2e5
   samples, 200 radii, 4001 lambdas; ``dual.dual_curve``) against the same numpy
   construction at equal n. (Tables now bound p_min differently:
   ``bench_mixed_tightness.py``.)
3. Lookups: certified radii for 1e6 p values per second.

Usage:
  python benchmarks/bench_bounds.py [--write] [--quick]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import numpy_reference as ref  # noqa: E402
from _common import command_line, machine, median_seconds, write_section  # noqa: E402

from soapbubble import noise  # noqa: E402
from soapbubble.bounds import dual, radius_table  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="10x fewer samples (smoke test)")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    d, radii_count, lambdas = 3072, 200, np.geomspace(0.5, 1e6, 4001)
    key = jax.random.key(0)
    lines = [f"Machine: {machine()}.", f"Command: `{command_line()}`", ""]

    # 1. l2 family: exact route vs numpy Monte Carlo.
    k = 500.0
    sigma = noise.matched_sigma(0.5, d, k)
    radii = np.linspace(0, 2.0, radii_count)
    family = noise.L2Family(sigma, k)
    radius_table(None, family, d, "l2", radii=radii[:3])  # warm caches (the quadrature table per family)
    exact, t_exact = timed(lambda: radius_table(None, family, d, "l2", radii=radii))
    n_np = 1_000_000 // scale
    rng = np.random.default_rng(0)
    np_pmin, t_np = timed(lambda: ref.l2_table(rng, sigma, k, d, radii, n_np, lambdas, 1e-3))
    p = 0.999
    r_exact = float(exact.radius(p))
    r_np = float(ref.radius_lookup(radii, np_pmin, p))
    lines += [
        f"### l2 family, d = {d}, k = {k:g}, sigma = {sigma:.4f}, {radii_count} radii",
        "",
        "| route | seconds | radius at pA = 0.999 | Monte Carlo slack |",
        "|---|---:|---:|---|",
        f"| soapbubble exact quadrature | {t_exact:.2f} | {r_exact:.4f} | none (max quadrature error "
        f"{exact.metadata['max_quadrature_error']:.1e}) |",
        f"| numpy/scipy Monte Carlo, n = {n_np:.0e}, 4001 lambdas | {t_np:.2f} | {r_np:.4f} | DKW at alpha/200 |",
        "",
        f"Exact route: **{t_np / t_exact:.1f}x** faster than the numpy Monte Carlo table, and its radius at "
        f"pA = 0.999 is {r_exact / max(r_np, 1e-12):.2f}x the Monte Carlo one.",
        "",
    ]

    # 2. Mixed l_inf Monte Carlo route at equal n.
    k = 250.0
    sigma = noise.matched_sigma(0.5, d, k)
    family = noise.MixedLinf(sigma, k)
    radii = np.linspace(0, 0.05, radii_count)
    n = 200_000 // scale
    def dkw_p_min(k):
        curve = dual.dual_curve(k, family, d, "linf", radii, lambdas, n, alpha_d=1e-3 / radii_count)
        with jax.enable_x64(True):
            d_upper = np.asarray(curve.d_upper)
        return np.maximum.accumulate(np.min((0.5 + d_upper) / lambdas, axis=1))

    _, t_sb_cold = timed(lambda: dkw_p_min(key))
    sb_p_min, t_sb = timed(lambda: dkw_p_min(jax.random.key(1)))
    table = noise.mixed_linf_radial_table(k, d)
    np_mixed, t_np_mixed = timed(lambda: ref.mixed_linf_table(rng, table, sigma, k, d, radii, n, lambdas, 1e-3))
    lines += [
        f"### Mixed l_inf Monte Carlo table, d = {d}, k = {k:g}, n = {n:.0e}, {radii_count} radii, 4001 lambdas",
        "",
        "| implementation | seconds |",
        "|---|---:|",
        f"| soapbubble `dual.dual_curve` (jit: float64 sampling in batches, four statistics, histogram dual "
        f"curve), warm "
        f"(first call with compilation: {t_sb_cold:.2f} s) | {t_sb:.2f} |",
        f"| numpy/scipy (same construction, sort + prefix sums) | {t_np_mixed:.2f} |",
        "",
        f"soapbubble / numpy: **{t_np_mixed / t_sb:.1f}x**. Radii at pA = 0.9: soapbubble "
        f"{float(ref.radius_lookup(radii, sb_p_min, 0.9)):.4f}, numpy "
        f"{float(ref.radius_lookup(radii, np_mixed, 0.9)):.4f}.",
        "",
    ]

    # 3. Lookups.
    sb = radius_table(jax.random.key(1), family, d, "linf", radii=radii, n_samples=n)
    ps = np.random.default_rng(1).uniform(0.5, 1.0, 1_000_000)
    t_lookup = median_seconds(lambda: sb.radius(ps), repeats=5)
    lookup_jax = jax.jit(sb.radius_jax)
    ps32 = jnp.asarray(ps, jnp.float32)
    t_lookup_jax = median_seconds(lambda: lookup_jax(ps32).block_until_ready(), repeats=5)
    lines += [
        "### Lookups",
        "",
        f"`RadiusTable.radius` (numpy, float64): **{1e6 / t_lookup / 1e6:.1f} million** radii per second; "
        f"`radius_jax` (jit, float32): **{1e6 / t_lookup_jax / 1e6:.1f} million** per second (1e6 p values, "
        "median of 5).",
    ]
    body = "## Radius tables (issue 4)\n\n" + "\n".join(lines)
    print(body)
    if args.write:
        write_section("bounds", body)


if __name__ == "__main__":
    main()
