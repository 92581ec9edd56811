"""Executes the notebooks in notebooks/ at small sizes and checks the numbers they store.

Each notebook runs in a fresh kernel launched from this interpreter (a kernelspec
written to a temporary directory, so no global Jupyter install is needed) with
``SOAPBUBBLE_NOTEBOOK_SMALL=1``; it writes its key numbers to the JSON file named
by ``SOAPBUBBLE_NOTEBOOK_OUT``, which the tests compare with closed forms computed
here, independently of the notebooks and of the library.

The committed .ipynb files carry the outputs of a full-size run (figures visible where the
repository is browsed), written by ``notebooks/regenerate.py``, which stamps the hash of the code
that produced them; ``test_committed_with_full_size_outputs`` fails when a notebook's code changed
since. The small runs here execute in memory and never write the committed files.
"""

import hashlib
import importlib.util
import json
import math
import pathlib
import sys

import nbformat
import numpy as np
import pytest
import scipy.special as sc
import scipy.stats
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_radial_laws", "02_pareto_frontier", "03_radius_curves")
# Every notebook is committed with the outputs of a full-size run; CI runs them small.
COMMITTED = (*NAMES, "04_training_families")
# The ones that draw figures: their committed outputs must show at least one (image/png).
WITH_FIGURES = COMMITTED
# Two-sided normal quantile for every Monte Carlo check below (fixed keys: a check
# always passes or always fails; this sets how strict it is, false-alarm rate ~1e-4 each).
Z = scipy.stats.norm.isf(0.5e-4)


