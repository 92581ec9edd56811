"""The ``soapbubble`` command line. Thin: parses arguments, calls the library, prints.

Commands::

  demo      the main job: train or load the default model, certify the embedded
            digits test set with Gaussian, l2-family and mixed l_inf noise
            (unilateral and bilateral), write TSVs, a JSON summary, tables and plots.
  certify   certify a dataset with a model (Cohen et al.'s protocol), resumable;
            one process's share of the rows under jax.distributed.
  merge     join the parts of a multi-process certify run into one TSV.
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
                                 seed=args.seed, max_images=args.max, bilateral=args.bilateral)
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


def _processes(args) -> tuple[int, int]:
    """``(index, count)`` of this process: from ``jax.distributed`` (``--distributed``,
    ``--coordinator``) or ``--process-index/--process-count``; ``(0, 1)`` alone.

    ``jax.distributed.initialize`` runs here, before any JAX computation, as it must.
    """
    index, count = args.process_index, args.process_count
    if count is not None and index is not None and index >= count:
        raise ValueError(f"--process-index must be in [0, --process-count) = [0, {count}), got {index}")
    if args.coordinator is not None and (index is None or count is None):
        raise ValueError("--coordinator needs --process-id (or --process-index) and --process-count")
    if not (args.distributed or args.coordinator is not None):
        if (index is None) != (count is None):
            raise ValueError("--process-index and --process-count go together (or use --distributed / --coordinator)")
        return (0, 1) if count is None else (index, count)
    import jax

    try:
        # Explicit values where given; the rest from the cluster's environment (Slurm, Open MPI, TPU, ...).
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=count, process_id=index)
    except (RuntimeError, ValueError) as e:
        what = "--coordinator" if args.coordinator is not None else "--distributed"
        hint = "" if args.coordinator is not None else (
            " (--distributed discovers the cluster on Slurm, Open MPI and Cloud TPU; elsewhere use --coordinator"
            " HOST:PORT --process-id I --process-count P)")
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{what}: jax.distributed.initialize() failed: {why}{hint}") from e
    return jax.process_index(), jax.process_count()


def _certify(args) -> int:
    process_index, process_count = _processes(args)  # first: jax.distributed must start before any computation

    import jax
    import numpy as np
    from tqdm.auto import tqdm

    import soapbubble
    from soapbubble import counting, data, main_job, merge, models, runner

    dataset = data.load(args.dataset, args.split, data_dir=args.data_dir)
    if args.model is None:
        if args.dataset != "digits":
            raise ValueError(f"--model is required for dataset {args.dataset!r} (the default model is for digits)")
        default_dir = main_job.cache_dir() / "models" / "default"
        if process_count > 1 and not (default_dir / "model" / models.io.META_FILE).exists():
            # Several processes would train it at once into the same cache; train it once first.
            raise ValueError(f"with {process_count} processes the default model must be trained first (it is not "
                             f"in {os.fspath(default_dir / 'model')}): run soapbubble train --default --workdir "
                             f"{os.fspath(default_dir)}, or pass --model DIR")
        logits_fn, model_path = main_job.default_model(progress=not args.quiet)
    else:
        model_path = pathlib.Path(args.model)
        logits_fn = models.load(model_path)
    d = math.prod(dataset.image_shape)
    family = _family(args, d)
    rule = soapbubble.worst_case(family, args.attack)
    bilateral = args.bilateral
    if bilateral:
        # The split depends on the number of classes: the model's, read without computing anything.
        from soapbubble import sequential

        classes = counting.num_classes(counting.as_classifier(logits_fn), counting.CHUNK, dataset.image_shape,
                                       np.float32)
        budget = rule.bilateral_budget(args.alpha, classes)
        recorded = budget.as_dict(sequential.BILATERAL_CONSTRUCTION) if args.radii is not None else budget.as_dict()
    else:
        budget = rule.alpha_budget(args.alpha)
        recorded = budget.as_dict()
    table = soapbubble.cached_radius_table(family, d, args.attack, alpha_d=budget.alpha_d, table_dir=args.table_dir,
                                           bilateral=bilateral)
    key = jax.random.key(args.seed)

    columns = ("p_lower", "p_upper") if bilateral else ()
    if args.radii is None:
        # Rows in groups through one compiled loop (soapbubble.counting); row idx keeps key
        # fold_in(key, idx), so each certificate is the one a call per row would give.
        group = args.group or counting.GROUP

        def certify_row(idxs, xs):
            cert = soapbubble.certify(key, logits_fn, np.stack(xs), family, attack=args.attack, n0=args.n0, n=args.n,
                                      alpha=args.alpha, batch_size=args.batch, table=table, bilateral=bilateral,
                                      batched=True, row_ids=np.asarray(idxs))
            return [(int(cert.prediction[i]), float(cert.radius[i]),
                     *((_exact(cert.p_lower[i]), _exact(cert.p_upper[i])) if bilateral else ()))
                    for i in range(len(idxs))]
    else:
        # The sequential route: rows in groups through one compiled pool; row idx keeps key
        # fold_in(key, idx) (the group's rows are certified with their own idx).
        radii = np.asarray(args.radii)
        columns, group = ("n_used", *columns, *(f"certified_{r:g}" for r in radii)), args.group or 256

        def certify_row(idxs, xs):
            certs = [None] * len(idxs)
            out = soapbubble.certify_radii(key, logits_fn, np.stack(xs), family, radii, attack=args.attack,
                                           n0=args.n0, max_n=args.n, alpha=args.alpha, batch_size=args.batch,
                                           table=table, row_ids=np.asarray(idxs), bilateral=bilateral)
            for i in range(len(idxs)):
                best = radii[out.certified[i]].max(initial=0.0) if out.prediction[i] >= 0 else 0.0
                bounds = (_exact(out.p_lower[i]), _exact(out.p_upper[i])) if bilateral else ()
                certs[i] = (int(out.prediction[i]), float(best), int(out.n_used[i]), *bounds,
                            *(int(c) for c in out.certified[i]))
            return certs

    parameters = {
        "dataset": args.dataset, "split": args.split, "model": os.fspath(model_path), "noise": family.describe(),
        "attack": args.attack, "n0": args.n0, "n": args.n, "alpha": args.alpha, "batch_size": args.batch,
        "seed": args.seed, "key": f"jax.random.fold_in(jax.random.key({args.seed}), idx)",
        "table": table.identity(), "alpha_budget": recorded, "soapbubble_version": soapbubble.__version__,
    }
    if bilateral:  # (absent from unilateral sidecars, which stay as they were: their runs still resume)
        parameters["bilateral"] = True
    if args.radii is not None:
        parameters.update(route="sequential", radii=list(args.radii), max_n=parameters.pop("n"))
    total = len(dataset) if args.max is None else min(len(dataset), args.max)
    # This process's share: the selected rows (idx % skip == 0, idx < total) at positions
    # process_index, process_index + P, ... of the selection (soapbubble.merge). Keys stay per idx.
    indices = merge.shard_indices(total, args.skip, process_index, process_count)
    out = merge.part_path(args.out, process_index, process_count)
    if process_count > 1:
        parameters[merge.SHARD_KEY] = merge.shard_parameters(process_index, process_count, args.skip, total)
    bar = None if args.quiet else (lambda it: tqdm(it, total=len(indices), desc="certify", unit="img"))
    # Only the rows certified are decoded (not the skipped ones, nor those a resumed file has).
    result = runner.run_dataset(indices, certify_row, out, parameters, skip=args.skip, max_index=args.max,
                                progress=bar, columns=columns, group=group, load=dataset.__getitem__)
    resumed = "" if result.resumed_after is None else f" (resumed after idx {result.resumed_after})"
    share = "" if process_count == 1 else f" (process {process_index} of {process_count})"
    print(f"soapbubble certify: {result.written} rows written to {os.fspath(out)}{resumed}{share}")
    return 0


def _exact(p) -> str:
    """A float64 bound as text that reads back to the same float (no rounding either way)."""
    return repr(float(p))


def _merge(args) -> int:
    from soapbubble import merge

    result = merge.merge(args.out, args.parts)
    print(f"soapbubble merge: {result.rows} rows of {result.parts} parts written to {os.fspath(result.path)}")
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
    from soapbubble import analyze

    # Row names: the paths as given, whole (the table's first column is as wide as the longest).
    results = [analyze.read_results(path, name=os.fspath(path)) for path in args.results]
    # Threat model: the sidecar's, else --attack (default l2). One table (and plot) per threat model.
    groups: dict[str, list] = {}
    for res in results:
        groups.setdefault(res.attack or args.attack or "l2", []).append(res)
    for attack, group in groups.items():
        # Sequential runs decided their target radii only: report exactly those.
        targets = sorted({r for res in group for r in (res.target_radii or ())})
        radii = args.radii or targets or analyze.default_radii(
            max((float(r.radius.max()) for r in group if len(r)), default=0.0), attack)
        labels = [analyze.radius_label(r, attack) for r in radii]
        alphas = {res.name: analyze.certificate_alphas(res, args.alpha) for res in group}
        confidence = {name: 1 - args.rho - alpha_d for name, (_, alpha_d) in alphas.items()}
        for name, value in confidence.items():
            if value <= 0:
                raise ValueError(f"--rho {args.rho:g} leaves no confidence for {name} (1 - rho - alpha_d = {value:g})")
        if len(set(alphas.values())) == 1:
            alpha_p, alpha_d = next(iter(alphas.values()))
            detail = (f"with probability >= 1 - rho - alpha_d = {1 - args.rho - alpha_d:g} "
                      f"(rho = {args.rho:g}, alpha_d = {alpha_d:g}, alpha_p = {alpha_p:g})")
        else:
            detail = "with probability >= 1 - rho - alpha_d = " + ", ".join(
                f"{confidence[name]:g} for {name} (alpha_d = {a_d:g}, alpha_p = {a_p:g})"
                for name, (a_p, a_d) in alphas.items()) + f"; rho = {args.rho:g}"
        table = analyze.format_table(group, radii, alpha=args.alpha, rho=args.rho, unit=f" ({attack})",
                                     labels=labels)
        print(f"Certified accuracy (%), {attack} attack: approximate [high-probability, {detail}]:")
        print(table)
        if args.plot:
            plot = pathlib.Path(args.plot)
            if len(groups) > 1:
                plot = plot.with_name(f"{plot.stem}_{attack}{plot.suffix}")
            path = analyze.plot_certified_accuracy(group, plot, max_radius=args.max_radius, alpha=args.alpha,
                                                   rho=args.rho, xlabel=f"{attack} radius")
            print(f"soapbubble analyze: plot written to {path}")
    return 0


def _toy(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import soapbubble
    from soapbubble import noise

    d, sigma, n, alpha = args.d, args.sigma, args.n, args.alpha
    k_w, k_x, k_certify = jax.random.split(jax.random.key(args.seed), 3)
    w = jax.random.normal(k_w, (d,))
    w = w / jnp.linalg.norm(w)
    # Points at known signed distances from the hyperplane w.x = 0: the exact robust
    # radius of the smoothed classifier is the distance itself (Gaussian, l2).
    distances = jnp.linspace(-0.25, 1.5, args.points)
    base = jax.random.normal(k_x, (args.points, d))
    base = base - (base @ w)[:, None] * w
    x = base + distances[:, None] * w
    logits_fn = jax.tree_util.Partial(lambda w, b: jnp.stack([-(b @ w), b @ w], axis=-1), w)
    cert = soapbubble.certify(k_certify, logits_fn, x, noise.Gaussian(sigma), n=n, alpha=alpha, batched=True,
                              batch_size=min(10_000, max(50, n)))
    truth = np.where(np.asarray(distances) > 0, 1, 0)
    print(f"Toy certification: linear classifier in d={d}, Gaussian noise sigma={sigma}, n={n}, alpha={alpha}")
    print(f"{'exact radius':>13} {'p_lower':>9} {'certified':>10}  sound")
    ok = True
    for dist, p, r, pred, want in zip(np.abs(np.asarray(distances)), cert.p_lower, cert.radius, cert.prediction,
                                      truth):
        sound = pred == -1 or (pred == want and r <= dist)
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


def _host_port(text):
    """--coordinator: HOST:PORT, PORT an integer in [1, 65535]."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--coordinator must be HOST:PORT with PORT in [1, 65535] "
                                         f"(e.g. 10.0.0.1:1234), got {text!r}")
    return text


