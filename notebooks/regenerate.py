"""Re-runs the notebooks at full size and writes their outputs into the committed .ipynb files.

Usage, from the repository root in the project's environment (``pip install -e ".[test]"``)::

    python notebooks/regenerate.py                       # 01 to 04 (04 alone takes ~12 min)
    python notebooks/regenerate.py 02_pareto_frontier    # only the ones named (".ipynb" optional)
    python notebooks/regenerate.py --stamp 04_training_families   # no run: see below

Each notebook is executed in place with nbclient (kernel ``python3``, no per-cell timeout limit
worth the name), without ``SOAPBUBBLE_NOTEBOOK_SMALL`` / ``SOAPBUBBLE_NOTEBOOK_OUT`` and with
matplotlib's inline backend, so the figures are stored as image/png outputs. The notebook's metadata
then records what produced those outputs::

    metadata["soapbubble"] = {"code_sha256": ..., "small": False, "soapbubble_version": ...}

``code_sha256`` is :func:`code_hash` of the code cells; ``tests/test_notebooks.py`` recomputes it
from the committed cells, so editing a notebook's code without re-running this script fails CI.

``--stamp`` writes the metadata without executing: only for a notebook whose committed outputs
already are a full-size run of its current code (checked as far as possible: outputs present, no
errors, the first cell printed ``small=False``). Markdown cells do not enter the hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import time

NOTEBOOKS = pathlib.Path(__file__).resolve().parent
ALL = ("01_radial_laws", "02_pareto_frontier", "03_radius_curves", "04_training_families")
TIMEOUT_S = 4 * 3600  # per cell; 04's longest cell takes ~10 min on a 2-core CPU


def code_hash(nb) -> str:
    """SHA-256 of the notebook's code cells' sources, in order (JSON list of strings, UTF-8)."""
    sources = [c.source for c in nb.cells if c.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources, ensure_ascii=False).encode("utf-8")).hexdigest()


def _stamp(nb) -> None:
    import soapbubble

    nb.metadata["soapbubble"] = {
        "code_sha256": code_hash(nb),
        "small": False,
        "soapbubble_version": soapbubble.__version__,
    }


def _resolve(name: str) -> pathlib.Path:
    stem = pathlib.Path(name).name.removesuffix(".ipynb")
    path = NOTEBOOKS / f"{stem}.ipynb"
    if not path.is_file():
        raise SystemExit(f"no notebook {path}")
    return path


def _check_full_size_outputs(nb, path: pathlib.Path) -> None:
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.outputs]
    first = "".join(o.get("text", "") for o in code[0].outputs if o.output_type == "stream")
    problems = []
    if any(c.execution_count is None for c in code):
        problems.append("a code cell was never executed")
    if any(o.output_type == "error" for o in outputs):
        problems.append("an error output")
    if not first.startswith("small=False"):
        problems.append("the first cell did not print small=False")
    if problems:
        raise SystemExit(f"{path.name}: cannot --stamp ({'; '.join(problems)}); run it instead")


def run(path: pathlib.Path) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_backup = {
        v: os.environ.pop(v, None)
        for v in ("SOAPBUBBLE_NOTEBOOK_SMALL", "SOAPBUBBLE_NOTEBOOK_OUT", "MPLBACKEND")
    }
    start = time.perf_counter()
    try:
        NotebookClient(
            nb,
            kernel_name="python3",
            timeout=TIMEOUT_S,
            record_timing=False,  # no per-cell timestamps: re-runs differ only in what they compute
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        ).execute()
    finally:
        for var, value in env_backup.items():
            if value is not None:
                os.environ[var] = value
    elapsed = time.perf_counter() - start
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    if errors:  # nbclient raises first; kept as a guard (allow_errors is off)
        raise SystemExit(f"{path.name}: error outputs, not written")
    _stamp(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", help=f"notebooks to run (default: all of {', '.join(ALL)})"
    )
    parser.add_argument(
        "--stamp",
        action="store_true",
        help="record the code hash without executing (outputs must already be a "
        "full-size run of the current code)",
    )
    args = parser.parse_args(argv)
    paths = [_resolve(n) for n in (args.names or ALL)]
    for path in paths:
        if args.stamp:
            import nbformat

            nb = nbformat.read(path, as_version=4)
            _check_full_size_outputs(nb, path)
            _stamp(nb)
            nbformat.write(nb, path)
            print(
                f"{path.name}: stamped {nb.metadata['soapbubble']['code_sha256'][:12]}", flush=True
            )
        else:
            print(f"{path.name}: running at full size ...", flush=True)
            elapsed = run(path)
            print(f"{path.name}: done in {elapsed:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
