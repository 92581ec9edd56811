"""Certified-accuracy curves against direct counts and scipy.stats.binom's exact tail."""

import json
import math
import re
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from soapbubble import analyze

OURS = """idx\tlabel\tpredict\tradius\tcorrect\ttime
0\t3\t3\t0.500000\t1\t0:00:00.010000
1\t2\t2\t1.250000\t1\t0:00:00.010000
2\t1\t7\t2.000000\t0\t0:00:00.010000
3\t0\t-1\t0.000000\t0\t0:00:00.010000
4\t5\t5\t0.000100\t1\t0:00:00.010000
"""

# Cohen et al.'s certify.py output: radius with {:.3}, Python timedelta.
COHEN = """idx\tlabel\tpredict\tradius\tcorrect\ttime
0\t3\t3\t0.57\t1\t0:00:14.512000
20\t8\t8\t1.02\t1\t0:00:14.623000
40\t1\t0\t0.214\t0\t0:00:14.498000
"""


def test_reads_both_formats_and_counts(tmp_path):
    ours = tmp_path / "ours.tsv"
    ours.write_text(OURS)
    cohen = tmp_path / "cohen.tsv"
    cohen.write_text(COHEN)
    a = analyze.read_results(ours)
    b = analyze.read_results(cohen)
    assert len(a) == 5 and len(b) == 3 and a.name == "ours"
    radii = np.array([0.0, 0.0001, 0.5, 1.0, 1.25, 2.0, 3.0])
    # Direct count: correct and radius >= r, over 5 rows.
    np.testing.assert_allclose(analyze.approximate_certified_accuracy(a, radii), [3, 3, 2, 1, 1, 0, 0] / np.float64(5))
    np.testing.assert_allclose(analyze.approximate_certified_accuracy(b, np.array([0.5, 1.0])), [2 / 3, 1 / 3])


def _smallest_quantile(n, alpha, rho):
    """The smallest k with P(Binomial(n, alpha) > k) <= rho, by a plain search over scipy's tail."""
    k = 0
    while stats.binom.sf(k, n, alpha) > rho:
        k += 1
    return k


@pytest.mark.parametrize("n", [10, 500, 100_000])
@pytest.mark.parametrize("alpha", [1e-3, 1e-2, 0.05])
@pytest.mark.parametrize("rho", [1e-3, 1e-2, 0.05])
def test_margin_is_the_exact_binomial_quantile(n, alpha, rho):
    w = analyze.wrong_certificate_bound(n, alpha, rho)
    assert isinstance(w, int) and 0 <= w <= n
    # The defining property: P(W > w) <= rho < P(W > w - 1) for W ~ Binomial(n, alpha).
    assert stats.binom.sf(w, n, alpha) <= rho
    assert w == 0 or stats.binom.sf(w - 1, n, alpha) > rho


@pytest.mark.parametrize("alpha", [1e-3, 1e-2, 0.05])
@pytest.mark.parametrize("rho", [1e-3, 1e-2, 0.05])
def test_margin_matches_exact_rational_tail_at_n_10(alpha, rho):
    """At N = 10 the tail is summed exactly in rationals (no floating point at all)."""
    n, a = 10, Fraction(alpha)
    tail = lambda k: sum(math.comb(n, j) * a**j * (1 - a) ** (n - j) for j in range(k + 1, n + 1))  # noqa: E731
    w = next(k for k in range(n + 1) if tail(k) <= Fraction(rho))
    assert analyze.wrong_certificate_bound(n, alpha, rho) == w


def test_high_probability_variant_is_mean_minus_binomial_quantile(tmp_path):
    path = tmp_path / "ours.tsv"
    path.write_text(OURS)
    res = analyze.read_results(path)
    radii = np.array([0.0, 0.5, 1.25])
    direct = np.array([3, 2, 1]) / 5  # correct rows with radius >= r, counted by hand
    for alpha, rho in [(0.001, 0.01), (0.05, 0.001), (0.2, 0.05)]:
        got = analyze.high_probability_certified_accuracy(res, radii, alpha, rho)
        np.testing.assert_allclose(got, direct - _smallest_quantile(5, alpha, rho) / 5)
        # alpha_d is charged once, in the confidence 1 - rho - alpha_d: the bound itself is the same.
        np.testing.assert_allclose(
            analyze.high_probability_certified_accuracy(res, radii, alpha, rho, alpha_d=0.01), got)