def _radii_list(text, option="--radii"):
    """--radii: comma-separated finite numbers >= 0 (sorted, duplicates dropped)."""
    allowed = "comma-separated finite numbers >= 0 (e.g. 0,0.25,0.5)"
    values = []
    for entry in text.split(","):
        entry = entry.strip()
        try:
            value = float(entry)
        except ValueError:
            why = "an empty entry" if not entry else f"{entry!r} is not a number"
            raise argparse.ArgumentTypeError(f"{option} must be {allowed}, got {text!r} ({why})") from None
        if not 0 <= value < math.inf:
            raise argparse.ArgumentTypeError(
                f"{option} must be {allowed}, got {text!r} ({entry!r} is not a finite number >= 0)")
        values.append(value)
    return sorted(set(values))


def _common_certify_args(p, n_default):
    p.add_argument("--n0", type=_ranged(int, "--n0", 1, 2**31 - 1), default=100, help="selection samples per input (default 100)")
    p.add_argument("--n", type=_ranged(int, "--n", 1, 2**31 - 1), default=n_default,
                   help=f"estimation samples per input (default {n_default})")
    p.add_argument("--alpha", type=_ranged(float, "--alpha", 0, 1, True, True), default=0.001,
                   help="failure probability of each certificate, in (0, 1) (default 0.001)")
    p.add_argument("--batch", type=_ranged(int, "--batch", 50, 2**31 - 1), default=1000,
                   help="noise samples per device per step, >= 50 (one noise chunk; default 1000)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    p.add_argument("--max", type=_ranged(int, "--max", 1), default=None, help="stop before this index (Cohen's --max)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soapbubble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job on the embedded digits (offline, a few minutes)")
    demo.add_argument("--out", help="output folder (default soapbubble-out/demo-<date>-<time>)")
    demo.add_argument("--no-bilateral", dest="bilateral", action="store_false",
                      help="skip the bilateral runs (Appendix D) that the summary compares with the unilateral ones")
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
    cert.add_argument("--radii", type=lambda t: _radii_list(t, "--radii"), default=None,
                      help="target radii, comma-separated: decide each sequentially with as few samples as"
                           " possible (--n is then the most an input may use); the TSV gets n_used and one"
                           " certified_<r> column per radius")
    cert.add_argument("--group", type=_ranged(int, "--group", 1, 2**20), default=None,
                      help="rows certified together, written when the group is done (default 64 with fixed n,"
                           " 256 with --radii)")
    cert.add_argument("--bilateral", action="store_true",
                      help="the bilateral condition (Appendix D): pA bounded from below and every other class"
                           " from above from the same samples, alpha_p split between them (recorded in the"
                           " sidecar's alpha_budget); the TSV gets p_lower and p_upper (after n_used with --radii)")
    multi = cert.add_argument_group(
        "many processes", "certify this process's share of the rows (see soapbubble.merge); with P > 1 processes"
        " the output is <out>.part-<p>-of-<P>.tsv (5 digits each), joined by soapbubble merge")
    multi.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() (cluster discovery from the environment: Slurm,"
                            " Open MPI, Cloud TPU) and take the share of jax.process_index() of jax.process_count()")
    multi.add_argument("--coordinator", type=_host_port, default=None, metavar="HOST:PORT",
                       help="jax.distributed.initialize(coordinator_address=HOST:PORT, num_processes="
                            "--process-count, process_id=--process-id): process 0 serves on HOST:PORT")
    multi.add_argument("--process-index", "--process-id", dest="process_index", default=None, metavar="I",
                       type=_ranged(int, "--process-index", 0), help="this process's index, in [0, P)")
    multi.add_argument("--process-count", type=_ranged(int, "--process-count", 1), default=None, metavar="P",
                       help="number of processes P (without --coordinator/--distributed: no jax.distributed)")
    _common_certify_args(cert, 100_000)
    cert.set_defaults(run=_certify)

    mg = sub.add_parser("merge", help="join the part TSVs of a multi-process certify run into one TSV")
    mg.add_argument("out", help="merged TSV (its sidecar <out>.json gets the run's parameters)")
    mg.add_argument("parts", nargs="+", help="every process's TSV (<out>.part-<p>-of-<P>.tsv), any order")
    mg.set_defaults(run=_merge)

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
    an.add_argument("--radii", type=_radii_list,
                    help="comma-separated radii, finite and >= 0 (default: l2 0, 0.25, 0.5, ... up to "
                         "max(2, the largest radius); l_inf 0, 1/255, 2/255, 4/255, ... up to the largest)")
    an.add_argument("--attack", choices=("l2", "linf"), default=None,
                    help="threat model of files whose sidecar does not record one (default l2)")
    an.add_argument("--alpha", type=_ranged(float, "--alpha", 0, 1, True, True), default=0.001,
                    help="per-certificate failure probability alpha_p for the high-probability column of files "
                         "whose sidecar has no alpha_budget (then alpha_d = 0); default 0.001")
    an.add_argument("--rho", type=_ranged(float, "--rho", 0, 1, True, True), default=0.001,
                    help="probability allowed for more wrong certificates than the bound (default 0.001); "
                         "the high-probability column holds with probability >= 1 - rho - alpha_d")
    an.add_argument("--plot", help="write a PNG of the curves here (one per threat model: <name>_<attack>.png)")
    an.add_argument("--max-radius", type=_ranged(float, "--max-radius", 0, None, True), default=None,
                    help="x-axis extent of the plot")
    an.set_defaults(run=_analyze)

    toy = sub.add_parser("toy", help="certify a linear classifier with a known robust radius (seconds)")
    toy.add_argument("--d", type=_ranged(int, "--d", 1), default=64, help="input dimension (default 64)")
    toy.add_argument("--sigma", type=_ranged(float, "--sigma", 0, None, True), default=0.5)
    toy.add_argument("--n", type=_ranged(int, "--n", 1, 2**31 - 1), default=100_000)
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
