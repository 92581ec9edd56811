"""Bilateral certification (Appendix D) against Cohen et al.'s unilateral one, on the digits test set.

For each family of the main job (Gaussian sigma0 = 0.25, the l2 family k = 10 and the
mixed l_inf family k = 5 at matched scales, d = 64), the default model's 360 test images
are certified with the fixed-n protocol (``soapbubble.certify``, n0 = 100, n = 10,000,
alpha = 0.001) twice with the same keys, so both see exactly the same samples:

* **unilateral**: pA_lower at alpha_p, every other class bounded by 1 - pA_lower;
* **bilateral** (``bilateral=True``): pA_lower at alpha_p / 2, each of the 9 other classes
  bounded above at alpha_p / 18 (Clopper-Pearson, union bound), radius the larger of the
  unilateral one (from this pA_lower) and the bilateral one,
  ``V_r(pA_lower) > 1 - V_r(1 - pB_upper)``.

Reported: certified accuracy at the main job's radii (``main_job.L2_RADII`` and
``LINF_RADII``) for both, how many images the bilateral certificate gives a larger (or
smaller) radius, and the time to build the bilateral tables (cached afterwards).

Usage: ``python benchmarks/bench_bilateral.py [--max 60] [--n 10000] [--write]``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import command_line, cpu_snapshot, machine, others_share, sharing_sentence, write_section  # noqa: E402

import jax  # noqa: E402

import soapbubble  # noqa: E402
from soapbubble import data, main_job  # noqa: E402
from soapbubble.bounds.cache import cached_radius_table  # noqa: E402

PLANS = (("gaussian", "l2"), ("gaussian", "linf"), ("l2", "l2"), ("l2", "linf"), ("mixed_linf", "linf"))


def run(name, attack, family, xs, labels, logits_fn, config, table_dir, log):
    d = int(np.prod(xs.shape[1:]))
    rule = soapbubble.worst_case(family, attack)
    budget = rule.alpha_budget(config.alpha)
    t0 = time.perf_counter()
    uni_table = soapbubble.cached_radius_table(family, d, attack, alpha_d=budget.alpha_d, table_dir=table_dir)
    t1 = time.perf_counter()
    bil_table = cached_radius_table(family, d, attack, alpha_d=budget.alpha_d, table_dir=table_dir, bilateral=True)
    t2 = time.perf_counter()
    key = jax.random.key(config.seed)
    kw = dict(attack=attack, n0=config.n0, n=config.n, alpha=config.alpha, batch_size=config.batch_size,
              batched=True)
    start = time.perf_counter()
    uni = soapbubble.certify(key, logits_fn, xs, family, table=uni_table, **kw)
    mid = time.perf_counter()
    bil = soapbubble.certify(key, logits_fn, xs, family, table=bil_table, bilateral=True, **kw)
    end = time.perf_counter()
    radii = np.asarray(main_job.L2_RADII if attack == "l2" else main_job.LINF_RADII)
    acc = {mode: [float(np.mean((c.prediction == labels) & (c.radius >= r))) for r in radii]
           for mode, c in (("unilateral", uni), ("bilateral", bil))}
    both = (uni.prediction >= 0) & (bil.prediction >= 0)
    out = {
        "name": name, "attack": attack, "radii": radii, "acc": acc,
        "larger": int(np.sum(bil.radius > uni.radius)), "smaller": int(np.sum(bil.radius < uni.radius)),
        "gain": float(np.median((bil.radius - uni.radius)[both & (bil.radius > uni.radius)]))
        if np.any(both & (bil.radius > uni.radius)) else 0.0,
        "abstain": (int(np.sum(uni.prediction < 0)), int(np.sum(bil.prediction < 0))),
        "table_s": (t1 - t0, t2 - t1), "certify_s": (mid - start, end - mid),
        "split": bil.bilateral, "alpha_p": bil.alpha_p, "alpha_d": bil.alpha_d,
    }
    log(f"{name} {attack}: unilateral {acc['unilateral']}, bilateral {acc['bilateral']}, "
        f"larger radius on {out['larger']} images, smaller on {out['smaller']}; bilateral table "
        f"{t2 - t1:.1f} s, certify {mid - start:.1f} s / {end - mid:.1f} s")
    return out


def markdown(results, config, images, share) -> str:
    lines = [
        "## Bilateral certification (Appendix D) on the digits test set",
        "",
        f"`{command_line()}` on {machine()}. {sharing_sentence(share)}",
        "",
        f"Default model, {images} test images, the main job's families (Gaussian sigma0 = 0.25, l2 family "
        "k = 10, mixed l_inf k = 5, matched scales, d = 64), fixed-n `soapbubble.certify` with "
        f"n0 = {config.n0}, n = {config.n:,}, alpha = {config.alpha}, the same keys (so the same samples) "
        "for both modes. Unilateral: Cohen et al.'s pA_lower at alpha_p and every other class at most "
        "1 - pA_lower. Bilateral: pA_lower at alpha_p / 2, each of the 9 other classes bounded above at "
        "alpha_p / 18 (Clopper-Pearson, union bound), radius the larger of the unilateral one from this "
        "pA_lower and the largest grid radius with V_r(pA_lower) > 1 - V_r(1 - pB_upper). Mixed l_inf: "
        "alpha_d = alpha / 2 for the Monte Carlo table, so alpha_p = alpha / 2 is what is split.",
        "",
    ]
    for attack in ("l2", "linf"):
        rows = [r for r in results if r["attack"] == attack]
        if not rows:
            continue
        radii = rows[0]["radii"]
        lines.append(f"Certified accuracy, {attack} attack:")
        lines.append("")
        lines.append("| family | mode | " + " | ".join(f"r = {r:g}" for r in radii) + " |")
        lines.append("|---|---|" + "---:|" * len(radii))
        for r in rows:
            for mode in ("unilateral", "bilateral"):
                cells = " | ".join(f"{100 * a:.1f}%" for a in r["acc"][mode])
                lines.append(f"| {r['name']} | {mode} | {cells} |")
        lines.append("")
    lines.append("| family | attack | bilateral radius larger / smaller (images) | median gain where larger "
                 "| abstentions uni / bi | bilateral table build (s) | certify uni / bi (s) |")
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        lines.append(f"| {r['name']} | {r['attack']} | {r['larger']} / {r['smaller']} | {r['gain']:.4f} | "
                     f"{r['abstain'][0]} / {r['abstain'][1]} | {r['table_s'][1]:.1f} | "
                     f"{r['certify_s'][0]:.1f} / {r['certify_s'][1]:.1f} |")
    lines.append("")
    lines.append("A table build time near 0 means the bilateral table was already cached.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="estimation samples per image")
    parser.add_argument("--max", type=int, default=None, help="certify only the first images")
    parser.add_argument("--table-dir", default=None, help="radius table cache (default: the library's)")
    parser.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    config = main_job.DemoConfig(n=args.n)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    logits_fn, _ = main_job.default_model(progress=False, log=log)
    test = data.materialize(data.load_digits("test"))
    xs, labels = np.asarray(test.images), np.asarray(test.labels)
    if args.max is not None:
        xs, labels = xs[: args.max], labels[: args.max]
    d = int(np.prod(xs.shape[1:]))
    families = main_job._families(config, d)
    before = cpu_snapshot()
    results = [run(name, attack, families[name], xs, labels, logits_fn, config, args.table_dir, log)
               for name, attack in PLANS]
    text = markdown(results, config, xs.shape[0], others_share(before, cpu_snapshot()))
    print(text)
    if args.write:
        write_section("bilateral", text)


if __name__ == "__main__":
    main()
