"""The unlimited-sample mixed l_inf radius at d = 3072, k = 250 (issue 17), with its own error.

The Monte Carlo table's radius is compared (``bench_bounds.py``) with the radius the
same dual bound gives when ``D(lam) = E[(lam - W)_+]`` is known exactly. That value
is estimated here once, from a sample 12 times the table's (12 million draws of the
four statistics, about 15 minutes on 2 CPU cores), and bracketed:

* ``radius``: the plug-in value, ``D_hat`` with no correction;
* ``radius_low`` / ``radius_high``: the radii given by a sound upper / lower bound
  on ``p_min(r)``. At each of 40001 geometric lambdas from 1/2 to 1e6, Maurer and Pontil's empirical
  Bernstein bound (both sides; union over the lambdas, the three radii searched
  and the bisection steps: level ``1e-3`` in all) bounds ``D(lam)``; for the lower
  bound, ``D`` is non-decreasing, so ``(1/2 + D(lam)) / lam >= (1/2 + D(lam_i)) / lam_{i+1}``
  between grid points, and outside the grid ``(1/2 + D) / lam >= 1`` (``lam < 1/2``)
  or ``>= 1 - 1/(2 lam_max)`` (``E min(W, lam) <= E W = 1``).

Radii scale with sigma, so sigma = 1 stands for every sigma. The result is written
to ``benchmarks/data/mixed_linf_reference.json``.

Usage: ``python benchmarks/reference_mixed_linf.py [--cache-dir DIR] [--chunks 12]``
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import jax
import numpy as np

from soapbubble import noise
from soapbubble.bounds import dual

D, K, SIGMA = 3072, 250.0, 1.0
CHUNK = 1_000_000
SEED = 12345
P_A = (0.9, 0.99, 0.999)
LEVEL = 1e-3
OUT = pathlib.Path(__file__).resolve().parent / "data" / "mixed_linf_reference.json"


def chunk_stats(i: int, cache: pathlib.Path) -> np.ndarray:
    """Chunk ``i``: the statistics of 1e6 draws with key ``fold_in(key(SEED), i)`` (cached)."""
    path = cache / f"stats_{i:03d}.npy"
    if not path.exists():
        stats = dual.ratio_statistics(jax.random.fold_in(jax.random.key(SEED), i), noise.MixedLinf(SIGMA, K), D,
                                      "linf", CHUNK)
        with jax.enable_x64(True):
            np.save(path, np.stack([np.asarray(x) for x in stats]))
    return np.load(path)


def sums(stats: np.ndarray, r: float, lams: np.ndarray):
    """Counts and sums of ``W`` and ``W^2`` below each lambda (float64 histograms)."""
    linf, zmax, zmin, zsum = stats
    lw = -(D * r * r - 2 * r * zsum) / (2 * SIGMA**2) - K * (np.log(np.maximum(zmax - r, r - zmin)) - np.log(linf))
    b = np.searchsorted(np.log(lams), lw, side="right")
    w = np.where(b < lams.size, np.exp(np.minimum(lw, np.log(lams[-1]))), 0.0)
    out = [np.bincount(b, weights=x, minlength=lams.size + 1)[: lams.size] for x in (np.ones_like(w), w, w * w)]
    return [np.cumsum(x) for x in out]


def p_min_bounds(chunks, r: float, lams: np.ndarray, log_term: float):
    """Plug-in ``p_min(r)`` and a sound (upper, lower) bracket (module docstring)."""
    m = s1 = s2 = 0.0
    for c in chunks:
        cm, c1, c2 = sums(c, r, lams)
        m, s1, s2 = m + cm, s1 + c1, s2 + c2
    n = sum(c.shape[1] for c in chunks)
    mean = (lams * m - s1) / (n * lams)  # X = (1 - W / lam)_+ in [0, 1]
    second = (lams**2 * m - 2 * lams * s1 + s2) / (n * lams**2)
    var = np.maximum(second - mean**2, 0.0) * n / (n - 1) + 1e-12
    dev = np.sqrt(2 * var * log_term / n) + 7 * log_term / (3 * (n - 1))
    plug = np.min((0.5 + lams * mean) / lams)
    upper = np.min((0.5 + lams * np.minimum(mean + dev, 1.0)) / lams)
    low_d = lams * np.maximum(mean - dev, 0.0)
    lower = min(np.min((0.5 + low_d[:-1]) / lams[1:]), 1.0 - 0.5 / lams[-1])
    return plug, upper, lower


def bisect(f, p: float, hi: float, steps: int = 22) -> float:
    lo = 0.0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) <= p else (lo, mid)
    return lo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default="/tmp/soapbubble_mixed_reference")
    parser.add_argument("--chunks", type=int, default=12)
    args = parser.parse_args()
    cache = pathlib.Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    chunks = [chunk_stats(i, cache) for i in range(args.chunks)]
    lams = np.geomspace(0.5, 1e6, 40_001)  # 0.036% steps: the lower bound loses one step
    steps = 22
    # Two sides, every lambda, three pA, two bisections (upper and lower) of `steps` radii each.
    log_term = math.log(2 * 2 * lams.size * len(P_A) * 2 * steps / LEVEL)
    top = 6 * SIGMA / math.sqrt(D)
    rows = {}
    for p in P_A:
        plug = bisect(lambda r: p_min_bounds(chunks, r, lams, log_term)[0], p, top, steps)
        low = bisect(lambda r: p_min_bounds(chunks, r, lams, log_term)[1], p, top, steps)
        high = bisect(lambda r: p_min_bounds(chunks, r, lams, log_term)[2], p, top, steps)
        rows[str(p)] = {"radius": plug, "radius_low": low, "radius_high": high + top / 2**steps}
        print(p, rows[str(p)], flush=True)
    OUT.write_text(json.dumps({
        "family": "MixedLinf", "sigma": SIGMA, "k": K, "d": D, "attack": "linf",
        "n_samples": CHUNK * args.chunks, "seed": SEED, "level": LEVEL,
        "bracket": "radius_low..radius_high holds the unlimited-sample radius with probability >= 1 - level",
        "radii": rows,
        "command": "python benchmarks/reference_mixed_linf.py",
    }, indent=2) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
