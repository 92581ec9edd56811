"""Many processes, one certify job: jax.distributed on localhost, the --process-index split,
and `soapbubble merge` (equal to one process, time column aside; refusals)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from soapbubble import cli, merge, runner

ARGS = ["certify", "--dataset", "digits", "--sigma", "0.25", "--n", "500", "--n0", "50", "--batch", "100",
        "--max", "8", "--quiet"]
SEQUENTIAL = ["--radii", "0.1,0.25", "--skip", "2", "--max", "15", "--group", "2"]  # idx 0, 2, ..., 14


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache whose default model is an *untrained* small CNN, saved where certify looks for it.

    Training the real one costs ~20 s; an untrained one has p_A far from 1 on most rows, so
    every radius depends on the row's noise: a row certified with another key would differ.
    """
    import jax
    import jax.numpy as jnp

    from soapbubble.models import io, registry

    path = tmp_path_factory.mktemp("cache")
    variables = registry.build("small_cnn").init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
    io.save_model(path / "models" / "default" / "model", "small_cnn", {}, variables, dataset="digits")
    old = os.environ.get("SOAPBUBBLE_CACHE")
    os.environ["SOAPBUBBLE_CACHE"] = str(path)
    yield path
    if old is None:
        del os.environ["SOAPBUBBLE_CACHE"]
    else:
        os.environ["SOAPBUBBLE_CACHE"] = old


def _rows(path):
    """Rows without the time column (index 5)."""
    return [row[:5] + row[6:] for row in runner.completed_rows(path)]


def _parameters(path):
    return json.loads(runner.sidecar_path(path).read_text())["parameters"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(cache, tmp_path_factory):
    """One process, fixed-n route."""
    out = tmp_path_factory.mktemp("single") / "one.tsv"
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    radii = {row[3] for row in _rows(out) if row[2] != "-1"}
    assert len(radii) >= 3, "the model must make radii depend on the noise, or the comparisons prove nothing"
    return out


@pytest.fixture(scope="module")
def sequential_parts(cache, tmp_path_factory):
    """The sequential route, alone and as 2 processes by --process-index/--process-count (no coordinator)."""
    folder = tmp_path_factory.mktemp("sequential")
    model = str(cache / "models" / "default" / "model")
    alone = folder / "alone.tsv"
    assert cli.main([*ARGS, *SEQUENTIAL, "--model", model, "--out", str(alone)]) == 0
    out = folder / "seq.tsv"
    for p in (1, 0):
        assert cli.main([*ARGS, *SEQUENTIAL, "--model", model, "--out", str(out),
                         "--process-index", str(p), "--process-count", "2"]) == 0
    parts = [folder / "seq.part-00000-of-00002.tsv", folder / "seq.part-00001-of-00002.tsv"]
    return alone, parts


def test_part_path_and_split():
    assert merge.part_path("out.tsv", 3, 8).name == "out.part-00003-of-00008.tsv"
    assert merge.part_path("dir/run", 0, 2).as_posix() == "dir/run.part-00000-of-00002"
    assert merge.part_path("out.tsv", 0, 1).name == "out.tsv"
    # Positions p, p + P, ... of the selection idx % skip == 0, idx < stop: a partition of it.
    shares = [list(merge.shard_indices(15, 2, p, 3)) for p in range(3)]
    assert shares == [[0, 6, 12], [2, 8, 14], [4, 10]]
    assert sorted(i for share in shares for i in share) == list(range(0, 15, 2))


def test_two_processes_under_jax_distributed_equal_one_process(cache, single, tmp_path):
    out = tmp_path / "dist.tsv"
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SOAPBUBBLE_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-m", "soapbubble.cli", *ARGS, "--out", str(out),
                               "--coordinator", coordinator, "--process-id", str(p), "--process-count", "2"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in range(2)]
    try:
        logs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for p, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, log
        assert f"(process {p} of 2)" in log  # jax.process_index() / jax.process_count() after initialize
    parts = [tmp_path / f"dist.part-0000{p}-of-00002.tsv" for p in range(2)]
    assert [[int(r[0]) for r in runner.completed_rows(part)] for part in parts] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for p, part in enumerate(parts):
        params = _parameters(part)
        assert params.pop("shard") == {"process_index": p, "process_count": 2, "skip": 1, "stop": 8}
        assert params == _parameters(single)
    merged = tmp_path / "merged.tsv"
    assert cli.main(["merge", str(merged), *map(str, parts[::-1])]) == 0
    assert _rows(merged) == _rows(single)
    assert merged.read_text().splitlines()[0] == single.read_text().splitlines()[0]
    assert _parameters(merged) == _parameters(single)
    # A part written under jax.distributed is the part --process-index/--process-count writes:
    # a process lost mid-run can be finished without the coordinator (here: nothing left to do).
    before = parts[1].read_text()
    assert cli.main([*ARGS, "--out", str(out), "--process-index", "1", "--process-count", "2"]) == 0
    assert parts[1].read_text() == before