def test_old_bernstein_margin_undercovers_and_the_new_one_does_not():
    n, alpha, rho = 100_000, 1e-3, 1e-3
    # The margin (in wrong certificates) of the formula this module used before.
    log_term = math.log(1 / rho)
    bernstein = n * alpha + math.sqrt(n * alpha * (1 - alpha) * log_term) + log_term / 3
    assert stats.binom.sf(math.floor(bernstein), n, alpha) > rho  # it undercovers (~3e-3)
    res = analyze.Results(name="big", idx=np.arange(n), label=np.zeros(n, int), predict=np.zeros(n, int),
                          radius=np.full(n, 1.0), correct=np.ones(n, int))
    margin = 1.0 - analyze.high_probability_certified_accuracy(res, np.array([0.5]), alpha, rho)[0]
    assert margin * n > bernstein
    assert stats.binom.sf(round(margin * n), n, alpha) <= rho


def test_high_probability_argument_errors(tmp_path):
    path = tmp_path / "ours.tsv"
    path.write_text(OURS)
    res = analyze.read_results(path)
    r = np.array([0.5])
    with pytest.raises(ValueError, match=r"rho must be in \(0, 1\), got 1.5"):
        analyze.high_probability_certified_accuracy(res, r, 0.001, 1.5)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\), got 0"):
        analyze.high_probability_certified_accuracy(res, r, 0, 0.01)
    with pytest.raises(ValueError, match=r"alpha_d must be in \[0, 1\), got -0.1"):
        analyze.high_probability_certified_accuracy(res, r, 0.001, 0.01, alpha_d=-0.1)
    with pytest.raises(ValueError, match=r"rho \+ alpha_d must be < 1"):
        analyze.high_probability_certified_accuracy(res, r, 0.001, 0.5, alpha_d=0.5)
    with pytest.raises(TypeError, match=r"alpha must be a number in \(0, 1\)"):
        analyze.high_probability_certified_accuracy(res, r, "0.001", 0.01)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0"):
        analyze.wrong_certificate_bound(0, 0.001, 0.01)


def _write_tsv(path, radii, correct):
    rows = "".join(f"{i}\t1\t{1 if c else 2}\t{r:.6f}\t{int(c)}\t0:00:00.010000\n"
                   for i, (r, c) in enumerate(zip(radii, correct)))
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n" + rows)


def test_sidecar_alphas_drive_the_high_probability_column(tmp_path):
    n = 200
    radii = np.linspace(0, 0.05, n)
    correct = np.arange(n) % 4 != 0
    path = tmp_path / "run.tsv"
    _write_tsv(path, radii, correct)
    budget = {"alpha": 0.02, "alpha_p": 0.01, "alpha_d": 0.01}
    (tmp_path / "run.tsv.json").write_text(json.dumps({"parameters": {"attack": "linf", "alpha_budget": budget}}))
    res = analyze.read_results(path)
    assert (res.alpha_p, res.alpha_d, res.attack) == (0.01, 0.01, "linf")
    assert analyze.certificate_alphas(res, 0.001) == (0.01, 0.01)
    # The same rows without a sidecar (Cohen et al.'s case): the caller's alpha, alpha_d = 0.
    bare = tmp_path / "bare.tsv"
    _write_tsv(bare, radii, correct)
    plain = analyze.read_results(bare)
    assert (plain.alpha_p, plain.alpha_d, plain.attack) == (None, None, None)
    assert analyze.certificate_alphas(plain, 0.001) == (0.001, 0.0)

    table = analyze.format_table([res, plain], [0.0], alpha=0.001, rho=0.01)
    cells = {line.split()[0]: re.findall(r"[\d.]+", line.split(maxsplit=1)[1]) for line in table.splitlines()[2:]}
    mean = correct.mean()
    for name, alpha_p in [("run", 0.01), ("bare", 0.001)]:
        expected = mean - _smallest_quantile(n, alpha_p, 0.01) / n
        assert cells[name] == [f"{100 * mean:.1f}", f"{100 * expected:.1f}"]
    assert cells["run"] != cells["bare"]
    png = analyze.plot_certified_accuracy([res, plain], tmp_path / "c.png", alpha=0.001, rho=0.01)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "sidecar,message",
    [
        ("{not json", "is not valid JSON"),
        ('{"parameters": {"alpha_budget": {"alpha_p": 2, "alpha_d": 0}}}', r"alpha_p must be a number in \(0, 1\)"),
        ('{"parameters": {"alpha_budget": {"alpha_p": 0.001, "alpha_d": -1}}}', r"alpha_d must be a number in \[0, 1\)"),
        ('{"parameters": {"alpha_budget": {"alpha_p": 0.001}}}', "must be an object with 'alpha_p' and 'alpha_d'"),
        ('{"parameters": {"attack": "l1"}}', "'attack' must be one of l2, linf"),
        ('{"parameters": {"alpha_budget": {"alpha_p": 0.001, "alpha_d": 0, "bilateral": {"alpha_a": 0.0005}}}}',
         "alpha_budget.bilateral must be an object with alpha_a, alpha_b, num_classes"),
        ('{"parameters": {"alpha_budget": {"alpha_p": 0.001, "alpha_d": 0, "bilateral": '
         '{"alpha_a": 0.0005, "alpha_b": 0.0005, "num_classes": 3}}}}', r"alpha_a \+ \(num_classes - 1\) alpha_b"),
    ],
)
def test_malformed_sidecar_is_named(tmp_path, sidecar, message):
    path = tmp_path / "run.tsv"
    path.write_text(OURS)
    (tmp_path / "run.tsv.json").write_text(sidecar)
    with pytest.raises(ValueError, match=message) as exc:
        analyze.read_results(path)
    assert "run.tsv.json" in str(exc.value)


