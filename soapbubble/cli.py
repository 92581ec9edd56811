"""The ``soapbubble`` command line. Thin: parses arguments, calls the library, prints.

Commands:
  demo      the main job: train or load the default model, certify the embedded
            digits test set with Gaussian, l2-family and mixed l_inf noise, write
            TSVs, a JSON summary, tables and plots.
  certify   certify a dataset with a model (Cohen et al.'s protocol), resumable.
  train     train a model with noise augmentation (resumable).
  convert   convert a published PyTorch checkpoint (Cohen et al., Salman et al.).
  analyze   certified-accuracy tables and plots from certification TSVs.
  toy       certify a linear classifier whose exact robust radius is known.

Errors a user can cause are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import sys

FAMILIES = ("gaussian", "l2", "mixed_linf")


# ----------------------------------------------------------------------------- commands


def _demo(args) -> int:
    from soapbubble import main_job

    out = args.out or os.path.join("soapbubble-out", "demo-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    config = main_job.DemoConfig(n=args.n, n0=args.n0, alpha=args.alpha, batch_size=args.batch,
                                 seed=args.seed, max_images=args.max)
    print(f"soapbubble demo: output folder {out}")
    main_job.run_demo(out, config, progress=not args.quiet)
    return 0


# The paper's shapes at d = 3072 (CIFAR-10): k = 500 for the l2 family, 250 for mixed l_inf.
_PAPER_K = {"l2": 500.0, "mixed_linf": 250.0, "pure_linf": 250.0}


def _family_class(name):
    from soapbubble import noise

    return {"gaussian": noise.Gaussian, "l2": noise.L2Family, "mixed_linf": noise.MixedLinf,
            "pure_linf": noise.PureLinf}[name]


def _family(args, d):
    """The certification family: --sigma is sigma0, matched by the paper's rule unless --no-match-sigma."""
    from soapbubble import noise

    if args.noise == "gaussian":
        if args.k not in (None, 0.0):
            raise ValueError("--k applies to the l2 and mixed_linf families, not to gaussian")
        return noise.Gaussian(args.sigma)
    k = _PAPER_K[args.noise] * d / 3072 if args.k is None else args.k
    sigma = noise.matched_sigma(args.sigma, d, k) if args.match_sigma else args.sigma
    return _family_class(args.noise)(sigma, k)


