"""Certified-accuracy curves from certification TSVs (soapbubble's or Cohen et al.'s).

Two curves, as in Cohen et al.'s ``analyze.py``:

* approximate certified accuracy at radius r: ``mean(r)``, the share of the N rows
  that are correct with a certified radius >= r;
* the high-probability dataset-level variant (Cohen et al., section 3.2). Each
  certificate is wrong with probability at most ``alpha_p``, independently of the
  others given the Monte Carlo radius table (if the certifier uses one), so the
  number W of wrong certificates is stochastically dominated by
  ``Binomial(N, alpha_p)``. With ``w`` the exact binomial quantile

      w = min { k in {0, ..., N} : P(Binomial(N, alpha_p) > k) <= rho }

  (``scipy.stats.binom.sf(w, N, alpha_p) <= rho``), ``P(W > w) <= rho``. All
  certificates that share one radius table share its failure event, of probability
  ``alpha_d``, which is therefore charged once for the whole dataset, not per row.
  Hence: with probability at least ``1 - rho - alpha_d`` over the certification
  randomness, the smoothed classifier's true certified accuracy at every radius r
  is at least

      mean(r) - w / N.

  (``w`` does not depend on r: the same W wrong certificates bound every radius.)

The alphas come from the TSV's JSON sidecar ``<file>.json`` when it records
``parameters["alpha_budget"] = {"alpha": total, "alpha_p": ..., "alpha_d": ...}``
(soapbubble's runner writes it); for files without one (Cohen et al.'s), the
caller's ``alpha`` is taken as ``alpha_p`` with ``alpha_d = 0``. A bilateral run
(``soapbubble certify --bilateral``) records its split of ``alpha_p`` there too
(``alpha_budget["bilateral"]``); each of its certificates is still wrong with
probability at most ``alpha_p``, so the same bound applies.

Note: Cohen et al.'s ``certify.py`` writes radii with ``{:.3}``, which rounds to
nearest (up to half a unit of the third digit above the true radius); soapbubble
writes them rounded down.

Example:
  >>> import numpy as np
  >>> res = Results(name="demo", idx=np.arange(4), label=np.zeros(4, int),
  ...               predict=np.array([0, 0, 1, -1]), radius=np.array([0.5, 1.0, 2.0, 0.0]),
  ...               correct=np.array([1, 1, 0, 0]))
  >>> approximate_certified_accuracy(res, np.array([0.0, 0.75]))
  array([0.5 , 0.25])
  >>> wrong_certificate_bound(4, alpha=0.001, rho=0.01)  # P(Bin(4, 0.001) > 0) ~ 0.004 <= 0.01
  0
  >>> high_probability_certified_accuracy(res, np.array([0.0, 0.75]), alpha=0.001, rho=0.01)
  array([0.5 , 0.25])
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "Results",
    "read_results",
    "approximate_certified_accuracy",
    "wrong_certificate_bound",
    "high_probability_certified_accuracy",
    "certificate_alphas",
    "default_radii",
    "radius_label",
    "format_table",
    "plot_certified_accuracy",
]

_COLUMNS = ("idx", "label", "predict", "radius", "correct")
ATTACKS = ("l2", "linf")
# Default radii: the l2 grid step, its minimal extent, the minimal l_inf extent (in 1/255), the column cap.
_L2_STEP = 0.25
_L2_MIN_TOP = 2.0
_LINF_MIN_TOP = 8
_MAX_COLUMNS = 17


@dataclasses.dataclass(frozen=True)
class Results:
    """The rows of one certification TSV (arrays of equal length N), and what its sidecar says.

    Attributes:
      name: the row name in tables and plots.
      idx, label, predict, radius, correct: the TSV's columns.
      alpha_p: per-certificate failure probability, from the sidecar's ``alpha_budget``
        (None when unknown, e.g. Cohen et al.'s TSVs, which have no sidecar).
      alpha_d: failure probability of the shared radius table, from the same place (None when unknown).
      attack: ``"l2"`` or ``"linf"``, the sidecar's ``parameters["attack"]`` (None when unknown).
      target_radii: the radii a sequential run decided (``parameters["radii"]``; its
        ``radius`` column is the largest certified one), None for fixed-n runs.
      bilateral: a bilateral run's split of ``alpha_p`` (``alpha_budget["bilateral"]``:
        ``alpha_a``, ``alpha_b``, ``num_classes``, ``construction``), None otherwise.
    """

    name: str
    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray
    alpha_p: float | None = None
    alpha_d: float | None = None
    attack: str | None = None
    target_radii: tuple[float, ...] | None = None
    bilateral: dict | None = None

    def __len__(self) -> int:
        return int(self.idx.size)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_split(where: str, split, alpha_p: float) -> dict:
    """A bilateral split as recorded: its shares add up to at most ``alpha_p``."""
    keys = ("alpha_a", "alpha_b", "num_classes")
    if not isinstance(split, dict) or not all(k in split for k in keys):
        raise ValueError(f"{where}: alpha_budget.bilateral must be an object with {', '.join(keys)}, got {split!r}")
    a, b, c = (split[k] for k in keys)
    if not (_is_number(a) and _is_number(b) and isinstance(c, int) and not isinstance(c, bool) and c >= 2
            and a > 0 and b >= 0 and a + (c - 1) * b <= alpha_p * (1 + 1e-12)):
        raise ValueError(f"{where}: alpha_budget.bilateral must have alpha_a > 0, alpha_b >= 0, num_classes >= 2"
                         f" and alpha_a + (num_classes - 1) alpha_b <= alpha_p = {alpha_p}, got {split!r}")
    return dict(split)


def _read_sidecar(path: pathlib.Path) -> tuple[float | None, float | None, str | None, tuple | None, dict | None]:
    """``(alpha_p, alpha_d, attack, target radii, bilateral split)`` from ``<path>.json`` when it exists
    (None for what it lacks)."""
    side = path.with_name(path.name + ".json")
    if not side.is_file():
        return None, None, None, None, None
    where = f"sidecar {os.fspath(side)!r}"
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(meta).__name__}")
    params = meta.get("parameters", {})
    if not isinstance(params, dict):
        raise ValueError(f"{where}: 'parameters' must be a JSON object, got {type(params).__name__}")
    alpha_p = alpha_d = split = None
    budget = params.get("alpha_budget")
    if budget is not None:
        if not isinstance(budget, dict) or "alpha_p" not in budget or "alpha_d" not in budget:
            raise ValueError(f"{where}: 'alpha_budget' must be an object with 'alpha_p' and 'alpha_d', got {budget!r}")
        alpha_p, alpha_d = budget["alpha_p"], budget["alpha_d"]
        if not _is_number(alpha_p) or not 0 < alpha_p < 1:
            raise ValueError(f"{where}: alpha_budget.alpha_p must be a number in (0, 1), got {alpha_p!r}")
        if not _is_number(alpha_d) or not 0 <= alpha_d < 1:
            raise ValueError(f"{where}: alpha_budget.alpha_d must be a number in [0, 1), got {alpha_d!r}")
        alpha_p, alpha_d = float(alpha_p), float(alpha_d)
        if "bilateral" in budget:
            split = _check_split(where, budget["bilateral"], alpha_p)
    attack = params.get("attack")
    if attack is not None and attack not in ATTACKS:
        raise ValueError(f"{where}: 'attack' must be one of {', '.join(ATTACKS)}, got {attack!r}")
    radii = params.get("radii")
    if radii is not None:
        if not isinstance(radii, list) or not all(_is_number(r) and 0 <= r < math.inf for r in radii):
            raise ValueError(f"{where}: 'radii' must be a list of finite numbers >= 0, got {radii!r}")
        radii = tuple(float(r) for r in radii)
    return alpha_p, alpha_d, attack, radii, split


def read_results(path: str | os.PathLike, name: str | None = None) -> Results:
    """Reads a TSV with the columns ``idx label predict radius correct [time]``, and its sidecar.

    The sidecar ``<path>.json`` (soapbubble's runner writes it; Cohen et al.'s files have
    none) supplies ``alpha_p`` / ``alpha_d`` (from ``parameters["alpha_budget"]``) and
    ``attack`` (from ``parameters["attack"]``) when it records them.

    Args:
      path: the TSV.
      name: the row name (default: the file name without a ``.tsv`` suffix; other
        suffixes are kept, so Cohen et al.'s ``sigma_0.25`` stays whole).

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: if the header or a row is malformed (the message names the line), a
        radius is not a finite number >= 0, or the sidecar is malformed (the message names it).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such results file: {os.fspath(path)!r}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{os.fspath(path)!r} is empty")
    header = lines[0].split("\t")
    if tuple(header[:5]) != _COLUMNS:
        raise ValueError(
            f"{os.fspath(path)!r} does not start with the columns {' '.join(_COLUMNS)} (got {' '.join(header)})"
        )
    cols: dict[str, list] = {c: [] for c in _COLUMNS}
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            if len(fields) < 5:
                raise ValueError("too few fields")
            for c, text in zip(_COLUMNS, fields):
                cols[c].append(float(text) if c == "radius" else int(text))
            if not 0 <= cols["radius"][-1] < math.inf:
                raise ValueError(f"radius must be a finite number >= 0, got {fields[3]}")
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)!r} line {line_no} is malformed ({e}): {line!r}") from None
    arrays = {c: np.asarray(v, dtype=np.float64 if c == "radius" else np.int64) for c, v in cols.items()}
    alpha_p, alpha_d, attack, target_radii, split = _read_sidecar(path)
    if name is None:
        name = path.name[: -len(".tsv")] if path.name.endswith(".tsv") and path.name != ".tsv" else path.name
    return Results(name=name, **arrays, alpha_p=alpha_p, alpha_d=alpha_d, attack=attack, target_radii=target_radii,
                   bilateral=split)


