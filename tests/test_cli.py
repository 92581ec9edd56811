"""The command line as a new user meets it: the main job, resume after a kill, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from soapbubble import analyze, cli, runner


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache (default model, radius tables) shared by the tests of this module."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SOAPBUBBLE_CACHE")
    os.environ["SOAPBUBBLE_CACHE"] = str(path)
    yield path
    if old is None:
        del os.environ["SOAPBUBBLE_CACHE"]
    else:
        os.environ["SOAPBUBBLE_CACHE"] = old


def test_main_job_end_to_end_and_resume(cache, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--max", "4", "--n", "400", "--n0", "20", "--batch", "200", "--quiet"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Certified accuracy, l2 attack" in printed and "Certified accuracy, l_inf attack" in printed
    expected = {"gaussian_l2", "gaussian_linf", "l2_l2", "l2_linf", "mixed_linf_linf"}
    for name in expected:
        rows = runner.completed_rows(out / f"{name}.tsv")
        assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["certified_accuracy"]) == expected and summary["images"] == 4
    # The summary's numbers are those of the TSVs.
    res = analyze.read_results(out / "gaussian_l2.tsv")
    assert summary["certified_accuracy"]["gaussian_l2"]["0.25"] == pytest.approx(
        float(analyze.approximate_certified_accuracy(res, [0.25])[0])
    )
    for png in ("certified_accuracy_l2.png", "certified_accuracy_linf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same radius-table files serve l2 and l_inf of one family: the l_inf radius of the same
    # certificate is never larger than its l2 radius (Theorem 3: r_inf = r_2 / sqrt(d) on exact tables).
    l2 = runner.completed_rows(out / "gaussian_l2.tsv")
    linf = runner.completed_rows(out / "gaussian_linf.tsv")
    assert [r[2] for r in l2] == [r[2] for r in linf]
    assert all(float(a[3]) >= float(b[3]) for a, b in zip(l2, linf))
    # A rerun resumes: nothing is certified again, the files are unchanged.
    before = (out / "l2_l2.tsv").read_text()
    assert cli.main(argv) == 0
    assert (out / "l2_l2.tsv").read_text() == before


def _certify_cmd(out, cache):
    return [sys.executable, "-m", "soapbubble.cli", "certify", "--dataset", "digits", "--noise", "gaussian",
            "--sigma", "0.25", "--n", "4000", "--n0", "50", "--batch", "500", "--max", "14", "--quiet",
            "--out", str(out)]


def test_killed_certify_resumes_with_the_same_rows(cache, tmp_path):
    env = {**os.environ, "SOAPBUBBLE_CACHE": str(cache)}
    straight = tmp_path / "straight.tsv"
    subprocess.run(_certify_cmd(straight, cache), env=env, check=True, timeout=600)
    killed = tmp_path / "killed.tsv"
    proc = subprocess.Popen(_certify_cmd(killed, cache), env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if killed.exists() and len(runner.completed_rows(killed)) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done_before = len(runner.completed_rows(killed))
    assert 4 <= done_before < 14, "the kill should land mid-run"
    subprocess.run(_certify_cmd(killed, cache), env=env, check=True, timeout=600)
    strip = lambda rows: [r[:5] for r in rows]  # noqa: E731 (time column aside)
    assert strip(runner.completed_rows(killed)) == strip(runner.completed_rows(straight))
    assert [int(r[0]) for r in runner.completed_rows(killed)] == list(range(14))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["certify", "--dataset", "mnist", "--sigma", "0.25", "--out", "{tmp}/x.tsv"], "unknown dataset"),
        (["certify", "--model", "{tmp}/no-model", "--sigma", "0.25", "--out", "{tmp}/x.tsv"], "no-model"),
        (["convert", "{tmp}/missing.pth.tar", "{tmp}/out"], "missing.pth.tar"),
        (["analyze", "{tmp}/missing.tsv"], "no such results file"),
        (["demo", "--out", "{tmp}/a-file/demo"], "cannot write to the output folder"),
    ],
    ids=["unknown dataset", "missing model", "missing checkpoint", "missing results", "unwritable output"],
)
def test_user_errors_are_one_line(cache, tmp_path, capsys, argv, message):
    (tmp_path / "a-file").write_text("not a folder")
    code = cli.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["certify", "--sigma", "0.25", "--alpha", "2", "--out", "x.tsv"], "--alpha must be in (0, 1), got 2.0"),
        (["certify", "--sigma", "-1", "--out", "x.tsv"], "--sigma must be > 0, got -1.0"),
        (["demo", "--n", "0"], "--n must be in [1, 1048576], got 0"),
        (["certify", "--sigma", "0.25", "--noise", "pure_linf", "--out", "x.tsv"], "invalid choice: 'pure_linf'"),
    ],
)
def test_options_out_of_range(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
