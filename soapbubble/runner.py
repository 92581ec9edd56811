"""The dataset runner: certify every row of a dataset into a TSV that never loses a row.

Output, as Cohen et al.'s ``certify.py``: a TSV with the header
``idx label predict radius correct time`` (radius rounded *down* to 6 decimals,
time as ``H:MM:SS.ffffff``), plus a JSON sidecar ``<out>.json`` holding every
parameter, the key, the radius table's identity and the library version.

Each row is flushed (and fsync'ed) as soon as it is certified. The key of row
``idx`` is ``fold_in(key, idx)``, so a row's result does not depend on which
rows ran before it. After an interruption the same command resumes after the
last complete row: a partial last line is dropped, no row is duplicated or lost.
A run whose sidecar differs from the command's parameters is refused rather
than mixed into the same file.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import json
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

__all__ = ["HEADER", "RunResult", "format_radius", "completed_rows", "header", "run_dataset", "sidecar_path"]

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a run did.

    Attributes:
      path: the TSV file.
      written: rows certified by this call.
      resumed_after: the last idx already in the file when the call started (None if new).
    """

    path: pathlib.Path
    written: int
    resumed_after: int | None


def format_radius(radius: float) -> str:
    """The radius rounded down (never up) to 6 decimals, exactly (decimal arithmetic)."""
    value = decimal.Decimal(float(radius)).quantize(decimal.Decimal("0.000001"), rounding=decimal.ROUND_FLOOR)
    return f"{value:.6f}"


