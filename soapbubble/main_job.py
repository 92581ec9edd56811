"""The main job: certify the embedded digits test set with three smoothing families.

Offline and on 2 CPU cores in a few minutes:

1. load the cached default model, or train it (small CNN on the embedded digits
   with Gaussian noise sigma0 = 0.25; well under a minute);
2. certify every test image (360) with Cohen et al.'s protocol under Gaussian
   noise, the l2 family and the mixed l_inf family at matched scales (the paper's
   rule, :func:`soapbubble.noise.matched_sigma`);
3. write one TSV per (family, attack) in Cohen et al.'s format, a JSON summary,
   and a PNG of certified accuracy against radius for the l2 and the l_inf
   attack, and print the certified-accuracy tables (the shape of the paper's
   Tables 1 and 3);
4. certify the same images again with the bilateral condition (Appendix D,
   ``bilateral=True``: pA and every other class bounded from the same samples,
   ``alpha_p`` split between them) and report certified accuracy at the same
   radii, unilateral against bilateral, for each (family, attack)
   (``DemoConfig(bilateral=False)``, ``soapbubble demo --no-bilateral``: skip it).

Shapes are scaled to the digits (d = 64): the paper's k = 500 of 3072 (l2) and
k = 250 of 3072 (mixed l_inf) become k = 10 and k = 5. Gaussian and l2-family
counts are drawn once per image and serve both attacks (their tables are exact,
so alpha goes entirely to pA); the mixed l_inf table is Monte Carlo and takes
half of alpha (:func:`soapbubble.worst_case` decides both, and the bilateral
split of the rest). A bilateral run uses the same keys as the unilateral one, so
both see the same samples up to where each stops; its tables keep the V grid
(cached; the l2 family's take about a minute each to build, once).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np

from soapbubble import analyze, data, noise, runner, sequential

__all__ = ["DemoConfig", "cache_dir", "default_model", "run_demo", "L2_RADII", "LINF_RADII"]

#: The runs: family -> the attacks it certifies (the l2 family's and the Gaussian's counts serve both).
PLANS = {"gaussian": ("l2", "linf"), "l2": ("l2", "linf"), "mixed_linf": ("linf",)}
#: Radii of the printed tables (pixels in [0, 1]).
L2_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
LINF_RADII = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Parameters of the main job.

    Attributes:
      sigma0: Gaussian scale the default model was trained with; the other
        families are matched to it.
      k_l2: shape of the l2 family.
      k_linf: shape of the mixed l_inf family.
      n0: selection samples per image.
      n: estimation samples per image.
      alpha: failure probability of each certificate.
      batch_size: noise samples per step.
      seed: PRNG seed (certification keys are ``fold_in(key(seed), idx)``).
      max_images: certify only the first images (None: all 360).
      bilateral: also certify with the bilateral condition and compare.
    """

    sigma0: float = 0.25
    k_l2: float = 10.0
    k_linf: float = 5.0
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    batch_size: int = 1000
    seed: int = 0
    max_images: int | None = None
    bilateral: bool = True

    def __post_init__(self):
        for name in ("n0", "n", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not (math.isfinite(self.sigma0) and self.sigma0 > 0):
            raise ValueError(f"sigma0 must be finite and > 0, got {self.sigma0}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        if not isinstance(self.bilateral, bool):
            raise TypeError(f"bilateral must be a bool, got {self.bilateral!r}")


def cache_dir() -> pathlib.Path:
    """``$SOAPBUBBLE_CACHE`` or ``~/.cache/soapbubble``."""
    return pathlib.Path(os.environ.get("SOAPBUBBLE_CACHE") or pathlib.Path.home() / ".cache" / "soapbubble")


def default_model(*, progress: bool = True, log=print) -> tuple[Any, pathlib.Path]:
    """The default model's ``logits_fn`` and directory, trained on first use and cached."""
    from soapbubble import models, train

    workdir = cache_dir() / "models" / "default"
    model_dir = workdir / "model"
    if not (model_dir / "soapbubble_model.json").exists():
        log(f"Training the default model (small CNN, digits, Gaussian sigma 0.25) into {model_dir} ...")
        start = time.perf_counter()
        result = train.train_default_model(jax.random.key(0), workdir, progress=progress)
        accuracy = None if result.test_accuracy is None else float(result.test_accuracy[-1])
        log(f"  trained in {time.perf_counter() - start:.0f} s"
            + ("" if accuracy is None else f", clean test accuracy {100 * accuracy:.1f}%"))
    return models.load(model_dir), model_dir


def _families(config: DemoConfig, d: int) -> dict[str, noise.SmoothingFamily]:
    return {
        "gaussian": noise.Gaussian(config.sigma0),
        "l2": noise.L2Family(noise.matched_sigma(config.sigma0, d, config.k_l2), config.k_l2),
        "mixed_linf": noise.MixedLinf(noise.matched_sigma(config.sigma0, d, config.k_linf), config.k_linf),
    }


def run_demo(out_dir: str | os.PathLike, config: DemoConfig = DemoConfig(), *, progress: bool = True,
             log=print) -> dict[str, Any]:
    """Runs the main job into ``out_dir`` (created; a rerun resumes). Returns the summary.

    The summary (also ``summary.json``) holds, per ``"<family>_<attack>"``, the
    certified accuracy at :data:`L2_RADII` or :data:`LINF_RADII`, the alpha split,
    the files and the forward passes; with ``config.bilateral`` its ``"bilateral"``
    entry holds the same for the bilateral runs (the split as
    ``soapbubble.sequential.BILATERAL_CONSTRUCTION``), to compare with the unilateral
    ``"certified_accuracy"`` at the same radii.
    """
    import soapbubble

    out = pathlib.Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to the output folder {os.fspath(out)!r}: {e.strerror}") from e
    started = time.perf_counter()
    logits_fn, model_dir = default_model(progress=progress, log=log)
    test = data.load_digits("test")
    count = len(test) if config.max_images is None else min(config.max_images, len(test))
    d = int(np.prod(test.image_shape))
    families = _families(config, d)
    key = jax.random.key(config.seed)
    table_dir = soapbubble.bounds.cache.default_table_dir()
    log(f"Radius tables (cached in {table_dir}) ...")
    plans = PLANS
    modes = (False, True) if config.bilateral else (False,)
    classes = None
    if config.bilateral:  # the bilateral split depends on the model's number of classes
        from soapbubble import counting

        classes = counting.num_classes(counting.as_classifier(logits_fn), counting.CHUNK, test.image_shape,
                                       np.float32)
    tables, budgets = {}, {}
    for name, attacks in plans.items():
        rule = {attack: soapbubble.worst_case(families[name], attack) for attack in attacks}
        for attack, bilateral in ((a, b) for a in attacks for b in modes):
            budget = (rule[attack].bilateral_budget(config.alpha, classes) if bilateral
                      else rule[attack].alpha_budget(config.alpha))
            budgets[name, attack, bilateral] = budget
            tables[name, attack, bilateral] = soapbubble.cached_radius_table(
                families[name], d, attack, alpha_d=budget.alpha_d, table_dir=table_dir, bilateral=bilateral)
    rows = [(i, *test[i]) for i in range(count)]
    files, spent = {}, {}
    for bilateral in modes:
        for name, attacks in plans.items():
            for attack in attacks:
                run = (name, attack, bilateral)
                files[run], spent[run] = _certify_run(out, run, families[name], tables[run], budgets[run], rows,
                                                      key, logits_fn, model_dir, config, progress)

    def label(run):
        return f"{run[0]} ({run[1]})" + (", bilateral" if run[2] else "")

    def radii_of(attack):
        return L2_RADII if attack == "l2" else LINF_RADII

    def accuracy(run):
        return dict(zip([str(r) for r in radii_of(run[1])],
                        analyze.approximate_certified_accuracy(results[run], np.array(radii_of(run[1]))).tolist()))

    def passes(bilateral):
        mine = {f"{run[0]}_{run[1]}": v for run, v in spent.items() if run[2] == bilateral}
        return {**mine, "total": sum(v["forward_passes"] for v in mine.values()),
                "fixed_n_total": sum(v["fixed_n_forward_passes"] for v in mine.values())}

    results = {run: analyze.read_results(path, name=label(run)) for run, path in files.items()}
    unilateral = [run for run in results if not run[2]]
    l2 = [results[k] for k in unilateral if k[1] == "l2"]
    linf = [results[k] for k in unilateral if k[1] == "linf"]
    table_l2 = analyze.format_table(l2, L2_RADII, unit=" (l2)")
    table_linf = analyze.format_table(linf, LINF_RADII, unit=" (linf)")
    # The sequential files decide the table's radii only: the curves are drawn through those.
    analyze.plot_certified_accuracy(l2, out / "certified_accuracy_l2.png", max_radius=1.2,
                                    title="digits, l2 attack", xlabel="l2 radius", radii=np.asarray(L2_RADII))
    analyze.plot_certified_accuracy(linf, out / "certified_accuracy_linf.png", max_radius=0.15,
                                    title="digits, l_inf attack", xlabel="l_inf radius", radii=np.asarray(LINF_RADII))
    spent_uni = passes(False)
    total, total_fixed = spent_uni["total"], spent_uni["fixed_n_total"]
    summary = {
        "config": dataclasses.asdict(config),
        "families": {name: fam.describe() for name, fam in families.items()},
        "model": os.fspath(model_dir),
        "images": count,
        "alpha_budget": {f"{run[0]}_{run[1]}": budgets[run].as_dict() for run in unilateral},
        "certified_accuracy": {f"{run[0]}_{run[1]}": accuracy(run) for run in unilateral},
        "files": {f"{run[0]}_{run[1]}": files[run].name for run in unilateral},
        "forward_passes": spent_uni,
    }
    texts = [table_l2, table_linf]
    if config.bilateral:
        # Unilateral against bilateral at the same radii, each (family, attack) on two adjacent rows.
        both = {attack: [results[(*run[:2], b)] for run in unilateral if run[1] == attack for b in (False, True)]
                for attack in ("l2", "linf")}
        texts += [analyze.format_table(both["l2"], L2_RADII, unit=" (l2)"),
                  analyze.format_table(both["linf"], LINF_RADII, unit=" (linf)")]
        bilateral_runs = [run for run in results if run[2]]
        summary["bilateral"] = {
            "alpha_budget": {f"{run[0]}_{run[1]}": budgets[run].as_dict(sequential.BILATERAL_CONSTRUCTION) for run in bilateral_runs},
            "certified_accuracy": {f"{run[0]}_{run[1]}": accuracy(run) for run in bilateral_runs},
            "files": {f"{run[0]}_{run[1]}": files[run].name for run in bilateral_runs},
            "forward_passes": passes(True),
        }
    summary.update(seconds=round(time.perf_counter() - started, 1), soapbubble_version=_version())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "tables.txt").write_text("\n\n".join(texts) + "\n")
    log("")
    log("Certified accuracy, l2 attack (the paper's Table 1 shape):")
    log(table_l2)
    log("")
    log("Certified accuracy, l_inf attack (the paper's Table 3 shape):")
    log(table_linf)
    log("")
    if config.bilateral:
        log("Certified accuracy, unilateral against bilateral (Appendix D; same keys, alpha_p split "
            "between pA and the other classes):")
        log(texts[2])
        log("")
        log(texts[3])
        log("")
    log(f"Sequential certification spent {total:,} forward passes, {total / total_fixed:.1%} of the "
        f"{total_fixed:,} that the fixed-n route (n0 + n = {config.n0 + config.n:,} per image) would have"
        + (" (unilateral runs)." if config.bilateral else "."))
    log(f"Wrote {', '.join(sorted(p.name for p in files.values()))}, summary.json, tables.txt and "
        f"certified_accuracy_{{l2,linf}}.png to {os.fspath(out)} in {summary['seconds']:.0f} s")
    return summary


def _certify_run(out, run, family, table, budget, rows, key, logits_fn, model_dir, config, progress):
    """One (family, attack, bilateral) run through the sequential route into its TSV (resumable).

    Returns the TSV's path and its forward passes (with what the fixed-n route would spend).
    """
    from tqdm.auto import tqdm

    import soapbubble

    name, attack, bilateral = run
    radii = np.asarray(L2_RADII if attack == "l2" else LINF_RADII)

    # The sequential route: every image stops as soon as the table's radii are decided;
    # row idx keeps the key fold_in(key, idx) whatever the group it is certified in.
    def certify_rows(idxs, xs):
        c = soapbubble.certify_radii(
            key, logits_fn, np.stack(xs), family, radii, attack=attack, n0=config.n0, max_n=config.n,
            alpha=config.alpha, batch_size=config.batch_size, table=table, row_ids=np.asarray(idxs),
            bilateral=bilateral)
        best = [float(radii[c.certified[i]].max(initial=0.0)) for i in range(len(idxs))]
        bounds = [(repr(float(c.p_lower[i])), repr(float(c.p_upper[i]))) if bilateral else ()
                  for i in range(len(idxs))]
        return [(int(c.prediction[i]), best[i], int(c.n_used[i]), *bounds[i], *(int(v) for v in c.certified[i]))
                for i in range(len(idxs))]

    path = out / (f"{name}_{attack}" + ("_bilateral" if bilateral else "") + ".tsv")
    columns = ("n_used", *(("p_lower", "p_upper") if bilateral else ()), *(f"certified_{r:g}" for r in radii))
    parameters = {
        "dataset": "digits", "split": "test", "model": os.fspath(model_dir), "noise": family.describe(),
        "attack": attack, "route": "sequential", "radii": radii.tolist(), "n0": config.n0,
        "max_n": config.n, "alpha": config.alpha, "batch_size": config.batch_size, "seed": config.seed,
        "soapbubble_version": _version(), "table": table.identity(),
        "alpha_budget": budget.as_dict(sequential.BILATERAL_CONSTRUCTION) if bilateral else budget.as_dict(),
    }
    if bilateral:
        parameters["bilateral"] = True
    count = len(rows)
    label = f"{name} {attack}" + (" bilateral" if bilateral else "")
    bar = (lambda it: tqdm(it, total=count, desc=f"certify {label}", unit="img")) if progress else None
    runner.run_dataset(rows, certify_rows, path, parameters, progress=bar, columns=columns, group=count)
    used = [int(r[6]) for r in runner.completed_rows(path, columns)]
    return path, {
        "forward_passes": int(sum(used) + config.n0 * len(used)),
        "fixed_n_forward_passes": int((config.n + config.n0) * len(used)),
    }


def _version() -> str:
    import soapbubble

    return soapbubble.__version__