def _certify(args) -> int:
    import jax
    from tqdm.auto import tqdm

    from soapbubble import certify as certify_lib
    from soapbubble import data, main_job, models, runner

    dataset = data.load(args.dataset, args.split, data_dir=args.data_dir)
    if args.model is None:
        if args.dataset != "digits":
            raise ValueError(f"--model is required for dataset {args.dataset!r} (the default model is for digits)")
        logits_fn, model_path = main_job.default_model(progress=not args.quiet)
    else:
        model_path = pathlib.Path(args.model)
        logits_fn = models.load(model_path)
    d = math.prod(dataset.image_shape)
    family = _family(args, d)
    alpha_d = args.alpha / 2
    table = certify_lib.cached_radius_table(family, d, args.attack, alpha_d=alpha_d, table_dir=args.table_dir)
    key = jax.random.key(args.seed)

    def certify_row(idx, x):
        cert = certify_lib.certify(jax.random.fold_in(key, idx), logits_fn, x, family, attack=args.attack,
                                   n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch, table=table)
        return int(cert.prediction), float(cert.radius)

    import soapbubble

    parameters = {
        "dataset": args.dataset, "split": args.split, "model": os.fspath(model_path), "noise": family.describe(),
        "attack": args.attack, "n0": args.n0, "n": args.n, "alpha": args.alpha, "batch_size": args.batch,
        "seed": args.seed, "key": f"jax.random.fold_in(jax.random.key({args.seed}), idx)",
        "table": table.identity(), "soapbubble_version": soapbubble.__version__,
    }
    total = len(dataset) if args.max is None else min(len(dataset), args.max)
    rows = ((i, *dataset[i]) for i in range(total))
    bar = None if args.quiet else (lambda it: tqdm(it, total=-(-total // args.skip), desc="certify", unit="img"))
    result = runner.run_dataset(rows, certify_row, args.out, parameters, skip=args.skip, max_index=args.max,
                                progress=bar)
    resumed = "" if result.resumed_after is None else f" (resumed after idx {result.resumed_after})"
    print(f"soapbubble certify: {result.written} rows written to {args.out}{resumed}")
    return 0


def _train(args) -> int:
    import jax

    from soapbubble import data, train

    if args.default:
        result = train.train_default_model(jax.random.key(args.seed), args.workdir, progress=not args.quiet)
        print(f"soapbubble train: model saved in {result.model_dir}; clean test accuracy "
              f"{100 * float(result.test_accuracy[-1]):.1f}%")
        return 0
    dataset = data.materialize(data.load(args.dataset, "train", data_dir=args.data_dir))
    test = data.materialize(data.load(args.dataset, "test", data_dir=args.data_dir)) if args.dataset != "imagenet2012" else None
    # Training uses --sigma as the family's own scale (k defaults to 0).
    cls = _family_class(args.noise)
    family = cls(args.sigma) if args.noise == "gaussian" else cls(args.sigma, args.k if args.k is not None else 0.0)
    config = train.TrainConfig(family=family, arch=args.arch, epochs=args.epochs, batch_size=args.batch,
                               learning_rate=args.lr, lr_step_epochs=args.lr_step, macer_weight=args.macer_weight,
                               progress=not args.quiet)
    result = train.train(jax.random.key(args.seed), config, dataset, workdir=args.workdir, eval_dataset=test)
    acc = "" if result.test_accuracy is None else f"; clean test accuracy {100 * float(result.test_accuracy[-1]):.1f}%"
    print(f"soapbubble train: model saved in {result.model_dir}{acc}")
    return 0


def _convert(args) -> int:
    from soapbubble.models import convert

    path = convert.convert_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"soapbubble convert: wrote {path}")
    return 0


def _analyze(args) -> int:
    import numpy as np

    from soapbubble import analyze

    results = [analyze.read_results(path) for path in args.results]
    radii = args.radii or list(np.round(np.linspace(0, max(float(r.radius.max()) for r in results), 6), 4))
    print("Certified accuracy, approximate [high-probability, rho = %g]:" % args.rho)
    print(analyze.format_table(results, radii, alpha=args.alpha, rho=args.rho))
    if args.plot:
        path = analyze.plot_certified_accuracy(results, args.plot, max_radius=args.max_radius, alpha=args.alpha,
                                               rho=args.rho)
        print(f"soapbubble analyze: plot written to {path}")
    return 0


def _toy(args) -> int:
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
    family = noise.Gaussian(sigma)
    batch = min(n, 10_000)
    batches = -(-n // batch)

    @jax.jit
    def count_class_one(key, xi):
        def body(carry, key):
            z = family.sample(key, batch, (d,))
            return carry + jnp.sum((xi + z) @ w > 0), None

        total, _ = jax.lax.scan(body, jnp.int32(0), jax.random.split(key, batches))
        return total

    counts = jax.vmap(count_class_one)(jax.random.split(k_noise, args.points), x)
    total = batches * batch
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


# ----------------------------------------------------------------------------- parsing


def _ranged(kind, name, low=None, high=None, low_open=False, high_open=False):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a{'n integer' if kind is int else ' number'}, got {text!r}") from None
        bad_low = low is not None and (value <= low if low_open else value < low)
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high or value != value or value in (float("inf"), float("-inf")):
            lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
            hi = "" if high is None else f"{high}" + (")" if high_open else "]")
            allowed = f"in {lo}, {hi}" if low is not None and high is not None else (f">= {low}" if not low_open else f"> {low}")
            raise argparse.ArgumentTypeError(f"{name} must be {allowed}, got {value}")
        return value

    return parse


def _common_certify_args(p, n_default):
    p.add_argument("--n0", type=_ranged(int, "--n0", 1), default=100, help="selection samples per input (default 100)")
    p.add_argument("--n", type=_ranged(int, "--n", 1, 2**20), default=n_default,
                   help=f"estimation samples per input (default {n_default})")
    p.add_argument("--alpha", type=_ranged(float, "--alpha", 0, 1, True, True), default=0.001,
                   help="failure probability of each certificate, in (0, 1) (default 0.001)")
    p.add_argument("--batch", type=_ranged(int, "--batch", 1), default=1000, help="noise samples per step (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    p.add_argument("--max", type=_ranged(int, "--max", 1), default=None, help="stop before this index (Cohen's --max)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soapbubble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job on the embedded digits (offline, a few minutes)")
    demo.add_argument("--out", help="output folder (default soapbubble-out/demo-<date>-<time>)")
    _common_certify_args(demo, 10_000)
    demo.set_defaults(run=_demo)

    cert = sub.add_parser("certify", help="certify a dataset with a model; resumable TSV output")
    cert.add_argument("--dataset", default="digits", help="digits (embedded), cifar10 or imagenet2012 (tfds)")
    cert.add_argument("--split", default="test", help="dataset split (default test)")
    cert.add_argument("--data-dir", help="tfds data directory (prepared beforehand; nothing is downloaded)")
    cert.add_argument("--model", help="a saved model directory (default for digits: the cached default model)")
    cert.add_argument("--noise", choices=FAMILIES, default="gaussian", help="smoothing family (default gaussian)")
    cert.add_argument("--sigma", type=_ranged(float, "--sigma", 0, None, True), required=True,
                      help="Gaussian scale sigma0; other families are matched to it unless --no-match-sigma")
    cert.add_argument("--k", type=_ranged(float, "--k", 0), default=None,
                      help="shape k (default: the paper's k = 500 (l2) or 250 (mixed) of d = 3072, scaled to d)")
    cert.add_argument("--no-match-sigma", dest="match_sigma", action="store_false",
                      help="use --sigma as the family's own scale instead of matching it")
    cert.add_argument("--attack", choices=("l2", "linf"), default="l2", help="threat model (default l2)")
    cert.add_argument("--skip", type=_ranged(int, "--skip", 1), default=1, help="certify every skip-th input")
    cert.add_argument("--table-dir", help="radius table cache (default $SOAPBUBBLE_CACHE/tables)")
    cert.add_argument("--out", required=True, help="output TSV (a rerun with the same arguments resumes)")
    _common_certify_args(cert, 100_000)
    cert.set_defaults(run=_certify)

    tr = sub.add_parser("train", help="train a model with noise augmentation (resumable)")
    tr.add_argument("--dataset", default="digits", help="digits (embedded) or cifar10 (tfds)")
    tr.add_argument("--data-dir", help="tfds data directory")
    tr.add_argument("--arch", default="small_cnn", help="architecture (small_cnn, cifar_resnet20/56/110, resnet50)")
    tr.add_argument("--default", action="store_true",
                    help="train the default model (small_cnn, digits, Gaussian sigma 0.25); other options ignored")
    tr.add_argument("--noise", choices=FAMILIES + ("pure_linf",), default="gaussian")
    tr.add_argument("--sigma", type=_ranged(float, "--sigma", 0, None, True), default=0.25)
    tr.add_argument("--k", type=_ranged(float, "--k", 0), default=None)
    tr.add_argument("--epochs", type=_ranged(int, "--epochs", 1), default=20)
    tr.add_argument("--batch", type=_ranged(int, "--batch", 1), default=64)
    tr.add_argument("--lr", type=_ranged(float, "--lr", 0, None, True), default=0.05)
    tr.add_argument("--lr-step", type=_ranged(int, "--lr-step", 1), default=15)
    tr.add_argument("--macer-weight", type=_ranged(float, "--macer-weight", 0), default=0.0,
                    help="weight of the certified-radius objective (0: plain noise augmentation)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--workdir", required=True, help="checkpoints and the final model (a rerun resumes)")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(run=_train)

    conv = sub.add_parser("convert", help="convert a published PyTorch checkpoint to a soapbubble model")
    conv.add_argument("checkpoint", help="torch checkpoint with 'arch' and 'state_dict' (Cohen et al.'s format)")
    conv.add_argument("out", help="output model directory")
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(run=_convert)

    an = sub.add_parser("analyze", help="certified-accuracy table and plot from certify TSVs")
    an.add_argument("results", nargs="+", help="TSV files (soapbubble's or Cohen et al.'s)")
    an.add_argument("--radii", type=lambda t: [float(v) for v in t.split(",")], help="comma-separated radii")
    an.add_argument("--alpha", type=_ranged(float, "--alpha", 0, 1, True, True), default=0.001,
                    help="per-certificate failure probability used for the high-probability curve")
    an.add_argument("--rho", type=_ranged(float, "--rho", 0, 1, True, True), default=0.001)
    an.add_argument("--plot", help="write a PNG of the curves here")
    an.add_argument("--max-radius", type=_ranged(float, "--max-radius", 0, None, True), default=None)
    an.set_defaults(run=_analyze)

    toy = sub.add_parser("toy", help="certify a linear classifier with a known robust radius (seconds)")
    toy.add_argument("--d", type=_ranged(int, "--d", 1), default=64, help="input dimension (default 64)")
    toy.add_argument("--sigma", type=_ranged(float, "--sigma", 0, None, True), default=0.5)
    toy.add_argument("--n", type=_ranged(int, "--n", 1, 2**20), default=100_000)
    toy.add_argument("--alpha", type=_ranged(float, "--alpha", 0, 1, True, True), default=0.001)
    toy.add_argument("--points", type=_ranged(int, "--points", 1), default=8)
    toy.add_argument("--seed", type=int, default=0)
    toy.set_defaults(run=_toy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("soapbubble: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError) as e:
        # One clear line, no traceback, for errors a user can cause.
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"soapbubble {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