def approximate_certified_accuracy(results: Results, radii: np.ndarray) -> np.ndarray:
    """Share of rows certified correct at radius >= r, for each r in ``radii``."""
    if len(results) == 0:
        raise ValueError(f"{results.name}: no rows to analyze")
    ok = results.correct.astype(bool)
    return np.array([np.mean(ok & (results.radius >= r)) for r in np.asarray(radii, dtype=np.float64)])


def _check_probability(name: str, value, *, closed_low: bool = False) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number in {'[' if closed_low else '('}0, 1), got {value!r}")
    if not ((0 <= value) if closed_low else (0 < value)) or not value < 1:
        raise ValueError(f"{name} must be in {'[' if closed_low else '('}0, 1), got {value}")
    return float(value)


def wrong_certificate_bound(n: int, alpha: float, rho: float) -> int:
    """The exact ``1 - rho`` quantile of ``Binomial(n, alpha)``: the margin ``w`` of the module docstring.

    Returns the smallest integer ``w`` in ``[0, n]`` with ``P(Binomial(n, alpha) > w) <= rho``,
    i.e. ``scipy.stats.binom.sf(w, n, alpha) <= rho < scipy.stats.binom.sf(w - 1, n, alpha)``.
    If each of ``n`` certificates is wrong with probability at most ``alpha``, independently,
    more than ``w`` of them are wrong with probability at most ``rho``.

    Args:
      n: number of certificates, an integer >= 1.
      alpha: per-certificate failure probability, in (0, 1).
      rho: allowed probability of more than ``w`` failures, in (0, 1).

    Raises:
      TypeError, ValueError: an argument out of its range (the message names it).

    Example:
      >>> wrong_certificate_bound(100_000, alpha=0.001, rho=0.001)  # mean 100, sd ~10
      132
    """
    from scipy import stats

    if not isinstance(n, numbers.Integral) or isinstance(n, bool):
        raise TypeError(f"n must be an integer >= 1, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n}")
    alpha = _check_probability("alpha", alpha)
    rho = _check_probability("rho", rho)
    n = int(n)
    guess = stats.binom.isf(rho, n, alpha)
    w = int(min(max(guess, 0), n)) if math.isfinite(guess) else n
    # isf works in floating point: step to the exact smallest w with sf(w) <= rho.
    while w < n and stats.binom.sf(w, n, alpha) > rho:
        w += 1
    while w > 0 and stats.binom.sf(w - 1, n, alpha) <= rho:
        w -= 1
    return w


