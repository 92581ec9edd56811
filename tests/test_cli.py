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
    argv = ["demo", "--out", str(out), "--max", "4", "--n", "400", "--n0", "20", "--batch", "200", "--quiet",
            "--no-bilateral"]  # (the bilateral runs: test_main_job_bilateral_summary)
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Certified accuracy, l2 attack" in printed and "Certified accuracy, l_inf attack" in printed
    expected = {"gaussian_l2", "gaussian_linf", "l2_l2", "l2_linf", "mixed_linf_linf"}
    for name in expected:
        rows = runner.completed_rows(out / f"{name}.tsv")
        assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["certified_accuracy"]) == expected and summary["images"] == 4
    assert "bilateral" not in summary and not list(out.glob("*_bilateral.tsv"))
    # The summary's numbers are those of the TSVs.
    res = analyze.read_results(out / "gaussian_l2.tsv")
    assert summary["certified_accuracy"]["gaussian_l2"]["0.25"] == pytest.approx(
        float(analyze.approximate_certified_accuracy(res, [0.25])[0])
    )
    for png in ("certified_accuracy_l2.png", "certified_accuracy_linf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The l2 and l_inf runs of one family draw the same samples (keys fold_in(key, idx)), so they
    # select the same class and decide abstention (the threshold 1/2) alike.
    l2 = runner.completed_rows(out / "gaussian_l2.tsv")
    linf = runner.completed_rows(out / "gaussian_linf.tsv")
    assert [r[2] for r in l2] == [r[2] for r in linf]
    # The sequential route spent at most the fixed-n budget, and the summary says how much.
    spent = summary["forward_passes"]
    assert spent["total"] == sum(v["forward_passes"] for k, v in spent.items() if isinstance(v, dict))
    assert spent["total"] <= spent["fixed_n_total"] == 5 * 4 * (400 + 20)
    assert all(0 < int(r[6]) <= 400 for r in l2)
    assert "Sequential certification spent" in printed
    # A rerun resumes: nothing is certified again, the files are unchanged.
    before = (out / "l2_l2.tsv").read_text()
    assert cli.main(argv) == 0
    assert (out / "l2_l2.tsv").read_text() == before


def test_main_job_bilateral_summary(cache, tmp_path, capsys, monkeypatch):
    """The main job's comparison, unilateral against bilateral at its radii (the Gaussian runs only here,
    for time: every family takes the same path), from resumable bilateral TSVs."""
    from soapbubble import main_job

    monkeypatch.setattr(main_job, "PLANS", {"gaussian": ("l2", "linf")})
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--max", "4", "--n", "400", "--n0", "20", "--batch", "200", "--quiet"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    expected = {"gaussian_l2", "gaussian_linf"}
    # Unilateral against bilateral at the same radii, for each (family, attack), from bilateral TSVs.
    bilateral = summary["bilateral"]
    assert set(bilateral["certified_accuracy"]) == set(bilateral["alpha_budget"]) == expected
    assert "unilateral against bilateral" in printed and "gaussian (linf), bilateral" in printed
    for name in expected:
        assert set(bilateral["certified_accuracy"][name]) == set(summary["certified_accuracy"][name])
        path = out / bilateral["files"][name]
        assert path.name == f"{name}_bilateral.tsv"
        rows = runner.completed_rows(path)
        assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
        res = analyze.read_results(path)
        for radius, value in bilateral["certified_accuracy"][name].items():
            assert value == pytest.approx(float(analyze.approximate_certified_accuracy(res, [float(radius)])[0]))
        split = bilateral["alpha_budget"][name]
        assert split == json.loads(runner.sidecar_path(path).read_text())["parameters"]["alpha_budget"]
        assert split["bilateral"]["num_classes"] == 10 and split["alpha_p"] == summary["alpha_budget"][name]["alpha_p"]
        assert split["bilateral"]["alpha_a"] == split["alpha_p"] / 2
        # Columns: Cohen's, n_used, p_lower, p_upper, certified_<r>; abstention as certify's rule.
        for r in rows:
            p_lower, p_upper = float(r[7]), float(r[8])
            assert (int(r[2]) >= 0) == (p_lower >= 0.5 or p_lower > p_upper)
    assert bilateral["forward_passes"]["total"] <= bilateral["forward_passes"]["fixed_n_total"]
    # A rerun resumes: the files are unchanged.
    before = (out / "gaussian_l2_bilateral.tsv").read_text()
    assert cli.main(argv) == 0
    assert (out / "gaussian_l2_bilateral.tsv").read_text() == before


def _certify_cmd(out, cache):
    return [sys.executable, "-m", "soapbubble.cli", "certify", "--dataset", "digits", "--noise", "gaussian",
            "--sigma", "0.25", "--n", "4000", "--n0", "50", "--batch", "500", "--max", "14", "--quiet",
            "--out", str(out)]


def test_killed_certify_resumes_with_the_same_rows(cache, tmp_path):
    """Killed mid-run (rows written in groups of 2), a rerun resumes; the rows equal one
    straight run's, which certifies all 14 rows in one group (grouping changes no row)."""
    env = {**os.environ, "SOAPBUBBLE_CACHE": str(cache)}
    straight = tmp_path / "straight.tsv"
    subprocess.run(_certify_cmd(straight, cache), env=env, check=True, timeout=600)
    killed = tmp_path / "killed.tsv"
    proc = subprocess.Popen(_certify_cmd(killed, cache) + ["--group", "2"], env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if killed.exists() and len(runner.completed_rows(killed)) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done_before = len(runner.completed_rows(killed))
    assert 4 <= done_before < 14, "the kill should land mid-run"
    subprocess.run(_certify_cmd(killed, cache) + ["--group", "2"], env=env, check=True, timeout=600)
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
        (["demo", "--n", "0"], "--n must be in [1, 2147483647], got 0"),
        (["demo", "--n0", str(2**64)], "--n0 must be in [1, 2147483647], got 18446744073709551616"),
        (["demo", "--batch", "10"], "--batch must be in [50, 2147483647], got 10"),
        (["certify", "--sigma", "0.25", "--noise", "pure_linf", "--out", "x.tsv"], "invalid choice: 'pure_linf'"),
    ],
)
def test_options_out_of_range(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "value,why",
    [
        ("nan", "'nan' is not a finite number >= 0"),
        ("0.5,-1", "'-1' is not a finite number >= 0"),
        ("inf", "'inf' is not a finite number >= 0"),
        ("0.5,,1", "an empty entry"),
        ("", "an empty entry"),
        ("0.5,abc", "'abc' is not a number"),
    ],
    ids=["nan", "negative", "inf", "empty entry", "empty", "typo"],
)
def test_analyze_radii_errors_name_the_option(tmp_path, capsys, value, why):
    with pytest.raises(SystemExit) as exc:
        cli.main(["analyze", str(tmp_path / "x.tsv"), f"--radii={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--radii must be comma-separated finite numbers >= 0" in err and why in err
    assert "invalid" not in err and "Traceback" not in err


def _write_tsv(path, radii, correct):
    rows = "".join(f"{i}\t1\t{1 if c else 2}\t{r:.6f}\t{int(c)}\t0:00:00.010000\n"
                   for i, (r, c) in enumerate(zip(radii, correct)))
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n" + rows)


def test_analyze_defaults_use_the_files_attack_and_alphas(tmp_path, capsys):
    # An l_inf soapbubble run with its sidecar, and a Cohen et al.-style l2 file (no sidecar) in a
    # deep folder with a long name: it is printed whole.
    linf = tmp_path / "ours_linf.tsv"
    _write_tsv(linf, [k / 1000 for k in range(40)], [k % 3 != 0 for k in range(40)])
    budget = {"alpha": 0.001, "alpha_p": 0.0005, "alpha_d": 0.0005}
    (tmp_path / "ours_linf.tsv.json").write_text(
        json.dumps({"parameters": {"attack": "linf", "alpha_budget": budget}}))
    deep = tmp_path / "certify" / "cifar10" / "resnet110" / "noise_0.25" / "test"
    deep.mkdir(parents=True)
    cohen = deep / "sigma_0.25_a_rather_long_file_name_that_must_not_be_cut"
    _write_tsv(cohen, [0.1 * k for k in range(30)], [True] * 30)
    assert cli.main(["analyze", str(linf), str(cohen), "--rho", "0.001"]) == 0
    out = capsys.readouterr().out
    # l2: 0, 0.25, ... up to the largest radius 2.9 (>= 2.0), i.e. 3.0; confidence 1 - rho (alpha_d = 0).
    assert str(cohen) in out
    assert "1 - rho - alpha_d = 0.999 " in out
    head = next(line for line in out.splitlines() if line.startswith("radius (l2)"))
    assert head.split()[2:] == [f"{0.25 * k:g}" for k in range(13)]
    # l_inf: multiples of 1/255 up to the largest radius 0.039 (10/255), i.e. 16/255; its own alpha_d.
    head = next(line for line in out.splitlines() if line.startswith("radius (linf)"))
    assert head.split()[2:] == ["0/255", "1/255", "2/255", "4/255", "8/255", "16/255"]
    assert f"1 - rho - alpha_d = {1 - 0.001 - 0.0005:g} " in out
    assert str(linf) in out


@pytest.mark.parametrize("kind", ["random bytes", "text", "missing", "directory", "truncated"])
def test_convert_rejects_non_checkpoints_in_one_line(tmp_path, capsys, kind):
    path = tmp_path / "checkpoint.pth.tar"
    if kind == "random bytes":
        path.write_bytes(bytes((i * 97 + 13) % 256 for i in range(4096)))
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "truncated":
        torch = pytest.importorskip("torch")
        torch.save({"arch": "cifar_resnet20", "state_dict": {"1.fc.weight": torch.zeros(10, 64)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    code = cli.main(["convert", str(path), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err
    if kind != "missing":
        assert "expected a torch.save file" in err
    assert not (tmp_path / "out").exists()


def test_toy_certifies_through_the_library(capsys):
    """The toy command's rows are soapbubble.certify's certificates, all sound (exact radius known)."""
    assert cli.main(["toy", "--d", "8", "--n", "2000", "--points", "5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "NO" not in out and out.count("yes") == 5


def test_certify_radii_sequential_tsv_resumes_and_analyzes(cache, tmp_path, monkeypatch, capsys):
    """--radii: the sequential route, in groups; resumable; rows equal a single-row run; analyze reads it."""
    monkeypatch.setenv("SOAPBUBBLE_CACHE", str(cache))
    base = ["certify", "--dataset", "digits", "--noise", "gaussian", "--sigma", "0.25", "--n", "3000",
            "--n0", "50", "--batch", "200", "--radii", "0.25,0.5", "--quiet"]
    whole = tmp_path / "whole.tsv"
    assert cli.main(base + ["--max", "12", "--group", "5", "--out", str(whole)]) == 0
    rows = runner.completed_rows(whole, ("n_used", "certified_0.25", "certified_0.5"))
    assert [int(r[0]) for r in rows] == list(range(12))
    # Resume: a shorter run, then the full one, equals the full one (time column aside).
    part = tmp_path / "part.tsv"
    assert cli.main(base + ["--max", "5", "--group", "3", "--out", str(part)]) == 0
    assert json.loads(runner.sidecar_path(part).read_text())["parameters"]["radii"] == [0.25, 0.5]
    assert cli.main(base + ["--max", "12", "--group", "3", "--out", str(part)]) == 0
    strip = lambda rs: [r[:5] + r[6:] for r in rs]  # noqa: E731
    assert strip(runner.completed_rows(part)) == strip(rows)
    for r in rows:
        certified = [int(v) for v in r[7:]]
        radius = float(r[3])
        assert radius == max([0.0] + [t for t, c in zip((0.25, 0.5), certified) if c])
        assert 0 < int(r[6]) <= 3000
    capsys.readouterr()
    assert cli.main(["analyze", str(whole)]) == 0
    out = capsys.readouterr().out
    assert "0.25" in out and "0.5" in out and "0.75" not in out  # exactly the target radii


def test_certify_bilateral_fixed_and_sequential_resume_merge_analyze(cache, tmp_path, monkeypatch, capsys):
    """--bilateral: fixed n and --radii; p_lower and p_upper columns; the split in the sidecar; a rerun
    resumes, a unilateral rerun on the same file is refused in one line; merge and analyze read it."""
    import numpy as np

    import soapbubble
    from soapbubble import noise

    monkeypatch.setenv("SOAPBUBBLE_CACHE", str(cache))
    base = ["certify", "--dataset", "digits", "--noise", "gaussian", "--sigma", "0.25", "--n", "1000",
            "--n0", "50", "--batch", "200", "--bilateral", "--quiet"]
    table = soapbubble.cached_radius_table(noise.Gaussian(0.25), 64, "l2", table_dir=cache / "tables",
                                           bilateral=True)
    fixed = tmp_path / "fixed.tsv"
    assert cli.main(base + ["--max", "2", "--out", str(fixed)]) == 0
    assert cli.main(base + ["--max", "4", "--out", str(fixed)]) == 0  # resumes after idx 1
    rows = runner.completed_rows(fixed, ("p_lower", "p_upper"))
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    params = json.loads(runner.sidecar_path(fixed).read_text())["parameters"]
    split = params["alpha_budget"]
    assert params["bilateral"] is True and split["alpha_p"] == 0.001 and split["bilateral"]["num_classes"] == 10
    assert split["bilateral"]["alpha_a"] == 0.0005 and "Clopper-Pearson" in split["bilateral"]["construction"]
    for r in rows:  # the radius is certify's rule at the bounds written (which read back exactly)
        p_lower, p_upper = float(r[6]), float(r[7])
        best = max(float(table.radius(p_lower)), float(table.bilateral_radius(p_lower, p_upper)))
        assert (int(r[2]) >= 0) == (p_lower >= 0.5 or p_lower > p_upper)
        assert r[3] == runner.format_radius(best if int(r[2]) >= 0 else 0.0)
    # The same file without --bilateral: refused, one line, exit 2.
    capsys.readouterr()
    unilateral = [a for a in base if a != "--bilateral"]
    assert cli.main(unilateral + ["--max", "4", "--out", str(fixed)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other parameters" in err and "bilateral" in err

    # The sequential route, in groups, resumed; then as two processes, merged: the same rows.
    seq = base + ["--radii", "0.25,0.5"]
    columns = ("n_used", "p_lower", "p_upper", "certified_0.25", "certified_0.5")
    whole = tmp_path / "whole.tsv"
    assert cli.main(seq + ["--max", "3", "--group", "2", "--out", str(whole)]) == 0
    assert cli.main(seq + ["--max", "6", "--group", "4", "--out", str(whole)]) == 0
    rows = runner.completed_rows(whole, columns)
    assert [int(r[0]) for r in rows] == list(range(6))
    split = json.loads(runner.sidecar_path(whole).read_text())["parameters"]["alpha_budget"]
    assert "mixture" in split["bilateral"]["construction"] and split["bilateral"]["alpha_a"] == 0.0005
    for r in rows:
        p_lower, p_upper = float(r[7]), float(r[8])
        assert (int(r[2]) >= 0) == (p_lower >= 0.5 or p_lower > p_upper) and 0 < int(r[6]) <= 1000
        reach = max(float(table.radius(p_lower)), float(table.bilateral_radius(p_lower, p_upper)))
        assert [int(v) for v in r[9:]] == [int(int(r[2]) >= 0 and reach >= t) for t in (0.25, 0.5)]
    parts = []
    for p in range(2):
        part = tmp_path / "run.tsv"
        assert cli.main(seq + ["--max", "6", "--group", "4", "--process-index", str(p), "--process-count", "2",
                               "--out", str(part)]) == 0
        parts.append(str(tmp_path / f"run.part-0000{p}-of-00002.tsv"))
    merged = tmp_path / "merged.tsv"
    assert cli.main(["merge", str(merged), *parts]) == 0
    strip = lambda rs: [r[:5] + r[6:] for r in rs]  # noqa: E731 (time column aside)
    assert strip(runner.completed_rows(merged, columns)) == strip(rows)
    assert json.loads(runner.sidecar_path(merged).read_text())["parameters"]["alpha_budget"] == split
    capsys.readouterr()
    assert cli.main(["analyze", str(merged)]) == 0
    out = capsys.readouterr().out
    assert "alpha_p = 0.001" in out and "0.25" in out and "0.75" not in out
    assert np.isclose(analyze.read_results(merged).alpha_p, 0.001)
