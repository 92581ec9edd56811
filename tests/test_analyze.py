"""Certified-accuracy curves against direct counts and Cohen et al.'s formula."""

import math

import numpy as np
import pytest

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


def test_high_probability_variant_is_cohens_bernstein_bound(tmp_path):
    path = tmp_path / "ours.tsv"
    path.write_text(OURS)
    res = analyze.read_results(path)
    alpha, rho, n = 0.001, 0.01, 5
    got = analyze.high_probability_certified_accuracy(res, np.array([0.5]), alpha, rho)
    expected = 2 / 5 - alpha - math.sqrt(alpha * (1 - alpha) * math.log(1 / rho) / n) - math.log(1 / rho) / (3 * n)
    np.testing.assert_allclose(got, [expected])
    with pytest.raises(ValueError, match=r"rho must be in \(0, 1\), got 1.5"):
        analyze.high_probability_certified_accuracy(res, np.array([0.5]), alpha, 1.5)


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
