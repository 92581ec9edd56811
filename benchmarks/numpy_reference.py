"""Straightforward numpy/scipy implementations that the benchmarks compare against.

They implement the same algorithms as soapbubble (same laws, same statistics, same
sound correction) the way a careful numpy user would, in float64.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special
import scipy.stats


def mixed_linf_samples(rng, table, sigma, d, n, truncnorm_route=False):
    """The exact mixed l_inf construction: radius by the table's inverse CDF, a uniform
    arg-max coordinate and sign, the other coordinates truncated normals."""
    u = rng.random(n)
    i = np.clip(np.searchsorted(table.cdf, u, side="right") - 1, 0, table.slope.size - 1)
    w = (table.cdf[i + 1] - u) / (table.cdf[i + 1] - table.cdf[i])
    width = np.where(i == 0, 1.0, np.diff(table.edges[1:], prepend=table.edges[1] - 1.0)[i])
    decay = np.where(i == 0, 1.0, -np.expm1(-table.slope[i] * width))
    s = table.edges[1:][i] + np.log1p(-w * decay) / table.slope[i]
    t = np.exp(s)[:, None]
    j = rng.integers(0, d, n)
    sign = rng.choice([-1.0, 1.0], n)
    if truncnorm_route:
        x = scipy.stats.truncnorm.rvs(-t, t, size=(n, d), random_state=rng)
    else:
        lo = scipy.special.ndtr(-t)
        v = rng.random((n, d)) * 2 - 1
        x = np.copysign(-scipy.special.ndtri(lo + np.abs(v) * (0.5 - lo)), v)
    x[np.arange(n), j] = sign * t[:, 0]
    return sigma * x


def mixed_linf_stats(rng, table, sigma, d, n, batch=1000):
    """(||z||_inf, max z, min z, sum z) of n mixed l_inf samples, drawn in batches."""
    out = []
    for start in range(0, n, batch):
        z = mixed_linf_samples(rng, table, sigma, d, min(batch, n - start))
        out.append(np.stack([np.abs(z).max(1), z.max(1), z.min(1), z.sum(1)], axis=1))
    return np.concatenate(out)


def l2_stats(rng, sigma, k, d, n):
    """(||z||, z1) of n l2-family samples without d-dimensional arrays."""
    rho = sigma * np.sqrt(2 * rng.standard_gamma((d - k) / 2, n))
    z1 = rho * (2 * rng.beta((d - 1) / 2, (d - 1) / 2, n) - 1)
    return rho, z1


def p_min_from_log_w(log_w, lambdas, alpha_d):
    """p_min = min_lam (1/2 + D_upper(lam)) / lam from n draws of log W (MATH.md section 3):
    sort, prefix sums, one searchsorted for the whole lambda grid, one-sided DKW."""
    n = log_w.size
    w_sorted = np.exp(np.sort(log_w))
    prefix = np.concatenate([[0.0], np.cumsum(w_sorted)])
    m = np.searchsorted(w_sorted, lambdas, side="left")
    d_hat = (lambdas * m - prefix[m]) / n
    eps = math.sqrt(math.log(1 / alpha_d) / (2 * n))
    d_upper = np.minimum(d_hat + lambdas * eps, lambdas)
    return float(np.min((0.5 + d_upper) / lambdas))


def l2_table(rng, sigma, k, d, radii, n, lambdas, alpha):
    rho, z1 = l2_stats(rng, sigma, k, d, n)
    out = []
    for r in radii:
        s = r * r - 2 * r * z1
        out.append(p_min_from_log_w(-(k / 2) * np.log1p(s / rho**2) - s / (2 * sigma**2), lambdas, alpha / len(radii)))
    return np.maximum.accumulate(np.array(out))


def mixed_linf_table(rng, table, sigma, k, d, radii, n, lambdas, alpha):
    st = mixed_linf_stats(rng, table, sigma, d, n)
    linf, zmax, zmin, zsum = st.T
    out = []
    for r in radii:
        shifted = np.maximum(zmax - r, r - zmin)
        log_w = -k * (np.log(shifted) - np.log(linf)) - (d * r * r - 2 * r * zsum) / (2 * sigma**2)
        out.append(p_min_from_log_w(log_w, lambdas, alpha / len(radii)))
    return np.maximum.accumulate(np.array(out))


def radius_lookup(radii, p_min, p):
    count = np.searchsorted(p_min, p, side="right")
    return np.where(count > 0, radii[np.maximum(count - 1, 0)], 0.0)