def high_probability_certified_accuracy(results: Results, radii: np.ndarray, alpha: float, rho: float, *,
                                        alpha_d: float = 0.0) -> np.ndarray:
    """The dataset-level lower bound ``mean(r) - w / N`` at each radius r (see the module docstring).

    ``mean(r)`` is :func:`approximate_certified_accuracy` and ``w`` is
    :func:`wrong_certificate_bound` ``(N, alpha, rho)``: the smallest integer with
    ``P(Binomial(N, alpha) > w) <= rho``. With probability at least ``1 - rho - alpha_d``
    over the certification randomness, the true certified accuracy at every r in
    ``radii`` is at least the returned value (which may be negative; clip at 0 to show it).

    Args:
      results: the N certificates.
      radii: radii at which to evaluate.
      alpha: ``alpha_p``, each certificate's failure probability given the radius table, in (0, 1).
      rho: the probability allowed for more than ``w`` wrong certificates, in (0, 1).
      alpha_d: failure probability of the radius table all certificates share, in [0, 1),
        charged once; it does not change the bound, only its confidence ``1 - rho - alpha_d``,
        which must be > 0.

    Raises:
      TypeError, ValueError: an argument out of its range (the message names it); no rows.

    Example:
      >>> import numpy as np
      >>> res = Results(name="demo", idx=np.arange(1000), label=np.zeros(1000, int),
      ...               predict=np.zeros(1000, int), radius=np.full(1000, 0.5), correct=np.ones(1000, int))
      >>> wrong_certificate_bound(1000, 0.001, 0.001)
      5
      >>> high_probability_certified_accuracy(res, np.array([0.25, 1.0]), 0.001, 0.001, alpha_d=0.001)
      array([ 0.995, -0.005])
    """
    alpha = _check_probability("alpha", alpha)
    rho = _check_probability("rho", rho)
    alpha_d = _check_probability("alpha_d", alpha_d, closed_low=True)
    if rho + alpha_d >= 1:
        raise ValueError(f"rho + alpha_d must be < 1 (the confidence is 1 - rho - alpha_d), got {rho} + {alpha_d}")
    mean = approximate_certified_accuracy(results, radii)
    n = len(results)
    return mean - wrong_certificate_bound(n, alpha, rho) / n


