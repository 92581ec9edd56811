"""Sequential certification (certify_radii) against Cohen et al.'s fixed N = 100,000 and the SPRT oracle.

Two profiles, each certified at four target l2 radii (the paper's Table 1 radii
0.25 ... 1.0, scaled by sigma / 0.5):

* **Cohen profile**: a linear three-class classifier in d = 64 whose inputs have
  the pA of Cohen et al.'s published CIFAR-10 run (ResNet-110, sigma = 0.5, every
  20th test image; ``data/cohen2019_cifar10_sigma050_margins.txt`` holds the
  signed distances derived from it). Certified rows: pA = Phi(radius / sigma);
  wrong rows: the runner-up class has that pA; abstentions (the file only says
  pA_lower < 1/2): pA uniform in [0.34, 0.5) with the rest split over two other
  classes (an assumption, stated in RESULTS.md).
* **digits**: the default model on the embedded digits test set (360 images),
  Gaussian sigma = 0.25.

Reported: forward passes per input (n0 + estimation samples), wall time,
certified accuracy at each radius, for fixed N (``soapbubble.certify``,
``batched=True``), the sequential route, and the SPRT oracle of SEQUENTIAL.md
(``E[N] = log(1/alpha) / KL(pA || q)`` for the threshold hardest to decide, pA
known; plug-in pA = count / N from the fixed-N run for the digits model).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import command_line, cpu_snapshot, machine, others_share, sharing_sentence, write_section  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import scipy.stats  # noqa: E402

import soapbubble  # noqa: E402
from soapbubble import noise  # noqa: E402
from soapbubble.bounds import table as table_lib  # noqa: E402

MARGINS = pathlib.Path(__file__).with_name("data") / "cohen2019_cifar10_sigma050_margins.txt"
ALPHA, N0 = 0.001, 100


def cohen_profile(d: int, seed: int = 0):
    """(inputs, labels, logits_fn, pA) with the published run's pA profile (see the module docstring)."""
    s = np.loadtxt(MARGINS)
    sigma = 0.5
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    w, v = basis[:, 0], basis[:, 1]
    a = np.where(s > 0, s, np.where(s < 0, -8 * sigma, 0.0))
    b = np.where(s < 0, -s, 0.0)
    abstain = s == 0
    p_abstain = rng.uniform(0.34, 0.5, size=s.size)
    a = np.where(abstain, sigma * scipy.stats.norm.ppf(p_abstain), a)
    base = rng.uniform(0, 1, size=(s.size, d))
    base -= np.outer(base @ w, w) + np.outer(base @ v, v)
    xs = (base + a[:, None] * w + b[:, None] * v).astype(np.float32)
    wj, vj = jnp.asarray(w, jnp.float32), jnp.asarray(v, jnp.float32)

    def logits_fn(batch):
        one = batch @ wj  # class 1 if w.x > 0, else class 0 if v.x > 0, else class 2
        zero = jnp.minimum(-one, batch @ vj)
        return jnp.stack([zero, one, jnp.minimum(-one, -(batch @ vj))], axis=-1)

    p_top = np.where(s < 0, scipy.stats.norm.cdf(b / sigma), scipy.stats.norm.cdf(a / sigma))
    return xs, np.ones(s.size, np.int64), logits_fn, p_top, sigma


def oracle(p, q, max_n):
    """SPRT that knows pA: samples to decide every threshold q (the hardest one), capped at max_n."""
    p = np.clip(p[:, None], 1e-12, 1 - 1e-12)
    q = np.clip(np.asarray(q)[None, :], 1e-12, 1 - 1e-12)
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    n = np.where(kl > 0, math.log(1 / ALPHA) / np.maximum(kl, 1e-300), np.inf)
    return np.minimum(n.max(axis=1), max_n)


def run_profile(name, xs, labels, logits_fn, family, radii, max_n, batch, p_top=None):
    d = int(np.prod(xs.shape[1:]))
    table = table_lib.radius_table(None, family, d, "l2")
    key = jax.random.key(0)
    # Compile both routes on a few rows first (not timed).
    soapbubble.certify(key, logits_fn, xs[:2], family, n0=N0, n=max_n, batch_size=batch, table=table, batched=True)
    # The same rows with a tiny budget compile the same program (max_n is traced; rows fix the bucket).
    soapbubble.certify_radii(key, logits_fn, xs, family, radii, n0=N0, max_n=100, batch_size=batch, table=table)
    t0 = time.perf_counter()
    fixed = soapbubble.certify(key, logits_fn, xs, family, n0=N0, n=max_n, batch_size=batch, table=table,
                               batched=True)
    t_fixed = time.perf_counter() - t0
    t0 = time.perf_counter()
    seq = soapbubble.certify_radii(key, logits_fn, xs, family, radii, n0=N0, max_n=max_n, batch_size=batch,
                                   table=table)
    t_seq = time.perf_counter() - t0
    acc_fixed = [np.mean((fixed.prediction == labels) & (fixed.radius >= r)) for r in radii]
    acc_seq = [np.mean((seq.prediction == labels) & seq.certified[:, j]) for j, r in enumerate(radii)]
    if p_top is None:  # plug-in pA from the fixed-N counts (the selected class)
        p_top = fixed.count / max_n
    q = np.concatenate([[0.5], np.maximum(table.p_min[np.searchsorted(table.radii, radii)], 0.5)])
    n_oracle = N0 + oracle(p_top, q, max_n)
    passes_fixed = np.full(len(xs), N0 + max_n)
    passes_seq = N0 + seq.n_used
    return dict(name=name, rows=len(xs), t_fixed=t_fixed, t_seq=t_seq, acc_fixed=acc_fixed, acc_seq=acc_seq,
                fixed=passes_fixed, seq=passes_seq, oracle=n_oracle, radii=radii)


