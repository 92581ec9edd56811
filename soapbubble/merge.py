"""Many processes, one certification run: how the rows are split, and the merge of the parts.

``soapbubble certify`` run as process ``p`` of ``P`` (under ``jax.distributed``, or with
``--process-index p --process-count P``) certifies the rows it would certify alone
(``idx % skip == 0`` and ``idx < stop``, ``stop = min(dataset size, --max)``) whose *position*
in that selection, ``idx // skip``, is ``p`` modulo ``P``:

    process p certifies idx = p*skip, (p + P)*skip, (p + 2P)*skip, ... (all < stop)

Every row keeps its own key (``fold_in(key, idx)``; ``row_ids = idx`` on the sequential
route), so a row's result does not depend on the split. With ``P > 1`` process ``p`` writes
``<out>.part-<p>-of-<P><suffix>`` (:func:`part_path`, e.g. ``out.tsv`` ->
``out.part-00003-of-00008.tsv``), resumable as any certify output, whose sidecar holds the
single-process parameters plus one entry ``shard = {process_index, process_count, skip, stop}``.

:func:`merge` joins the parts into one TSV sorted by ``idx``, identical (the ``time`` column
aside) to what a single process writes, with the single-process sidecar (``shard`` removed).
It refuses parts of different runs, a missing or repeated process, missing, duplicated or
foreign rows and different column headers, each with a one-line message naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

from soapbubble import runner

__all__ = ["SHARD_KEY", "MergeResult", "merge", "part_path", "shard_indices", "shard_parameters"]

#: The sidecar parameter that marks a part of a multi-process run (removed by :func:`merge`).
SHARD_KEY = "shard"


def part_path(out: str | os.PathLike, process_index: int, process_count: int) -> pathlib.Path:
    """The output of process ``process_index`` of ``process_count``: ``out.tsv`` -> ``out.part-00003-of-00008.tsv``.

    With one process the path is ``out`` itself. A name without suffix gets the part tag at its end.
    """
    out = pathlib.Path(out)
    if process_count == 1:
        return out
    tag = f".part-{process_index:05d}-of-{process_count:05d}"
    return out.with_name(f"{out.stem}{tag}{out.suffix}" if out.suffix else f"{out.name}{tag}")


def shard_indices(stop: int, skip: int, process_index: int, process_count: int) -> range:
    """The ``idx`` that process ``process_index`` of ``process_count`` certifies, in increasing order."""
    return range(process_index * skip, stop, skip * process_count)


def shard_parameters(process_index: int, process_count: int, skip: int, stop: int) -> dict[str, int]:
    """The sidecar's ``shard`` entry of one part."""
    return {"process_index": process_index, "process_count": process_count, "skip": skip, "stop": stop}


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """What :func:`merge` wrote: the TSV, its row count and the number of parts."""

    path: pathlib.Path
    rows: int
    parts: int


def _read_part(path: pathlib.Path) -> tuple[dict, str, list[list[str]]]:
    """``(sidecar parameters, header line, complete rows)`` of one part."""
    name = os.fspath(path)
    side = runner.sidecar_path(path)
    if not path.is_file():
        raise ValueError(f"part {name!r} does not exist")
    if not side.is_file():
        raise ValueError(f"part {name!r} has no sidecar {side.name} (merge needs the sidecar certify writes)")
    try:
        parameters = json.loads(side.read_text())["parameters"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"sidecar {os.fspath(side)!r} is not a soapbubble sidecar ({type(e).__name__})") from None
    shard = parameters.get(SHARD_KEY) if isinstance(parameters, dict) else None
    want = set(shard_parameters(0, 1, 1, 0))
    if not isinstance(shard, dict) or set(shard) != want:
        raise ValueError(
            f"{name!r} is not a part of a multi-process run (its sidecar has no {SHARD_KEY!r} entry with "
            f"{', '.join(sorted(want))}); parts are written by soapbubble certify with --process-count > 1 "
            "or under jax.distributed")
    rows = runner.completed_rows(path)
    with open(path) as f:
        head = f.readline().rstrip("\n")
    return parameters, head, rows


def _differing(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k, KeyError) != b.get(k, KeyError))


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