def certificate_alphas(results: Results, alpha: float) -> tuple[float, float]:
    """``(alpha_p, alpha_d)`` for the high-probability curve of ``results``.

    The file's own values (from its sidecar) when known; otherwise ``(alpha, 0.0)``,
    i.e. ``alpha`` taken as the per-certificate failure probability and no shared table.
    """
    if results.alpha_p is not None:
        return results.alpha_p, results.alpha_d or 0.0
    return alpha, 0.0


def default_radii(max_radius: float, attack: str = "l2") -> np.ndarray:
    """The radii papers report, up to (at least) ``max_radius``.

    l2: ``0, 0.25, 0.5, ...`` up to ``max(2.0, max_radius)`` (the last grid point at
    or above it); beyond 17 columns the step doubles until they fit. l_inf:
    ``0, 1/255, 2/255, 4/255, 8/255, 16/255, ...`` up to ``max(8/255, max_radius)``
    (at most 17 columns, i.e. up to 2**15 / 255).

    Args:
      max_radius: the largest radius in the files, a finite number >= 0.
      attack: ``"l2"`` or ``"linf"``.

    Example:
      >>> default_radii(1.1, "l2").tolist()
      [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
      >>> [round(r * 255) for r in default_radii(0.05, "linf")]
      [0, 1, 2, 4, 8, 16]
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    if not _is_number(max_radius) or not 0 <= max_radius < math.inf:
        raise ValueError(f"max_radius must be a finite number >= 0, got {max_radius!r}")
    if attack == "l2":
        top, step = max(_L2_MIN_TOP, float(max_radius)), _L2_STEP
        steps = lambda s: math.ceil(top / s - 1e-9)  # noqa: E731 (the slack absorbs float noise in top / s)
        while steps(step) + 1 > _MAX_COLUMNS:
            step *= 2
        return step * np.arange(steps(step) + 1, dtype=np.float64)
    top = max(_LINF_MIN_TOP / 255, float(max_radius))
    ks = [0, 1]
    while ks[-1] / 255 < top and len(ks) < _MAX_COLUMNS:
        ks.append(2 * ks[-1])
    return np.asarray(ks, dtype=np.float64) / 255


def radius_label(radius: float, attack: str | None = None) -> str:
    """``"k/255"`` for an l_inf radius that is a multiple of 1/255, else ``f"{radius:g}"``.

    Example:
      >>> radius_label(4 / 255, "linf"), radius_label(0.25, "l2")
      ('4/255', '0.25')
    """
    k = radius * 255
    if attack == "linf" and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{radius:g}"


def format_table(results: Sequence[Results], radii: Sequence[float], *, alpha: float | None = None,
                 rho: float = 0.001, unit: str = "", labels: Sequence[str] | None = None) -> str:
    """A plain-text table of certified accuracy (%) per file at each radius.

    With ``alpha`` given, each cell also shows the high-probability variant in brackets
    (:func:`high_probability_certified_accuracy`, clipped at 0), computed with each file's
    own ``alpha_p`` / ``alpha_d`` when its sidecar records them, else with ``alpha`` as
    ``alpha_p`` and ``alpha_d = 0`` (see :func:`certificate_alphas`). Row names are printed
    whole; the first column is as wide as the longest.

    Args:
      results: one row each.
      radii: the columns.
      alpha: fallback per-certificate failure probability; None: no high-probability values.
      rho: see :func:`high_probability_certified_accuracy`.
      unit: appended to the first column's title, e.g. ``" (l2)"``.
      labels: column titles (default: the radii, ``{:g}``).
    """
    radii = np.asarray(radii, dtype=np.float64)
    if labels is None:
        labels = [f"{r:g}" for r in radii]
    if len(labels) != radii.size:
        raise ValueError(f"labels must have one entry per radius ({radii.size}), got {len(labels)}")
    cell = max([13] + [len(label) for label in labels])
    width = max([len(r.name) for r in results] + [len("radius" + unit)])
    head = f"{'radius' + unit:<{width}}  " + "  ".join(f"{label:>{cell}}" for label in labels)
    lines = [head, "-" * len(head)]
    for res in results:
        approx = approximate_certified_accuracy(res, radii)
        if alpha is None:
            cells = [f"{f'{100 * a:.1f}%':>{cell}}" for a in approx]
        else:
            alpha_p, alpha_d = certificate_alphas(res, alpha)
            high = high_probability_certified_accuracy(res, radii, alpha_p, rho, alpha_d=alpha_d)
            cells = [f"{f'{100 * a:5.1f} [{100 * max(h, 0.0):5.1f}]':>{cell}}" for a, h in zip(approx, high)]
        lines.append(f"{res.name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def plot_certified_accuracy(results: Sequence[Results] | Mapping[str, Results], path: str | os.PathLike, *,
                            max_radius: float | None = None, alpha: float | None = None, rho: float = 0.001,
                            title: str = "", xlabel: str = "radius", radii: np.ndarray | None = None
                            ) -> pathlib.Path:
    """Writes a PNG of certified accuracy against radius (one solid line per file;
    dashed: the high-probability variant when ``alpha`` is given, with each file's own
    alphas when known, as in :func:`format_table`).

    ``radii``: evaluate only there, with markers (a sequential run decides its target
    radii only); default: a fine grid up to ``max_radius``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    top = max_radius if max_radius is not None else max(float(np.max(r.radius)) for r in items) * 1.05 or 1.0
    style = "-" if radii is None else "o-"
    radii = np.linspace(0, top, 400) if radii is None else np.asarray(radii, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    for res in items:
        (line,) = ax.plot(radii, approximate_certified_accuracy(res, radii), style, label=res.name)
        if alpha is not None:
            alpha_p, alpha_d = certificate_alphas(res, alpha)
            high = high_probability_certified_accuracy(res, radii, alpha_p, rho, alpha_d=alpha_d)
            ax.plot(radii, np.maximum(high, 0), "--", color=line.get_color(), linewidth=1)
    ax.set_xlim(0, top)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("certified accuracy")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
