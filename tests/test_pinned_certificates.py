"""Certificates pinned from soapbubble 0.1.0 (before the protocol moved to soapbubble.protocol).

The same key must give the same certificates: the counts and predictions exactly,
and the radii exactly for the closed-form and exact routes (the Monte Carlo route's
radii depend on its table, which is rebuilt small here). The values were
printed by 0.1.0's ``soapbubble.certify.certify`` on this input; they are a
regression guard, not a correctness argument (tests/test_certify.py has those).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soapbubble import certify, noise
from soapbubble.bounds import table as table_lib

_W = np.array([1.0, -0.5, 0.25, 0.0, 0.5, -1.0, 0.75, 0.1])
_W = _W / np.linalg.norm(_W)

PINNED = {
    ("gaussian", "l2"): ([-1, 1, 1, 0], [1054, 1521, 1921, 1873], [0.0, 0.15, 0.39749999999999996, 0.345]),
    ("l2", "l2"): ([1, 1, 1, 0], [1098, 1514, 1910, 1838],
                   [0.0045, 0.1485, 0.39599999999999996, 0.32399999999999995]),
    ("gaussian", "linf"): ([-1, 1, 1, 0], [1054, 1521, 1921, 1873],
                           [0.0, 0.05303300858899106, 0.14053747276082632, 0.12197591975467943]),
    ("mixed_linf", "linf"): ([-1, 1, 1, 0], [1073, 1462, 1919, 1845],
                             [0.0, 0.038183766184073556, 0.13682516215959692, 0.10818733752154175]),
}

FAMILIES = {
    "gaussian": noise.Gaussian(0.25),
    "l2": noise.L2Family(0.3, 2.0),
    "mixed_linf": noise.MixedLinf(0.3, 2.0),
}


@pytest.mark.parametrize("name,attack", sorted(PINNED))
def test_same_key_same_certificates_as_0_1_0(name, attack, tmp_path):
    w = jnp.asarray(_W, jnp.float32)
    f = lambda b: jnp.stack([-(b @ w), b @ w, 0.3 * b[:, 0]], axis=-1)
    xs = jnp.stack([w * t for t in (0.05, 0.2, 0.5, -0.4)])
    table = None
    if name == "mixed_linf":
        # 0.1.0's default Monte Carlo table (1e6 samples) is slow to rebuild; predictions and counts
        # do not depend on the table, so a small one serves (its radii are not pinned).
        table = table_lib.radius_table(jax.random.key(0), FAMILIES[name], 8, attack, n_samples=20_000,
                                       alpha_d=0.0005)
    cert = certify(jax.random.key(7), f, xs, FAMILIES[name], attack=attack, n0=100, n=2000, alpha=0.001,
                   batched=True, table_dir=tmp_path, table=table)
    prediction, counts, radii = PINNED[name, attack]
    assert cert.prediction.tolist() == prediction
    assert cert.count.tolist() == counts
    if name != "mixed_linf":
        assert cert.radius.tolist() == radii