def _list(values: Sequence[int], most: int = 6) -> str:
    shown = ", ".join(map(str, values[:most]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > most else "")


def merge(out: str | os.PathLike, parts: Sequence[str | os.PathLike]) -> MergeResult:
    """Joins the parts of one multi-process certify run into ``out`` (and its sidecar).

    Args:
      out: the merged TSV. If it exists it must hold the same run (equal sidecar
        parameters): it is then rewritten, so a merge can be repeated.
      parts: every process's TSV, in any order, one per process.

    Returns:
      A :class:`MergeResult`.

    Raises:
      ValueError: parts of different runs (names the differing parameter), a
        process with no part or with two, a row missing, duplicated or not
        belonging to its process, different column headers, or ``out`` holding
        another run. The message names the file.
    """
    out = pathlib.Path(out)
    paths = [pathlib.Path(p) for p in parts]
    if not paths:
        raise ValueError("merge needs at least one part")
    for p in paths:
        if p.resolve() == out.resolve():
            raise ValueError(f"the merged output {os.fspath(out)!r} is also given as a part; name another output")
    read = [_read_part(p) for p in paths]

    first, (params0, head0, _) = paths[0], read[0]
    common = {k: v for k, v in params0.items() if k != SHARD_KEY}
    shard0 = params0[SHARD_KEY]
    count, skip, stop = shard0["process_count"], shard0["skip"], shard0["stop"]
    owner: dict[int, pathlib.Path] = {}
    for path, (params, head, _) in zip(paths, read):
        other = {k: v for k, v in params.items() if k != SHARD_KEY}
        changed = _differing(common, other)
        if changed:
            key = changed[0]
            raise ValueError(
                f"parts of different runs: {os.fspath(path)!r} differs from {os.fspath(first)!r} in parameter "
                f"{key!r} ({_short(other.get(key))} vs {_short(common.get(key))})"
                + (f" and {len(changed) - 1} more" if len(changed) > 1 else ""))
        shard = params[SHARD_KEY]
        for key in ("process_count", "skip", "stop"):
            if shard[key] != shard0[key]:
                raise ValueError(
                    f"parts of different runs: {os.fspath(path)!r} has {SHARD_KEY}.{key} = {shard[key]}, "
                    f"{os.fspath(first)!r} has {shard0[key]}")
        index = shard["process_index"]
        if not (isinstance(index, int) and 0 <= index < count):
            raise ValueError(f"{os.fspath(path)!r}: process_index must be in [0, {count}), got {index!r}")
        if index in owner:
            raise ValueError(f"{os.fspath(owner[index])!r} and {os.fspath(path)!r} are both process {index} of "
                             f"{count}; give one part per process")
        owner[index] = path
        if head != head0:
            raise ValueError(f"different column headers: {os.fspath(path)!r} has {head!r}, "
                             f"{os.fspath(first)!r} has {head0!r}")
    missing = [p for p in range(count) if p not in owner]
    if missing:
        example = os.fspath(part_path(out, missing[0], count))
        raise ValueError(f"missing part{'s' if len(missing) > 1 else ''}: process {_list(missing)} of {count} "
                         f"(a file like {example!r}); give all {count} parts")

    merged: list[list[str]] = []
    for path, (params, _, rows) in zip(paths, read):
        index = params[SHARD_KEY]["process_index"]
        expected = shard_indices(stop, skip, index, count)
        where = f"{os.fspath(path)!r} (process {index} of {count})"
        seen: set[int] = set()
        for row in rows:
            try:
                idx = int(row[0])
            except ValueError:
                raise ValueError(f"{where}: idx {row[0]!r} is not an integer") from None
            if idx in seen:
                raise ValueError(f"{where}: duplicated rows, idx {idx} appears more than once")
            if idx not in expected:
                raise ValueError(f"{where} has idx {idx}, which this process does not certify "
                                 f"(skip {skip}, stop {stop}: idx = {index * skip} + k * {skip * count})")
            seen.add(idx)
        lacking = [i for i in expected if i not in seen]
        if lacking:
            raise ValueError(f"{where} lacks {len(lacking)} row{'s' if len(lacking) > 1 else ''} "
                             f"(idx {_list(lacking)}); rerun that process's certify command to finish it")
        merged.extend(rows)
    merged.sort(key=lambda row: int(row[0]))

    side = runner.sidecar_path(out)
    if out.exists():
        previous = None
        try:
            previous = json.loads(side.read_text())["parameters"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if previous != common:
            why = ("has no readable sidecar" if previous is None
                   else f"holds another run (parameter {_differing(previous, common)[0]!r} differs)")
            raise ValueError(f"the merged output {os.fspath(out)!r} exists and {why}; use another path or remove it")
    text = head0 + "\n" + "".join("\t".join(row) + "\n" for row in merged)
    meta = {"parameters": common, "merged_from": [os.fspath(owner[p]) for p in range(count)]}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(side, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _write_atomic(out, text)
    except OSError as e:
        raise OSError(f"cannot write the merged output {os.fspath(out)!r}: {e.strerror}") from e
    return MergeResult(path=out, rows=len(merged), parts=count)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