def test_process_index_split_of_the_sequential_route_equals_one_process(sequential_parts):
    alone, parts = sequential_parts
    assert [[int(r[0]) for r in runner.completed_rows(p)] for p in parts] == [[0, 4, 8, 12], [2, 6, 10, 14]]
    # Not trivial: inputs stop at different sample counts and are certified at different radii.
    assert len({r[5] for r in _rows(alone)}) > 2 and len({tuple(r[2:]) for r in _rows(alone)}) > 2
    merged = parts[0].parent / "merged.tsv"
    result = merge.merge(merged, parts)
    assert (result.rows, result.parts) == (8, 2)
    assert _rows(merged) == _rows(alone)
    assert merged.read_text().splitlines()[0] == alone.read_text().splitlines()[0]
    assert _parameters(merged) == _parameters(alone)
    # A repeated merge into the same output is allowed and gives the same file.
    before = merged.read_text()
    merge.merge(merged, parts)
    assert merged.read_text() == before
    # A part resumes as any certify output: rerunning its command certifies nothing more.
    copy = parts[0].read_text()
    assert cli.main([*ARGS, *SEQUENTIAL, "--model", _parameters(alone)["model"], "--out",
                     str(parts[0].parent / "seq.tsv"), "--process-index", "0", "--process-count", "2"]) == 0
    assert parts[0].read_text() == copy


def _copy(parts, folder):
    folder.mkdir()
    out = []
    for part in parts:
        for path in (part, runner.sidecar_path(part)):
            shutil.copy(path, folder / path.name)
        out.append(folder / part.name)
    return out


def _refused(out, parts, *needles):
    with pytest.raises(ValueError) as info:
        merge.merge(out, parts)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
    assert not out.exists()


def test_merge_refusals(sequential_parts, single, tmp_path, capsys):
    _, parts = sequential_parts
    out = tmp_path / "out.tsv"
    # A process missing.
    _refused(out, parts[:1], "missing part", "process 1 of 2")
    # The same process twice.
    _refused(out, [parts[0], parts[0]], "both process 0 of 2")
    # Another run's part (the fixed-n route has no shard entry).
    _refused(out, [*parts, single], "not a part of a multi-process run")
    # Parts of runs with different parameters: the key is named.
    changed = _copy(parts, tmp_path / "changed")
    meta = json.loads(runner.sidecar_path(changed[1]).read_text())
    meta["parameters"]["max_n"] = 1000
    runner.sidecar_path(changed[1]).write_text(json.dumps(meta))
    _refused(out, changed, "parts of different runs", "'max_n'")
    # Duplicated rows.
    dup = _copy(parts, tmp_path / "dup")
    lines = dup[1].read_text().splitlines(keepends=True)
    dup[1].write_text("".join([lines[0], lines[1], *lines[1:]]))
    _refused(out, dup, "duplicated rows", "idx 2")
    # A row missing (an unfinished process).
    short = _copy(parts, tmp_path / "short")
    short[0].write_text("".join(short[0].read_text().splitlines(keepends=True)[:-1]))
    _refused(out, short, "lacks 1 row", "idx 12")
    # A row of another process.
    foreign = _copy(parts, tmp_path / "foreign")
    foreign[0].write_text(foreign[0].read_text() + foreign[1].read_text().splitlines(keepends=True)[1])
    _refused(out, foreign, "has idx 2", "does not certify")
    # Different column headers.
    header = _copy(parts, tmp_path / "header")
    text = header[1].read_text()
    header[1].write_text(text.replace("certified_0.25", "certified_0.3", 1))
    _refused(out, header, "different column headers")
    # An output holding another run is not overwritten.
    single_copy = _copy([single], tmp_path / "other")[0]
    with pytest.raises(ValueError, match="exists and holds another run"):
        merge.merge(single_copy, parts)
    # The command: one line, exit status 2.
    assert cli.main(["merge", str(out), str(parts[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("soapbubble merge: error: missing part") and "\n" not in err


def test_certify_process_options_errors(cache, tmp_path, capsys):
    out = str(tmp_path / "x.tsv")
    cases = [
        (["--process-index", "2", "--process-count", "2"], "--process-index must be in [0, --process-count)"),
        (["--process-index", "1"], "--process-index and --process-count go together"),
        (["--coordinator", "127.0.0.1:1234", "--process-count", "2"], "--coordinator needs --process-id"),
    ]
    for extra, needle in cases:
        assert cli.main([*ARGS, "--out", out, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    with pytest.raises(SystemExit) as info:
        cli.main([*ARGS, "--out", out, "--coordinator", "127.0.0.1:99999"])
    assert info.value.code == 2 and "--coordinator must be HOST:PORT" in capsys.readouterr().err
    # Several processes must not each train the default model into one cache.
    os.environ["SOAPBUBBLE_CACHE"] = str(tmp_path / "empty-cache")
    try:
        assert cli.main([*ARGS, "--out", out, "--process-index", "0", "--process-count", "2"]) == 2
    finally:
        os.environ["SOAPBUBBLE_CACHE"] = str(cache)
    err = capsys.readouterr().err.strip()
    assert "the default model must be trained first" in err and "soapbubble train --default" in err
    assert not os.path.exists(tmp_path / "x.part-00000-of-00002.tsv")