def test_sidecar_without_budget_leaves_alphas_unknown(tmp_path):
    path = tmp_path / "old.tsv"
    path.write_text(OURS)
    (tmp_path / "old.tsv.json").write_text(json.dumps({"parameters": {"alpha": 0.001, "attack": "l2"}}))
    res = analyze.read_results(path)
    assert (res.alpha_p, res.alpha_d, res.attack) == (None, None, "l2")


def test_default_radii_are_the_papers():
    quarter = [0.25 * k for k in range(9)]  # 0, 0.25, ..., 2.0
    assert analyze.default_radii(0.0, "l2").tolist() == quarter
    assert analyze.default_radii(1.9, "l2").tolist() == quarter
    assert analyze.default_radii(3.1, "l2").tolist() == [0.25 * k for k in range(14)]  # up to 3.25 >= 3.1
    big = analyze.default_radii(40.0, "l2")
    assert len(big) <= 17 and big[0] == 0 and big[-1] >= 40.0 and np.all(np.diff(big) == big[1])
    assert analyze.default_radii(0.02, "linf").tolist() == [k / 255 for k in (0, 1, 2, 4, 8)]
    assert analyze.default_radii(0.1, "linf").tolist() == [k / 255 for k in (0, 1, 2, 4, 8, 16, 32)]
    assert [analyze.radius_label(r, "linf") for r in analyze.default_radii(0.0, "linf")] == [
        "0/255", "1/255", "2/255", "4/255", "8/255"]
    with pytest.raises(ValueError, match="attack must be one of l2, linf"):
        analyze.default_radii(1.0, "l1")
    with pytest.raises(ValueError, match="max_radius must be a finite number >= 0"):
        analyze.default_radii(float("nan"))


def test_table_and_plot(tmp_path):
    path = tmp_path / "ours.tsv"
    path.write_text(OURS)
    res = analyze.read_results(path)
    text = analyze.format_table([res], [0.0, 0.5, 1.0], alpha=0.001)
    assert "60.0" in text and "40.0" in text and "20.0" in text
    png = analyze.plot_certified_accuracy([res], tmp_path / "curve.png", alpha=0.001)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such results file"):
        analyze.read_results(tmp_path / "missing.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\tx\t0.5\t1\tt\n")
    with pytest.raises(ValueError, match=r"line 2 is malformed"):
        analyze.read_results(bad)
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("a\tb\n")
    with pytest.raises(ValueError, match="does not start with the columns"):
        analyze.read_results(wrong)


def test_names_and_radii_checks(tmp_path):
    # Cohen et al.'s files have no extension: "sigma_0.25" must not lose its ".25".
    cohen = tmp_path / "sigma_0.25"
    cohen.write_text(COHEN)
    assert analyze.read_results(cohen).name == "sigma_0.25"
    for bad in ("nan", "-0.5", "inf"):
        path = tmp_path / "bad_radius.tsv"
        path.write_text(f"idx\tlabel\tpredict\tradius\tcorrect\n0\t1\t1\t{bad}\t1\n")
        with pytest.raises(ValueError, match=r"line 2 is malformed \(radius must be a finite number >= 0"):
            analyze.read_results(path)


def test_bilateral_sidecar_is_read(tmp_path):
    """A bilateral run (certify --bilateral) records its split of alpha_p; analyze keeps alpha_p for the
    dataset-level bound and exposes the split."""
    from soapbubble import noise, worst_case

    path = tmp_path / "bil.tsv"
    path.write_text(OURS)
    budget = worst_case(noise.Gaussian(0.25), "l2").bilateral_budget(0.001, 10).as_dict()
    (tmp_path / "bil.tsv.json").write_text(json.dumps({"parameters": {"attack": "l2", "alpha_budget": budget}}))
    res = analyze.read_results(path)
    assert (res.alpha_p, res.alpha_d) == (0.001, 0.0)
    assert res.bilateral == budget["bilateral"] and res.bilateral["num_classes"] == 10