def _execute(name: str, tmp_path: pathlib.Path, monkeypatch) -> dict:
    kernels = tmp_path / "kernels"
    (kernels / "soapbubble-test").mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "soapbubble test",
        "language": "python",
    }
    (kernels / "soapbubble-test" / "kernel.json").write_text(json.dumps(spec))
    out = tmp_path / f"{name}.json"
    for var, value in {
        "SOAPBUBBLE_NOTEBOOK_SMALL": "1",
        "SOAPBUBBLE_NOTEBOOK_OUT": str(out),
        "MPLBACKEND": "Agg",
        # At these sizes compiling dominates (one Gamma sampler per k): XLA's
        # optimisation passes cost more than they save.
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
    }.items():
        monkeypatch.setenv(var, value)
    km = KernelManager(
        kernel_name="soapbubble-test",
        kernel_spec_manager=KernelSpecManager(
            kernel_dirs=[str(kernels)], ensure_native_kernel=False
        ),
    )
    path = NOTEBOOKS / f"{name}.ipynb"
    committed = hashlib.sha256(path.read_bytes()).hexdigest()
    nb = nbformat.read(path, as_version=4)
    # Raises CellExecutionError (with the traceback) if any cell fails.
    NotebookClient(
        nb, km=km, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    # executed in memory only: the committed full-size outputs are left as they are
    assert hashlib.sha256(path.read_bytes()).hexdigest() == committed
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    return json.loads(out.read_text())


def _regenerate():
    spec = importlib.util.spec_from_file_location("regenerate", NOTEBOOKS / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerate_covers_every_notebook():
    assert _regenerate().ALL == COMMITTED
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(COMMITTED)


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_with_full_size_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert (
        "SOAPBUBBLE_NOTEBOOK_SMALL" in code[0].source
        and "SOAPBUBBLE_NOTEBOOK_OUT" in code[0].source
    )
    regenerate = (
        f"run `python notebooks/regenerate.py {name}` and commit the notebook with its outputs"
    )
    stamp = nb.metadata.get("soapbubble")
    assert stamp is not None, f"{name}.ipynb has no record of a full-size run: {regenerate}"
    assert stamp["code_sha256"] == _regenerate().code_hash(nb), (
        f"{name}.ipynb: its code cells changed since the committed outputs were produced: {regenerate}"
    )
    assert stamp["small"] is False, f"{name}.ipynb holds a small run's outputs: {regenerate}"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{name}.ipynb has error outputs"
    assert all(c.execution_count is not None for c in code), (
        f"{name}.ipynb: a cell never ran: {regenerate}"
    )
    first = "".join(o.get("text", "") for o in code[0].outputs if o.output_type == "stream")
    assert first.startswith("small=False")  # the notebook itself says it ran at full size
    if name in WITH_FIGURES:
        assert any("image/png" in o.get("data", {}) for o in outputs), (
            f"{name}.ipynb shows no figure: {regenerate}"
        )


def test_radial_laws(tmp_path, monkeypatch):
    out = _execute("01_radial_laws", tmp_path, monkeypatch)
    d = out["d"]
    assert d == 100 and out["small"] is True
    moments = {}
    for law in out["laws"]:
        sigma, k, n = law["sigma"], law["k"], law["n"]
        # ||z||_2^2 / (2 sigma^2) ~ Gamma((d - k) / 2): mean and sd of ||z||_2 in closed form.
        mean = (
            sigma * math.sqrt(2) * math.exp(sc.gammaln((d - k + 1) / 2) - sc.gammaln((d - k) / 2))
        )
        sd = math.sqrt(sigma**2 * (d - k) - mean**2)
        moments[(sigma, k)] = (mean, sd)
        assert abs(law["integral"] - 1.0) < 1e-4  # the library's radial density, normalised
        assert abs(law["mean_sample"] - mean) < Z * sd / math.sqrt(n)
        # sd of the sample sd ~ sd * sqrt((kurtosis - 1) / 4n); the law is near normal (kurtosis 3)
        assert abs(law["std_sample"] - sd) < Z * sd * math.sqrt(2.5 / (4 * n))
    # the figure's point: k = 75 halves the mean at about twice the spread of the sigma route
    m75, sd75 = moments[(1.0, 75.0)]
    m0 = moments[(1.0, 0.0)][0]
    sigma_route = [v for (s, k), v in moments.items() if k == 0.0 and abs(s - m75 / m0) < 1e-12]
    assert len(sigma_route) == 1
    assert out["spread_ratio_at_matched_mean"] == pytest.approx(sd75 / sigma_route[0][1], rel=1e-9)
    assert out["spread_ratio_at_matched_mean"] > 1.9


def test_pareto_frontier(tmp_path, monkeypatch):
    out = _execute("02_pareto_frontier", tmp_path, monkeypatch)
    d, r_true, eps, n = out["d"], out["r_true"], out["eps"], out["n"]
    assert (d, r_true, out["lambda"]) == (5, 0.65, 1.0)
    families = {"l2 (eq. 8)", "mixed linf (eq. 9)", "pure linf (eq. 10)"}
    assert {r["family"] for r in out["records"]} == families
    checked = 0
    for r in out["records"]:
        sigma, k = r["sigma"], r["k"]
        if r["family"].startswith("l2"):
            # ||z||_2^2 / (2 sigma^2) ~ Gamma((d - k) / 2)
            acc = sc.gammainc((d - k) / 2, r_true**2 / (2 * sigma**2))
        elif r["family"].startswith("mixed") and k == 0:
            acc = sc.gammainc(
                d / 2, r_true**2 / (2 * sigma**2)
            )  # the mixed family at k = 0 is the Gaussian
        else:
            acc = None
        if acc is not None:
            assert abs(r["accuracy"] - acc) < Z * math.sqrt(acc * (1 - acc) / n) + 1.0 / n
            checked += 1
        if k == 0 and not r["family"].startswith("pure"):
            # Gaussian TV at ||delta||_2 = eps sqrt(d) is 2 Phi(eps sqrt(d) / 2 sigma) - 1;
            # the estimate is a mean of values in [0, 1] (sd <= 1/2)
            tv = 2 * sc.ndtr(eps * math.sqrt(d) / (2 * sigma)) - 1
            assert abs(r["d_theorem"] - tv) < Z * 0.5 / math.sqrt(n)
        if r["d_candidates"] is not None:
            assert (
                r["d_candidates"] >= r["d_theorem"]
            )  # the theorem's delta is among the candidates
        assert 0.0 <= r["robustness"] <= 1.0
    assert checked >= len(out["sigma_grid"]) * (len(out["k_grid"]) + 1)
    assert set(out["winners"]) <= families


def test_radius_curves(tmp_path, monkeypatch):
    out = _execute("03_radius_curves", tmp_path, monkeypatch)
    d, sigma0 = out["d"], out["sigma0"]
    assert d == 3072 and sigma0 == 0.5
    assert out["sigma_l2"] == pytest.approx(
        sigma0 * math.sqrt((d - 1) / (d - 1 - out["k_l2"])), rel=1e-12
    )
    assert out["sigma_mix"] == pytest.approx(
        sigma0 * math.sqrt((d - 1) / (d - 1 - out["k_mix"])), rel=1e-12
    )
    # Corollary 1: the exact dual route with k = 0 is Cohen et al.'s Phi(Phi^-1(p) - r / sigma)
    cor = out["corollary1"]
    p = np.array(cor["p"])
    for r, v in zip(cor["radii"], cor["v_exact"]):
        cohen = scipy.stats.norm.cdf(scipy.stats.norm.ppf(p) - r / sigma0)
        np.testing.assert_allclose(v, cohen, atol=1e-8)
    assert cor["max_abs_dev_exact"] < 1e-8
    assert (
        cor["max_bound_minus_cohen"] <= 1e-12
    )  # the Monte Carlo certificate is never above the truth
    # Gaussian radius tables: sigma Phi^-1(p) (l2) and sigma Phi^-1(p) / sqrt(d) (l_inf, Theorem 3),
    # rounded down to the grid
    for attack, scale in (("l2", 1.0), ("linf", 1.0 / math.sqrt(d))):
        part = out[attack]
        exact = sigma0 * scipy.stats.norm.ppf(np.array(part["p"])) * scale
        got = np.array(part["gaussian"])
        assert np.all(got <= exact) and np.all(got > exact - part["grid_step"] * (1 + 1e-9))
    for attack, fam in (("l2", "l2_family"), ("linf", "l2_family"), ("linf", "mixed_certified")):
        radii = np.array(out[attack][fam])
        assert np.all(radii >= 0) and np.all(np.diff(radii) >= 0)  # R(p) is non-decreasing in p


def test_training_families(tmp_path, monkeypatch):
    import jax
    import soapbubble.data
    import soapbubble.models

    work = tmp_path / "work"
    monkeypatch.setenv("SOAPBUBBLE_NOTEBOOK_WORKDIR", str(work))
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    out = _execute("04_training_families", tmp_path, monkeypatch)
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before  # nothing written into the repository
    d, sigma0, alpha = out["d"], out["sigma0"], out["alpha"]
    assert out["small"] is True and d == 64 and sigma0 == 0.25
    for name, k in (("gaussian", 0.0), ("l2", out["k_l2"]), ("mixed", out["k_mix"])):
        assert out["sigma"][name] == pytest.approx(sigma0 * math.sqrt((d - 1) / (d - 1 - k)), rel=1e-12)
    test = soapbubble.data.load_digits("test")
    labels = np.asarray(out["labels"])
    np.testing.assert_array_equal(labels, test.labels[: out["images"]])

    # Clean accuracy, recomputed here from the saved weights with the flax module itself.
    assert set(out["models"]) == {f"{f}-{o}" for f in ("gaussian", "l2", "mixed") for o in ("noise", "macer")}
    for run, m in out["models"].items():
        assert pathlib.Path(m["model_dir"]).is_relative_to(work)
        loaded = soapbubble.models.load_model(m["model_dir"])
        logits = jax.jit(lambda v, x: loaded.module.apply(v, x, train=False))(loaded.variables, test.images)
        accuracy = float(np.mean(np.argmax(np.asarray(logits), axis=-1) == test.labels))
        assert accuracy == pytest.approx(m["clean_accuracy"], abs=1e-6)
        assert accuracy > 0.3  # chance is 0.1; one epoch reaches 0.5-0.75
        assert (m["macer_weight"] > 0) == (m["objective"] == "macer")

    radii = {"l2": np.asarray(out["radii_l2"]), "linf": np.asarray(out["radii_linf"])}
    np.testing.assert_allclose(radii["linf"], radii["l2"] / math.sqrt(d), rtol=1e-15)
    hits = {}
    for c in out["certifications"]:
        pred, cert = np.asarray(c["prediction"]), np.asarray(c["certified"], dtype=bool)
        p_lower, n_used = np.asarray(c["p_lower"]), np.asarray(c["n_used"])
        assert cert.shape == (len(labels), len(radii["l2"]))
        assert np.all((n_used >= 0) & (n_used <= out["n"]))
        assert not cert[pred == -1].any()  # an abstention certifies nothing
        assert np.all(cert[:, 1:] <= cert[:, :-1])  # a larger ball is certified only inside a smaller one
        assert c["alpha_p"] + c["alpha_d"] == pytest.approx(alpha, rel=1e-12)
        assert c["alpha_d"] == (alpha / 2 if c["noise"] == "mixed" else 0.0)
        assert c["attack"] == ("linf" if c["noise"] == "mixed" else "l2")
        if c["noise"] == "gaussian":
            # Cohen et al.: radius r is certified only if pA's lower bound reaches Phi(r / sigma0)
            need = scipy.stats.norm.cdf(radii["l2"] / sigma0)
            assert np.all(p_lower[:, None] >= np.where(cert, need[None, :], 0.0) - 1e-12)
        else:
            assert np.all(p_lower[cert.any(axis=1)] >= 0.5)
        correct = (pred == labels)[:, None] & cert
        attacks = ("linf",) if c["noise"] == "mixed" else ("l2", "linf")  # Theorem 3 for l2 runs
        for attack in attacks:
            hits[c["model"], c["noise"], attack] = correct.mean(axis=0)
    # The curves are the certificates' certified accuracy: in [0, 1], non-increasing in the radius.
    assert {(c["model"], c["noise"], c["attack"]) for c in out["curves"]} == set(hits)
    for c in out["curves"]:
        acc = np.asarray(c["accuracy"])
        np.testing.assert_allclose(acc, hits[c["model"], c["noise"], c["attack"]], rtol=0, atol=1e-12)
        assert np.all((acc >= 0) & (acc <= 1)) and np.all(np.diff(acc) <= 0)
    # The library's l_inf route for the Gaussian model decides as the l2 run at r sqrt(d) (Theorem 3).
    check = out["theorem3_check"]
    gauss = next(c for c in out["certifications"] if (c["model"], c["noise"]) == ("gaussian-noise", "gaussian"))
    assert check["linf_certified"] == gauss["certified"][: check["images"]]
    assert check["linf_prediction"] == gauss["prediction"][: check["images"]]
