"""The ``soapbubble`` command line. Thin: parses arguments, calls the library, prints.

Subcommands:
  demo   certify a toy linear classifier under Gaussian noise and compare each
         certified radius with the exact robust radius (distance to the boundary).
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from soapbubble import noise
    from soapbubble.bounds import stats

    d, sigma, n, alpha = args.d, args.sigma, args.n, args.alpha
    key = jax.random.key(args.seed)
    k_w, k_x, k_noise = jax.random.split(key, 3)
    w = jax.random.normal(k_w, (d,))
    w = w / jnp.linalg.norm(w)
    # Points at known signed distances from the hyperplane w.x = 0.
    distances = jnp.linspace(-0.25, 1.5, args.points)
    base = jax.random.normal(k_x, (args.points, d))
    base = base - (base @ w)[:, None] * w
    x = base + distances[:, None] * w

    def logits_fn(batch):
        score = batch @ w
        return jnp.stack([-score, score], axis=-1)

    family = noise.Gaussian(sigma)
    batch = min(n, 10_000)
    batches = -(-n // batch)

    @jax.jit
    def count_class_one(key, xi):
        def body(carry, key):
            z = family.sample(key, batch, (d,))
            return carry + jnp.sum(jnp.argmax(logits_fn(xi + z), axis=-1) == 1), None

        total, _ = jax.lax.scan(body, jnp.int32(0), jax.random.split(key, batches))
        return total

    counts = jax.vmap(count_class_one)(jax.random.split(k_noise, args.points), x)
    total = batches * batch
    # Class one (the side of w) is the true class for distance > 0; class zero otherwise.
    top = jnp.where(distances > 0, counts, total - counts)
    with jax.enable_x64(True):
        p_lower = np.asarray(stats.clopper_pearson_lower(np.asarray(top, np.int64), total, alpha))
        # Never round a radius up: step one ulp down from the float64 value.
        radius = np.nextafter(np.asarray(stats.gaussian_radius(p_lower, sigma)), -np.inf)
    radius = np.where(p_lower > 0.5, radius, 0.0)
    print(f"Toy certification: linear classifier in d={d}, Gaussian noise sigma={sigma}, n={total}, alpha={alpha}")
    print(f"{'exact radius':>13} {'p_lower':>9} {'certified':>10}  sound")
    ok = True
    for dist, p, r in zip(np.abs(np.asarray(distances)), p_lower, radius):
        sound = r <= dist
        ok &= bool(sound)
        print(f"{dist:13.4f} {p:9.5f} {r:10.4f}  {'yes' if sound else 'NO'}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soapbubble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="certify a toy linear classifier (offline, seconds)")
    demo.add_argument("--d", type=_positive_int("--d"), default=64, help="input dimension (default 64)")
    demo.add_argument("--sigma", type=_positive_float("--sigma"), default=0.5, help="noise scale (default 0.5)")
    demo.add_argument("--n", type=_positive_int("--n"), default=100_000, help="noise samples per input")
    demo.add_argument("--alpha", type=_unit_interval("--alpha"), default=0.001, help="failure probability in (0, 1)")
    demo.add_argument("--points", type=_positive_int("--points"), default=8, help="number of test inputs")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {value}")
        return value

    return parse


def _positive_float(name):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number > 0, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be finite and > 0, got {value}")
        return value

    return parse


def _unit_interval(name):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1), got {text!r}") from None
        if not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be in (0, 1), got {value}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
