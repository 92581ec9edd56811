"""certify and predict give identical results on 1, 2 and 4 devices.

Each device count runs in its own process, with CPU devices forced by
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the flag must be set
before jax starts). The three processes run at once and print their results as
JSON; the test compares every field of every certificate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

COUNTS = (1, 2, 4)

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from soapbubble import counting, protocol as C, noise

    want = int(sys.argv[1])
    assert jax.local_device_count() == want, jax.devices()
    assert counting.local_mesh().size == want

    d = 16
    w = np.random.default_rng(7).normal(size=d)
    w /= np.linalg.norm(w)
    wj = jnp.asarray(w, jnp.float32)

    def logits_fn(b):
        s = b @ wj
        return jnp.stack([-s, s, 0.3 * b[:, 0]], axis=-1)   # three classes

    x = np.stack([s * w + 0.1 * np.roll(w, 3) for s in (0.3, -0.2, 0.02, 0.0)]).astype(np.float32)
    key = jax.random.key(123)
    table_dir = sys.argv[2]
    out = {}
    # n = 2345 is not a multiple of the chunk (50) nor of devices x chunks per step;
    # n0 = 400 makes the n0 and n loops one program for every device count (compile time).
    cert = C.certify(key, logits_fn, x, noise.Gaussian(0.5), n0=400, n=2345, batch_size=100,
                     table_dir=table_dir, batched=True)
    out["gaussian"] = [np.asarray(v).tolist() for v in cert]
    out["predict"] = C.predict(key, logits_fn, x, noise.Gaussian(0.5), n=2345, batch_size=100,
                               batched=True).tolist()
    # The sequential route: one pool per device, rows in contiguous blocks.
    from soapbubble import sequential
    seq = sequential.certify_radii(key, logits_fn, x, noise.Gaussian(0.5), np.array([0.1, 0.3]), max_n=3000,
                                   batch_size=100, table_dir=table_dir)
    out["sequential"] = [np.asarray(v).tolist() for v in seq]
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    table_dir = tmp_path_factory.mktemp("tables")
    procs = {}
    for count in COUNTS:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
        ).strip()
        env["JAX_PLATFORMS"] = "cpu"
        # Separate table directories: the processes run at once.
        folder = table_dir / str(count)
        procs[count] = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(count), str(folder)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
    out = {}
    for count, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{count} devices failed:\n{stderr[-3000:]}"
        line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
        out[count] = json.loads(line[len("RESULT "):])
    return out


@pytest.mark.parametrize("count", COUNTS[1:])
def test_identical_across_device_counts(results, count):
    assert results[count] == results[1]


def test_results_are_not_degenerate(results):
    # The comparison means something only if the certificates differ between inputs.
    prediction, _, p_lower, counts, n, alpha_p, alpha_d = results[1]["gaussian"][:7]
    assert (alpha_p, alpha_d) == (0.001, 0.0)
    assert prediction[:2] == [1, 0] and -1 in prediction
    assert all(0 < c <= 2345 for c in counts) and n == [2345] * 4
    assert len(set(p_lower)) == 4
    assert results[1]["predict"][:2] == [1, 0]
    sequential = results[1]["sequential"]
    assert sequential[0][:2] == [1, 0] and len(set(sequential[2])) > 1  # predictions; n_used differ