def report(results, max_n) -> str:
    lines = []
    for r in results:
        radii = r["radii"]
        ratio_n = r["fixed"].mean() / r["seq"].mean()
        ratio_t = r["t_fixed"] / r["t_seq"]
        worst = max(abs(a - b) for a, b in zip(r["acc_fixed"], r["acc_seq"]))
        lines += [
            f"### {r['name']} ({r['rows']} inputs, radii {', '.join(f'{x:g}' for x in radii)})",
            "",
            "| route | mean passes/input | median | wall s | " + " | ".join(f"acc@{x:g}" for x in radii) + " |",
            "|---|---:|---:|---:|" + "---:|" * len(radii),
            f"| fixed N = {max_n:,} (`certify`) | {r['fixed'].mean():,.0f} | {np.median(r['fixed']):,.0f} | "
            f"{r['t_fixed']:.1f} | " + " | ".join(f"{100 * a:.1f}%" for a in r["acc_fixed"]) + " |",
            f"| sequential (`certify_radii`) | {r['seq'].mean():,.0f} | {np.median(r['seq']):,.0f} | "
            f"{r['t_seq']:.1f} | " + " | ".join(f"{100 * a:.1f}%" for a in r["acc_seq"]) + " |",
            f"| SPRT oracle (pA known) | {r['oracle'].mean():,.0f} | {np.median(r['oracle']):,.0f} | – | – |"
            + " – |" * (len(radii) - 1),
            "",
            f"Fixed / sequential: **{ratio_n:.1f}x fewer forward passes**, **{ratio_t:.1f}x less wall time**; "
            f"sequential / oracle mean passes: **{r['seq'].mean() / r['oracle'].mean():.2f}x**; largest "
            f"certified-accuracy difference {100 * worst:.1f} points.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 10,000 and fewer inputs")
    parser.add_argument("--write", action="store_true", help="update RESULTS.md")
    args = parser.parse_args()
    max_n = 10_000 if args.quick else 100_000
    before = cpu_snapshot()
    results = []
    xs, labels, fn, p_top, sigma = cohen_profile(64)
    if args.quick:
        xs, labels, p_top = xs[:100], labels[:100], p_top[:100]
    radii = np.array([0.25, 0.5, 0.75, 1.0]) * sigma / 0.5
    results.append(run_profile("Cohen et al.'s CIFAR-10 pA profile, linear classifier, d = 64, sigma = 0.5", xs,
                               labels, fn, noise.Gaussian(sigma), radii, max_n, 1000, p_top))
    from soapbubble import data, main_job

    logits_fn, _ = main_job.default_model(progress=False, log=lambda *a: None)
    test = data.materialize(data.load_digits("test"))
    xs, labels = test.images, test.labels
    if args.quick:
        xs, labels = xs[:60], labels[:60]
    radii = np.array([0.25, 0.5, 0.75, 1.0]) * 0.25 / 0.5
    results.append(run_profile("default model, digits test set, sigma = 0.25", np.asarray(xs), np.asarray(labels),
                               logits_fn, noise.Gaussian(0.25), radii, max_n, 1000))
    shared = others_share(before, cpu_snapshot())
    body = "\n".join([
        "## Sequential certification (issue 13)",
        "",
        f"Machine: {machine()}. {sharing_sentence(shared)}",
        f"Command: `{command_line()}`. alpha = {ALPHA}, n0 = {N0}, batch 1000 per step, compilation excluded.",
        "Forward passes per input count the n0 selection samples. The Cohen profile's abstentions are modelled",
        "as pA uniform in [0.34, 0.5) (the published file only says pA_lower < 1/2).",
        "",
        report(results, max_n),
    ])
    print(body)
    if args.write:
        write_section("sequential", body)


if __name__ == "__main__":
    main()
