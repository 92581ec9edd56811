"""The one place that decides route, scaling, refusal and α split, and that everyone asks it."""

import math

import jax
import numpy as np
import pytest

import soapbubble
from soapbubble import noise
from soapbubble.bounds import AlphaBudget, dual, worst_case
from soapbubble.bounds import table as table_lib

FAMILIES = {
    "gaussian": noise.Gaussian(0.5),
    "l2": noise.L2Family(0.5, 2.0),
    "mixed_linf": noise.MixedLinf(0.5, 2.0),
    "pure_linf": noise.PureLinf(0.5, 2.0),
}

EXPECTED = {  # (family, attack): (route, scaled) as the paper's theorems say; None = refused
    ("gaussian", "l2"): ("closed_form", False),
    ("gaussian", "linf"): ("closed_form", True),
    ("l2", "l2"): ("exact", False),
    ("l2", "linf"): ("exact", True),
    ("mixed_linf", "linf"): ("monte_carlo", False),
    ("mixed_linf", "l2"): None,
    ("pure_linf", "l2"): None,
    ("pure_linf", "linf"): None,
}


@pytest.mark.parametrize("name,attack", sorted(EXPECTED))
def test_every_pair_has_one_rule(name, attack):
    family, want = FAMILIES[name], EXPECTED[name, attack]
    if want is None:
        with pytest.raises(ValueError, match="no worst-case perturbation is proven") as refused:
            worst_case(family, attack)
        # Every entry point refuses with the resolver's own words.
        for call in (
            lambda: table_lib.radius_table(jax.random.key(0), family, 8, attack, n_samples=10),
            lambda: dual.ratio_statistics(jax.random.key(0), family, 8, attack, 10),
            lambda: soapbubble.cached_radius_table(family, 8, attack),
            lambda: soapbubble.certify(jax.random.key(0), lambda b: b[:, :2], np.zeros(8, np.float32), family,
                                       attack=attack),
        ):
            with pytest.raises(ValueError) as e:
                call()
            assert str(e.value) == str(refused.value)
        return
    rule = worst_case(family, attack)
    assert (rule.route, rule.scaled) == want
    assert rule.radius_scale(64) == (8.0 if want[1] else 1.0)
    budget = rule.alpha_budget(0.001)
    assert isinstance(budget, AlphaBudget) and budget.alpha_p + budget.alpha_d == pytest.approx(0.001)
    assert budget.alpha_d == (0.0005 if rule.monte_carlo else 0.0)


def test_alpha_budget_refuses_a_table_that_takes_everything():
    rule = worst_case(FAMILIES["mixed_linf"], "linf")
    assert rule.alpha_budget(0.01, 0.002) == AlphaBudget(0.01, 0.008, 0.002)
    with pytest.raises(ValueError, match="alpha must exceed the radius table's failure probability"):
        rule.alpha_budget(0.001, 0.001)


def test_sampler_tv_only_where_the_sampler_approximates():
    assert worst_case(FAMILIES["gaussian"], "l2").sampler_tv(FAMILIES["gaussian"], 64) == 0.0
    tv = worst_case(FAMILIES["mixed_linf"], "linf").sampler_tv(FAMILIES["mixed_linf"], 64)
    assert 0.0 < tv < 1e-4


def test_unknown_attack_and_family():
    with pytest.raises(ValueError, match="attack must be 'l2' or 'linf'"):
        worst_case(FAMILIES["gaussian"], "l1")
    with pytest.raises(TypeError, match="soapbubble.noise family"):
        worst_case(object(), "l2")


def test_theorem3_scaling_is_the_l2_table_at_r_sqrt_d():
    # Independent route: the closed form Phi(r sqrt(d) / sigma) (Theorem 3 + Corollary 1).
    import scipy.special

    d, sigma = 16, 0.5
    radii = np.linspace(0, 0.2, 11)
    linf = table_lib.radius_table(None, noise.Gaussian(sigma), d, "linf", radii=radii)
    assert np.all(linf.p_min >= scipy.special.ndtr(radii * math.sqrt(d) / sigma))
    np.testing.assert_allclose(linf.p_min, scipy.special.ndtr(radii * math.sqrt(d) / sigma), rtol=1e-14)
