"""Certified-accuracy curves from certification TSVs (soapbubble's or Cohen et al.'s).

Two curves, as in Cohen et al.'s ``analyze.py``:

* approximate certified accuracy at radius r: the share of rows that are
  correct with a certified radius >= r;
* Cohen et al.'s high-probability dataset-level variant: with probability
  ``1 - rho`` over the certification randomness (each certificate wrong with
  probability at most ``alpha``), the smoothed classifier's true certified
  accuracy on the dataset is at least
  ``mean - alpha - sqrt(alpha (1 - alpha) log(1/rho) / N) - log(1/rho) / (3 N)``
  (Bernstein's inequality on the number of wrong certificates).

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
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "Results",
    "read_results",
    "approximate_certified_accuracy",
    "high_probability_certified_accuracy",
    "format_table",
    "plot_certified_accuracy",
]

_COLUMNS = ("idx", "label", "predict", "radius", "correct")


@dataclasses.dataclass(frozen=True)
class Results:
    """The rows of one certification TSV (arrays of equal length N)."""

    name: str
    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray

    def __len__(self) -> int:
        return int(self.idx.size)


def read_results(path: str | os.PathLike, name: str | None = None) -> Results:
    """Reads a TSV with the columns ``idx label predict radius correct [time]``.

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: if the header or a row is malformed (the message names the line).
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
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)!r} line {line_no} is malformed ({e}): {line!r}") from None
    arrays = {c: np.asarray(v, dtype=np.float64 if c == "radius" else np.int64) for c, v in cols.items()}
    return Results(name=name or path.stem, **arrays)


def approximate_certified_accuracy(results: Results, radii: np.ndarray) -> np.ndarray:
    """Share of rows certified correct at radius >= r, for each r in ``radii``."""
    if len(results) == 0:
        raise ValueError(f"{results.name}: no rows to analyze")
    ok = results.correct.astype(bool)
    return np.array([np.mean(ok & (results.radius >= r)) for r in np.asarray(radii, dtype=np.float64)])


def high_probability_certified_accuracy(results: Results, radii: np.ndarray, alpha: float, rho: float) -> np.ndarray:
    """Cohen et al.'s dataset-level lower bound (probability ``1 - rho``); see the module docstring."""
    for name, value in (("alpha", alpha), ("rho", rho)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    n = len(results)
    mean = approximate_certified_accuracy(results, radii)
    log_term = math.log(1 / rho)
    return mean - alpha - math.sqrt(alpha * (1 - alpha) * log_term / n) - log_term / (3 * n)


def format_table(results: Sequence[Results], radii: Sequence[float], *, alpha: float | None = None,
                 rho: float = 0.001, unit: str = "") -> str:
    """A plain-text table of certified accuracy (%) per file at each radius.

    With ``alpha`` given, each cell also shows the high-probability variant in brackets.
    """
    radii = np.asarray(radii, dtype=np.float64)
    width = max([len(r.name) for r in results] + [len("radius" + unit)])
    head = f"{'radius' + unit:<{width}}  " + "  ".join(f"{r:>13g}" for r in radii)
    lines = [head, "-" * len(head)]
    for res in results:
        approx = approximate_certified_accuracy(res, radii)
        if alpha is None:
            cells = [f"{100 * a:>12.1f}%" for a in approx]
        else:
            high = high_probability_certified_accuracy(res, radii, alpha, rho)
            cells = [f"{100 * a:>5.1f} [{100 * max(h, 0.0):>5.1f}]" for a, h in zip(approx, high)]
        lines.append(f"{res.name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def plot_certified_accuracy(results: Sequence[Results] | Mapping[str, Results], path: str | os.PathLike, *,
                            max_radius: float | None = None, alpha: float | None = None, rho: float = 0.001,
                            title: str = "", xlabel: str = "radius") -> pathlib.Path:
    """Writes a PNG of certified accuracy against radius (one solid line per file;
    dashed: the high-probability variant when ``alpha`` is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    top = max_radius if max_radius is not None else max(float(np.max(r.radius)) for r in items) * 1.05 or 1.0
    radii = np.linspace(0, top, 400)
    fig, ax = plt.subplots(figsize=(6, 4))
    for res in items:
        (line,) = ax.plot(radii, approximate_certified_accuracy(res, radii), label=res.name)
        if alpha is not None:
            high = high_probability_certified_accuracy(res, radii, alpha, rho)
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