def sidecar_path(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    return path.with_name(path.name + ".json")


def header(columns: tuple[str, ...] = ()) -> str:
    """The TSV header: Cohen et al.'s columns, then ``columns`` (e.g. ``n_used``, one per target radius)."""
    return "\t".join((HEADER, *columns))


def completed_rows(path: str | os.PathLike, columns: tuple[str, ...] | None = None) -> list[list[str]]:
    """Complete data rows of a TSV (a trailing line without newline is incomplete).

    Args:
      path: the TSV.
      columns: the extra columns it must have after Cohen et al.'s (None: any).
    """
    text = pathlib.Path(path).read_text()
    lines = text.split("\n")
    complete = lines[:-1]  # the piece after the last newline is partial (or empty)
    want = None if columns is None else header(tuple(columns))
    if not complete or not complete[0].startswith(HEADER) or (want is not None and complete[0] != want):
        raise ValueError(
            f"{os.fspath(path)!r} is not a soapbubble certification TSV (header {want or HEADER!r} expected)")
    fields = len(complete[0].split("\t"))
    rows = [line.split("\t") for line in complete[1:]]
    for line_no, row in enumerate(rows, start=2):
        if len(row) != fields:
            raise ValueError(f"{os.fspath(path)!r} line {line_no} has {len(row)} fields, expected {fields}")
    return rows


def _prepare_output(path: pathlib.Path, parameters: Mapping[str, Any], columns: tuple[str, ...]) -> int | None:
    """Creates the files, or checks them for a resume. Returns the last complete idx."""
    side = sidecar_path(path)
    if path.exists():
        if not side.exists():
            raise ValueError(f"{os.fspath(path)!r} exists without its sidecar {side.name}; refusing to append to it")
        previous = json.loads(side.read_text())
        if previous.get("parameters") != json.loads(json.dumps(dict(parameters))):
            changed = sorted(
                key
                for key in set(previous.get("parameters", {})) | set(parameters)
                if previous.get("parameters", {}).get(key) != json.loads(json.dumps(parameters.get(key)))
            )
            raise ValueError(
                f"{os.fspath(path)!r} was written with other parameters ({', '.join(changed)}); "
                "use another output path or remove the file"
            )
        rows = completed_rows(path, columns)
        # Drop a partial trailing line so appended rows start on a fresh line.
        keep = (header(columns) + "\n" + "".join("\t".join(r) + "\n" for r in rows)).encode()
        with open(path, "r+b") as f:
            f.truncate(len(keep))
        return int(rows[-1][0]) if rows else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write(header(columns) + "\n")
    except OSError as e:
        raise OSError(f"cannot write the output file {os.fspath(path)!r}: {e.strerror}") from e
    side.write_text(json.dumps({"parameters": dict(parameters)}, indent=2, sort_keys=True) + "\n")
    return None


def run_dataset(
    rows: Iterable[tuple[int, Any, int]],
    certify_row: Callable[[int, Any], Any],
    out_path: str | os.PathLike | Mapping[str, str | os.PathLike],
    parameters: Mapping[str, Any],
    *,
    skip: int = 1,
    max_index: int | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
    columns: tuple[str, ...] = (),
    group: int = 1,
    load: Callable[[int], tuple[Any, int]] | None = None,
) -> RunResult:
    """Certifies ``rows`` into ``out_path``, resuming after the last complete row.

    Args:
      rows: ``(idx, x, label)`` in increasing ``idx``; with ``load``, the ``idx`` alone.
      certify_row: ``(idx, x) -> (prediction, radius)``, prediction -1 for abstain.
        It derives its randomness from ``idx`` (e.g. ``fold_in(key, idx)``). With
        several outputs it returns ``{name: (prediction, radius)}``.
      out_path: the TSV (its sidecar is ``<out_path>.json``), or a mapping
        ``name -> path`` to write several TSVs in lockstep from one certification
        per row (e.g. the l2 and l_inf radii of the same counts). Each file
        resumes on its own; a row is certified while any file still lacks it.
      parameters: everything that defines the run (written to the sidecar; a
        resume must match it exactly; with several outputs the sidecar of
        ``name`` also records ``output = name``). JSON-serialisable.
      skip: certify every ``skip``-th row (``idx % skip == 0``), as Cohen et al.
      max_index: stop before the row with this ``idx`` (Cohen et al.'s ``--max``).
      progress: optional wrapper of the row iterator (e.g. tqdm).
      columns: extra columns after Cohen et al.'s; ``certify_row`` then returns
        ``(prediction, radius, *values)`` with one string per column.
      group: rows per call: with ``group > 1``, ``certify_row`` receives a list
        of idx and a list of inputs and returns a list of results (one compiled
        call for many small inputs); each row's time is the group's time over
        its rows. Rows are still written, flushed and resumed one by one.
      load: ``idx -> (x, label)``, called only for the rows certified: skipped
        rows, rows past ``max_index`` and rows a resumed file already has are
        never loaded (decoding a test set's images is not free).

    Returns:
      A :class:`RunResult` (for several outputs: the first one's path, rows
      certified, and the earliest resume point).
    """
    if skip < 1:
        raise ValueError(f"skip must be >= 1, got {skip}")
    single = not isinstance(out_path, Mapping)
    paths = {None: pathlib.Path(out_path)} if single else {k: pathlib.Path(v) for k, v in out_path.items()}
    if not paths:
        raise ValueError("out_path must name at least one output file")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    columns = tuple(columns)
    lasts = {
        name: _prepare_output(path, parameters if single else {**parameters, "output": name}, columns)
        for name, path in paths.items()
    }
    done = [-1 if last is None else last for last in lasts.values()]
    first_needed = min(done)
    written = 0

    def selected():
        for item in rows:
            idx = item if load is not None else item[0]
            if max_index is not None and idx >= max_index:
                return
            if idx % skip != 0 or idx <= first_needed:
                continue
            yield (idx, *load(idx)) if load is not None else item

    iterator = selected()
    if progress is not None:
        iterator = progress(iterator)
    files = {name: open(path, "a") for name, path in paths.items()}
    try:
        for batch in _groups(iterator, group):
            start = time.perf_counter()
            if group == 1:
                batch_results = [certify_row(batch[0][0], batch[0][1])]
            else:
                batch_results = list(certify_row([b[0] for b in batch], [b[1] for b in batch]))
            elapsed = datetime.timedelta(seconds=(time.perf_counter() - start) / len(batch))
            for (idx, _, label), result in zip(batch, batch_results):
                results = {None: result} if single else result
                for name, f in files.items():
                    last = lasts[name]
                    if last is not None and idx <= last:
                        continue  # this file already has the row
                    prediction, radius, *extra = results[name]
                    if len(extra) != len(columns):
                        raise ValueError(f"certify_row returned {len(extra)} extra values for columns {columns}")
                    prediction = int(prediction)
                    radius = float(radius) if prediction >= 0 else 0.0
                    correct = int(prediction == int(label))
                    cells = [str(idx), str(int(label)), str(prediction), format_radius(radius), str(correct),
                             str(elapsed), *map(str, extra)]
                    f.write("\t".join(cells) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                written += 1
    finally:
        for f in files.values():
            f.close()
    resumed = [last for last in lasts.values()]
    return RunResult(
        path=next(iter(paths.values())),
        written=written,
        resumed_after=None if all(r is None for r in resumed) else min(-1 if r is None else r for r in resumed),
    )


def _groups(iterator: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in iterator:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
