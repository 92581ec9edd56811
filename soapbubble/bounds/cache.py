"""The on-disk cache of default radius tables, keyed by everything a table depends on.

A table's file name is a hash of its identity (family, sigma, k, d, attack,
route, n_samples, alpha_d), its radius grid, the table format
(:data:`~soapbubble.bounds.table.FORMAT_VERSION`) and the soapbubble version, so
a table built by another release or for other parameters is never reused
silently: it is simply not found, and a file that is found but does not match
is rebuilt with a warning. Files are written to a temporary name and renamed,
so a concurrent reader never sees half a file.

Example:
  >>> import tempfile
  >>> from soapbubble import noise
  >>> t = cached_radius_table(noise.Gaussian(0.5), 16, "l2", table_dir=tempfile.mkdtemp())
  >>> t.metadata["route"]
  'closed_form'
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import tempfile
import warnings
from typing import Any

import jax
import numpy as np

from soapbubble.bounds import table as table_lib
from soapbubble.bounds.rules import worst_case

__all__ = ["cached_radius_table", "check_table", "default_table_dir", "table_identity", "TABLE_SEED",
           "TABLE_SAMPLES"]

#: Seed of the key that builds Monte Carlo radius tables cached on disk.
TABLE_SEED = 0
#: Monte Carlo samples of a default Monte Carlo (MixedLinf) table.
TABLE_SAMPLES = 1_000_000


def default_table_dir() -> pathlib.Path:
    """``$SOAPBUBBLE_CACHE/tables`` if ``SOAPBUBBLE_CACHE`` is set, else ``~/.cache/soapbubble/tables``."""
    root = os.environ.get("SOAPBUBBLE_CACHE")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "soapbubble"
    return base / "tables"


def table_identity(family, d: int, attack: str, alpha_d: float, n_samples: int) -> dict[str, Any]:
    """The parameters that define the default table of ``(family, d, attack)``."""
    rule = worst_case(family, attack)
    desc = family.describe()
    if not rule.monte_carlo:
        n_samples, alpha_d = 0, 0.0
    return {
        "family": desc["family"],
        "sigma": float(desc["sigma"]),
        "k": float(desc["k"]),
        "d": int(d),
        "attack": attack,
        "route": rule.route,
        "n_samples": int(n_samples),
        "alpha_d": float(alpha_d),
    }


def cached_radius_table(
    family,
    d: int,
    attack: str,
    *,
    alpha_d: float = 5e-4,
    n_samples: int = TABLE_SAMPLES,
    table_dir: str | os.PathLike | None = None,
    bilateral: bool = False,
    progress: bool | None = None,
) -> table_lib.RadiusTable:
    """The default radius table of ``(family, d, attack)``, built once and cached on disk.

    Monte Carlo tables are built with the fixed key ``jax.random.key(TABLE_SEED)``:
    the table's own failure probability ``alpha_d`` is over that draw,
    independent of any certification's samples.

    Args:
      family: Gaussian, L2Family or MixedLinf.
      d: input dimension.
      attack: "l2" or "linf".
      alpha_d: failure probability of a Monte Carlo table, in (0, 1) (unused, and
        recorded as 0, on the exact routes).
      n_samples: Monte Carlo samples (Monte Carlo route only).
      table_dir: directory of the cache (default :func:`default_table_dir`).
      bilateral: also keep the bilateral ``V_r`` grid (:mod:`~soapbubble.bounds.table`);
        a file of its own (``-bilateral-`` in the name, the hash also covers
        :data:`~soapbubble.bounds.table.BILATERAL_SETTINGS`), with the same ``p_min``.
      progress: a progress bar with the time left while a Monte Carlo table is
        built (:func:`~soapbubble.bounds.table.radius_table`): ``None`` (default)
        shows it when stderr is a terminal; the table is the same either way.

    Returns:
      The :class:`~soapbubble.bounds.table.RadiusTable`.
    """
    import soapbubble

    rule = worst_case(family, attack)
    d = family.check_dimension(d)
    if rule.monte_carlo and not 0.0 < float(alpha_d) < 1.0:
        raise ValueError(f"alpha_d must be in (0, 1) for a Monte Carlo table, got {alpha_d!r}")
    identity = table_identity(family, d, attack, alpha_d, n_samples)
    radii = table_lib.default_radii(family, d, attack)
    bilateral = bool(bilateral)
    key_parts = {**identity, "radii": radii.tolist(), "format": table_lib.FORMAT_VERSION,
                 "soapbubble": soapbubble.__version__}
    if bilateral:
        key_parts["bilateral"] = table_lib.BILATERAL_SETTINGS
    digest = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    folder = pathlib.Path(table_dir) if table_dir is not None else default_table_dir()
    kind = "-bilateral" if bilateral else ""
    path = folder / f"{identity['family']}-d{d}-{attack}{kind}-{digest}.npz"
    if path.exists():
        try:
            table = table_lib.RadiusTable.load(
                path, expected={**identity, "soapbubble_version": soapbubble.__version__})
            if np.array_equal(table.radii, radii) and (table.bilateral or not bilateral):
                return table
            raise ValueError(f"radius table {str(path)!r} has another radius grid or no V grid")
        except ValueError as e:
            warnings.warn(f"rebuilding a stale radius table: {e}", stacklevel=3)
    if rule.monte_carlo:
        table = table_lib.radius_table(jax.random.key(TABLE_SEED), family, d, attack, radii=radii,
                                       n_samples=int(n_samples), alpha_d=float(alpha_d), bilateral=bilateral,
                                       progress=progress)
    else:
        table = table_lib.radius_table(None, family, d, attack, radii=radii, bilateral=bilateral)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    os.close(fd)
    try:
        table.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return table


def _same(have: Any, want: Any) -> bool:
    """Equal, with floats compared to 1e-12 relative (as RadiusTable.load does)."""
    if isinstance(want, float) and isinstance(have, (int, float)) and not isinstance(have, bool):
        return math.isclose(float(have), want, rel_tol=1e-12, abs_tol=0.0)
    return have == want


def check_table(table: Any, family, d: int, attack: str) -> table_lib.RadiusTable:
    """Refuses a table built for another (family, sigma, k, d, attack) or by another route."""
    if not isinstance(table, table_lib.RadiusTable):
        raise TypeError(f"table must be a soapbubble RadiusTable, got {type(table).__name__}")
    desc = family.describe()
    want = {"family": desc["family"], "sigma": float(desc["sigma"]), "k": float(desc["k"]),
            "d": d, "attack": attack}
    for name, value in want.items():
        have = table.metadata.get(name)
        if not _same(have, value):
            raise ValueError(
                f"table was built for {name}={have!r} but this certification has {name}={value!r}"
            )
    return table
