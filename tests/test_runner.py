"""The dataset runner: formatting, resume without loss or duplication, refusals."""

import json
from fractions import Fraction

import pytest

from soapbubble import runner


def fake_rows(count):
    return [(i, None, i % 3) for i in range(count)]


def fake_certify(idx, x):
    # A deterministic stand-in for certification: a function of the row index only.
    prediction = -1 if idx % 5 == 4 else idx % 3 if idx % 2 else (idx + 1) % 3
    return prediction, 0.1 * idx + 1 / 3


PARAMS = {"family": "gaussian", "sigma": 0.25, "n": 1000}


def strip_time(rows):
    return [row[:5] for row in rows]


@pytest.mark.parametrize("value", [0.0, 1 / 3, 0.1234569, 0.9999999999, 2.5e-7, 1.0000001, 123.456789999])
def test_format_radius_rounds_down_exactly(value):
    text = runner.format_radius(value)
    assert Fraction(text) <= Fraction(value)  # never up, exactly (no float in between)
    assert Fraction(value) - Fraction(text) < Fraction(1, 10**6)


def test_rows_and_sidecar(tmp_path):
    out = tmp_path / "run.tsv"
    result = runner.run_dataset(fake_rows(12), fake_certify, out, PARAMS)
    assert result.written == 12 and result.resumed_after is None
    lines = out.read_text().splitlines()
    assert lines[0] == runner.HEADER
    rows = runner.completed_rows(out)
    assert [int(r[0]) for r in rows] == list(range(12))
    for row in rows:
        idx, label, predict, radius, correct = int(row[0]), int(row[1]), int(row[2]), row[3], int(row[4])
        expected_pred, expected_radius = fake_certify(idx, None)
        assert predict == expected_pred and correct == int(predict == label)
        assert radius == (runner.format_radius(expected_radius) if predict >= 0 else "0.000000")
    assert json.loads(runner.sidecar_path(out).read_text())["parameters"] == PARAMS


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path):
    straight = tmp_path / "straight.tsv"
    runner.run_dataset(fake_rows(20), fake_certify, straight, PARAMS)

    out = tmp_path / "resumed.tsv"

    def dying(idx, x):
        if idx == 7:
            raise KeyboardInterrupt  # killed while certifying row 7
        return fake_certify(idx, x)

    with pytest.raises(KeyboardInterrupt):
        runner.run_dataset(fake_rows(20), dying, out, PARAMS)
    assert len(runner.completed_rows(out)) == 7
    # A kill in the middle of a write leaves a partial line behind.
    with open(out, "a") as f:
        f.write("7\t1\t2\t0.3")
    result = runner.run_dataset(fake_rows(20), fake_certify, out, PARAMS)
    assert result.resumed_after == 6 and result.written == 13
    assert strip_time(runner.completed_rows(out)) == strip_time(runner.completed_rows(straight))
    # Running again adds nothing.
    assert runner.run_dataset(fake_rows(20), fake_certify, out, PARAMS).written == 0


def test_load_is_called_only_for_the_rows_certified(tmp_path):
    """With load=, skipped rows and rows a resumed file already has are never loaded."""
    out, loaded = tmp_path / "lazy.tsv", []

    def load(idx):
        loaded.append(idx)
        return None, idx % 3

    runner.run_dataset(range(6), fake_certify, out, PARAMS, skip=2, load=load)
    assert loaded == [0, 2, 4]
    loaded.clear()
    result = runner.run_dataset(range(12), fake_certify, out, PARAMS, skip=2, load=load)
    assert loaded == [6, 8, 10] and result.resumed_after == 4
    straight = tmp_path / "straight.tsv"
    runner.run_dataset(fake_rows(12), fake_certify, straight, PARAMS, skip=2)
    assert strip_time(runner.completed_rows(out)) == strip_time(runner.completed_rows(straight))


def test_skip_and_max_as_cohen(tmp_path):
    out = tmp_path / "skip.tsv"
    runner.run_dataset(fake_rows(30), fake_certify, out, PARAMS, skip=4, max_index=21)
    assert [int(r[0]) for r in runner.completed_rows(out)] == [0, 4, 8, 12, 16, 20]
    with pytest.raises(ValueError, match="skip must be >= 1, got 0"):
        runner.run_dataset(fake_rows(3), fake_certify, tmp_path / "x.tsv", PARAMS, skip=0)


def test_refuses_other_parameters_and_foreign_files(tmp_path):
    out = tmp_path / "run.tsv"
    runner.run_dataset(fake_rows(3), fake_certify, out, PARAMS)
    with pytest.raises(ValueError, match=r"was written with other parameters \(sigma\)"):
        runner.run_dataset(fake_rows(3), fake_certify, out, {**PARAMS, "sigma": 0.5})
    foreign = tmp_path / "foreign.tsv"
    foreign.write_text("a\tb\n")
    with pytest.raises(ValueError, match="exists without its sidecar"):
        runner.run_dataset(fake_rows(3), fake_certify, foreign, PARAMS)
    runner.sidecar_path(foreign).write_text(json.dumps({"parameters": PARAMS}))
    with pytest.raises(ValueError, match="is not a soapbubble certification TSV"):
        runner.run_dataset(fake_rows(3), fake_certify, foreign, PARAMS)


def test_several_outputs_in_lockstep_resume_independently(tmp_path):
    outs = {"l2": tmp_path / "l2.tsv", "linf": tmp_path / "linf.tsv"}

    def both(idx, x):
        prediction, radius = fake_certify(idx, x)
        return {"l2": (prediction, radius), "linf": (prediction, radius / 8)}

    calls = []

    def counting(idx, x):
        calls.append(idx)
        return both(idx, x)

    runner.run_dataset(fake_rows(6), counting, outs, PARAMS)
    # linf lost its last two rows (e.g. killed between the two writes).
    rows = runner.completed_rows(outs["linf"])[:4]
    outs["linf"].write_text(runner.HEADER + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    calls.clear()
    result = runner.run_dataset(fake_rows(10), counting, outs, PARAMS)
    assert calls == [4, 5, 6, 7, 8, 9] and result.resumed_after == 3
    assert [int(r[0]) for r in runner.completed_rows(outs["l2"])] == list(range(10))
    assert [int(r[0]) for r in runner.completed_rows(outs["linf"])] == list(range(10))
    linf = runner.completed_rows(outs["linf"])
    assert all(r[3] == runner.format_radius(both(int(r[0]), None)["linf"][1]) or r[2] == "-1" for r in linf)
    assert json.loads(runner.sidecar_path(outs["linf"]).read_text())["parameters"]["output"] == "linf"
