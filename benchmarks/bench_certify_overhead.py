"""Overhead of certify over the bare forward pass it is built on.

For one input and N noise samples, in one process and on the same model and
batch size:

* ``certify``: :func:`soapbubble.certify` with ``n0 = 100`` and ``n = N``
  (so it evaluates N + 100 noisy inputs): noise drawn on the device inside the
  compiled loop, class counts, Clopper-Pearson, table lookup.
* ``forward``: one jitted ``lax.map`` of the model over the same N noisy inputs
  in batches of the same size, the noise generated beforehand (not timed).

The ratio certify / forward is the price of everything certify adds: drawing the
noise, counting, the statistics. Goal: <= 1.10. Three models: the default model
(soapbubble's ``small_cnn`` trained on the digits by
``soapbubble.main_job.default_model``, cached after its first use), a small MLP
on the same 8x8x1 inputs, whose forward pass is so cheap that drawing the noise
becomes a visible share, and a CIFAR ResNet-20 (32x32x3, n / 20 samples).

Usage:
  python benchmarks/bench_certify_overhead.py            # print the section
  python benchmarks/bench_certify_overhead.py --write    # also update benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import command_line, machine, write_section  # noqa: E402

from soapbubble import noise  # noqa: E402
from soapbubble.bounds import table as table_lib  # noqa: E402
from soapbubble import certify  # noqa: E402

SHAPE = (8, 8, 1)


class MLP(nn.Module):
    """64 -> 128 -> 128 -> 10: ~26 k multiply-adds per input."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128)(x))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


def _seconds(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(); CPU time sums all threads and shrugs off other processes."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def random_logits_fn(module: nn.Module, shape=SHAPE):
    """A jitted logits function of ``module`` with random weights *and biases*.

    Flax initializes biases to zero, and XLA folds a zero bias (a constant)
    away; a trained model's biases are not zero, so they are drawn here.
    """
    variables = module.init(jax.random.key(0), jnp.zeros((1, *shape)))
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [v + 0.1 * jax.random.normal(k, v.shape) if "bias" in jax.tree_util.keystr(p) else v
              for k, (p, v) in zip(keys, leaves)]
    variables = jax.tree_util.tree_unflatten(tree, leaves)
    return jax.jit(lambda b: module.apply(variables, b))


def measure(logits_fn, n: int, batch: int, repeats: int, shape=SHAPE) -> dict[str, float]:
    """Wall and CPU seconds of certify and of the bare forward pass, and their ratios.

    ``logits_fn`` takes inputs of ``shape``. The two are timed alternately (after
    one warm-up call each), so a machine shared with other work slows both alike;
    times are the fastest of ``repeats`` runs and ratios the median of the
    per-pair ratios of seconds per noisy sample (certify evaluates ``n0 + n =
    n + 100`` inputs, the bare forward ``ceil(n / batch) * batch``).
    """
    key = jax.random.key(0)
    family = noise.Gaussian(0.25)
    x = jax.random.uniform(jax.random.key(1), shape)
    table = table_lib.radius_table(None, family, int(np.prod(shape)), "l2")

    def run_certify():
        cert = certify(key, logits_fn, x, family, n0=100, n=n, batch_size=batch, table=table)
        return cert.prediction  # numpy: certify has finished

    steps = -(-n // batch)
    noisy = x + family.sample(jax.random.key(2), steps * batch, shape)
    noisy = noisy.reshape((steps, batch, *shape)).block_until_ready()
    forward = jax.jit(lambda z: jax.lax.map(logits_fn, z))

    def run_forward():
        forward(noisy).block_until_ready()

    run_certify(), run_forward()  # compile
    pairs = [(_seconds(run_certify), _seconds(run_forward)) for _ in range(repeats)]
    out = {}
    for i, kind in enumerate(("wall", "cpu")):
        out[f"certify_{kind}"] = min(c[i] for c, _ in pairs)
        out[f"forward_{kind}"] = min(f[i] for _, f in pairs)
        # Per noisy sample: certify evaluates n0 + n inputs, the bare forward whole batches.
        out[f"ratio_{kind}"] = statistics.median(
            (c[i] / (n + 100)) / (f[i] / (steps * batch)) for c, f in pairs)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="noise samples (certify's n)")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    from soapbubble import main_job
    from soapbubble.models import registry

    default_fn, _ = main_job.default_model(progress=False)  # trained on first use, then cached
    resnet = random_logits_fn(registry.build("cifar_resnet20"), (32, 32, 3))
    n_resnet = max(1000, args.n // 20)
    cases = [
        ("default model (trained small_cnn), 8x8x1", default_fn, SHAPE, args.n, args.batch),
        ("MLP (random), 8x8x1", random_logits_fn(MLP()), SHAPE, args.n, args.batch),
        ("CIFAR ResNet-20 (random), 32x32x3", resnet, (32, 32, 3), n_resnet, 250),
    ]
    rows = []
    for label, fn, shape, n, batch in cases:
        m = measure(fn, n, batch, args.repeats, shape)
        rows.append(
            f"| {label} | {n:,} | {batch} | {m['certify_wall'] * 1e3:,.0f} | {m['forward_wall'] * 1e3:,.0f} "
            f"| **{m['ratio_wall']:.3f}** | {m['ratio_cpu']:.3f} |"
        )
    lines = [
        "One input, Gaussian noise, n samples (+ n0 = 100 for certify); "
        f"{args.repeats} alternating runs of each, one process: fastest times, "
        "median of the per-pair ratios of seconds per noisy sample.",
        f"Machine: {machine()}.",
        f"Command: `{command_line()}`",
        "",
        "| model | n | batch | certify (ms) | bare forward (ms) | certify / forward (wall) | (CPU time) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Goal: certify / forward <= 1.10. The MLP's forward pass is ~10x cheaper than the default",
        "model's, so drawing the noise on the device shows up as a larger share. Random models get",
        "random biases too (XLA folds flax's zero initial biases away). A ratio a little under 1 is",
        "no error: the bare forward reads its noisy inputs back from memory (drawn beforehand),",
        "certify draws each batch where it is used.",
    ]
    body = "## Certify overhead (issue 5)\n\n" + "\n".join(lines)
    print(body)
    if args.write:
        write_section("certify_overhead", body)


if __name__ == "__main__":
    main()
