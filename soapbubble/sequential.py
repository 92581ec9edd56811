"""Sequential certification: each input takes as few samples as its pA allows.

Cohen et al. spend a fixed ``n`` on every input. Here the counts are looked at
after every chunk of 50 samples through an anytime-valid confidence sequence
(the beta-binomial mixture of :mod:`soapbubble.bounds.confidence`, prior
``Beta(1, 1)``), and an input stops as soon as every target radius is decided,
at the same failure probability (``../shared/design/SEQUENTIAL.md`` has the
math):

* **certified** at ``r_j``: the sequence's lower end reaches the threshold
  ``q_j = p_min(r_j)`` of the family's radius table (plus the sampler's
  total-variation bound);
* **not certified**: its upper end falls below ``q_j``;
* **futile**: even ``max_n`` successes in a row could not reach ``q_j``.

One sequence serves all radii and all looks (Ville's inequality), so no union
bound is paid over radii or looks. Abstention is the threshold 1/2 decided "not
certified". Class selection uses ``n0`` separate samples, as in
:func:`soapbubble.certify`, with the same keys: for input ``i``, ``(k_select,
k_estimate) = split(fold_in(key, i))`` and estimation chunk ``j`` is drawn with
``chunk_key(k_estimate, j)``. An input that runs to ``n = max_n`` therefore sees
exactly the samples ``certify(..., n=max_n)`` sees.

The loop
--------
One compiled ``lax.while_loop`` per device holds a pool of ``batch_size // 50``
slots. Each step every active slot draws one chunk of noise for its own input
(selection chunks first, then estimation chunks), the model runs once on the
stacked batch, the counts and decisions update, and a slot whose input is
decided takes the next undecided input, without a host round trip; the batch
stays full until the last inputs. Rows are split into contiguous blocks over
the local devices (``shard_map``). Noise for input ``i``, chunk ``j`` depends only
on ``(key, i, j)`` and an input's stopping rule only on its own counts, so the
results do not depend on the pool size, the batch size or the device count.

Soundness does not rest on the float32 arithmetic of the loop: the loop only
decides when to stop and records, for each threshold it certified, the counts
at that look; the host then re-checks every certified threshold with the
float64 mixture (:func:`~soapbubble.bounds.confidence.mixture_excludes`) and
reports ``p_lower`` as the largest float64 lower end over those looks and the
stop (the running maximum of an anytime-valid sequence is valid).

The number of rows is padded to a power of two (at least the pool), and radii
and rows are traced, so new inputs, a new number of rows in the same bucket, or
new radii values of the same count compile nothing new.

Bilateral (``bilateral=True``; Appendix D, :mod:`soapbubble.protocol`)
-----------------------------------------------------------------------
The same estimation samples also bound every other class from above: the slots
count every class, and :meth:`~soapbubble.bounds.WorstCase.bilateral_budget`
splits ``alpha_p`` into ``alpha_a`` for the mixture sequence on ``pA`` and
``alpha_b`` for the sequence on EACH of the ``C - 1`` other classes (a union bound
over ``C`` anytime-valid sequences; their largest upper end is the one at the
largest other count). On that event every look holds at once, so the best lower
end and the least upper end over the looks are valid together. Radius ``r`` is
certified when the unilateral threshold is reached (now at ``alpha_a``) or the
table's bilateral condition holds,
``table.bilateral_radius(p_lower, p_upper) >= r``; the input abstains unless
``p_lower >= 1/2`` or ``p_lower > p_upper``; the certificate records
``p_upper`` and the split (``budget.as_dict(BILATERAL_CONSTRUCTION)``). In the loop both bounds are
located on the table's p grid by bisection in float32 and compared with V of
each target radius (rounded against certifying); a radius is refuted only when
neither rule can still certify it (the condition fails with pA at its upper end
and the runner-up at its lower end, or even with ``max_n`` unanimous votes). As
in the unilateral mode, the float64 bounds on the host decide
(:func:`bilateral_bounds`): the loop only chose when to stop. Unilateral calls
run the loop as before (``bilateral`` is static), bit for bit.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from soapbubble import noise, certify_radii
  >>> w = jnp.ones(4) / 2.0
  >>> f = lambda b: jnp.stack([-(b @ w), b @ w], axis=-1)
  >>> xs = jnp.stack([jnp.full(4, 0.5), jnp.full(4, 0.05)])    # distances 1.0 and 0.1
  >>> c = certify_radii(jax.random.key(0), f, xs, noise.Gaussian(0.25), np.array([0.25, 0.5]),
  ...                   max_n=20_000)
  >>> c.prediction.tolist(), c.certified.tolist()
  ([1, 1], [[True, True], [False, False]])
  >>> bool(c.n_used[0] < 2_000)                                 # decided early
  True
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from soapbubble import _validation as check
from soapbubble import counting, protocol
from soapbubble.bounds import confidence
from soapbubble.bounds import table as table_lib
from soapbubble.bounds.rules import BilateralBudget
from soapbubble.counting import CHUNK

__all__ = ["BILATERAL_CONSTRUCTION", "RadiiCertificate", "certify_radii", "certify_adaptive", "thresholds"]

# In-loop decisions need this much more evidence (in log M) than the level asks, so
# that the float32 loop never stops on a decision the float64 check would refuse.
_LOOP_MARGIN = 0.05
# Decision codes per threshold.
_OPEN, _YES, _NO = 0, 1, 2

#: How a sequential bilateral certificate bounds the classes (recorded with its split).
BILATERAL_CONSTRUCTION = (
    "beta-binomial mixture confidence sequences (prior Beta(1, 1), anytime-valid): lower bound on pA at"
    " alpha_a; upper bound at alpha_b on each of the num_classes - 1 other classes (union bound), from the"
    " same estimation samples"
)


class RadiiCertificate(NamedTuple):
    """The outcome of :func:`certify_radii` (numpy arrays; ``rows`` inputs, ``m`` radii).

    Attributes:
      prediction: int32 ``(rows,)``, the certified class, ``-1`` = abstain.
      certified: bool ``(rows, m)``: the smoothed classifier provably returns
        ``prediction`` everywhere in the ball of radius ``radii[j]``.
      n_used: int64 ``(rows,)``, estimation samples spent (the ``n0`` selection
        samples come on top).
      p_lower: float64 ``(rows,)``, the anytime-valid lower bound on ``pA`` at the
        stop (at level ``alpha_p``, or the split's ``alpha_a`` when bilateral, less
        the sampler's total-variation bound).
      radii: float64 ``(m,)``, the target radii.
      alpha_p: float, the level of the confidence sequences (all of them together
        with ``bilateral=True``).
      alpha_d: float, the radius table's failure probability.
      p_upper: bilateral certificates only (None otherwise), float64 ``(rows,)``:
        the anytime-valid upper bound on the probability of every class other than
        ``prediction``'s, ``min(pB_upper, 1 - p_lower)``, at the stop.
      bilateral: bilateral certificates only (None otherwise), how ``alpha_p`` was
        split, as :attr:`soapbubble.protocol.Certificate.bilateral`
        (``budget.as_dict(BILATERAL_CONSTRUCTION)["bilateral"]``: the split of
        :meth:`~soapbubble.bounds.WorstCase.bilateral_budget`, this route's construction).
    """

    prediction: Any
    certified: Any
    n_used: Any
    p_lower: Any
    radii: Any
    alpha_p: float
    alpha_d: float
    p_upper: Any = None
    bilateral: Any = None


def thresholds(table: table_lib.RadiusTable, radii: np.ndarray) -> np.ndarray:
    """``p_min`` of each target radius: that of the smallest grid radius ``>= r`` (``inf`` past the grid).

    Certifying a larger grid radius certifies ``r``, so rounding the radius up to
    the grid rounds the threshold up: sound.
    """
    i = np.searchsorted(table.radii, radii, side="left")
    inside = i < table.radii.size
    return np.where(inside, table.p_min[np.minimum(i, table.radii.size - 1)], np.inf)


def _check_radii(radii: Any) -> np.ndarray:
    try:
        r = np.asarray(radii, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"radii must be a 1-D array of numbers, got {radii!r}") from e
    if r.ndim != 1 or r.size < 1:
        raise ValueError(f"radii must be a non-empty 1-D array, got shape {r.shape}")
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        bad = r[~(np.isfinite(r) & (r >= 0))][0]
        raise ValueError(f"radii must be finite and >= 0, got {bad!r}")
    if np.any(np.diff(r) <= 0):
        raise ValueError(f"radii must be strictly increasing, got {r.tolist()}")
    return r


# --------------------------------------------------------------------------- in-loop statistics


def _stirling_tail(x):
    """``log x! - (x log x - x + log(2 pi x) / 2)`` for x >= 1 (float32, no cancellation for large x)."""
    small = x < 16
    xs = jnp.where(small, x, 16.0)
    exact = lax.lgamma(xs + 1.0) - (xs * jnp.log(xs) - xs + 0.5 * jnp.log(2 * jnp.pi * xs))
    xl = jnp.maximum(x, 1.0)
    series = 1.0 / (12.0 * xl) - 1.0 / (360.0 * xl**3)
    return jnp.where(small, exact, series)


def log_mixture32(s, t, q, qc):
    """``log M_t(q)`` of the Beta(1, 1) mixture in float32, as ``t KL(s/t || q)`` plus small terms.

    The direct form ``log B(1 + s, 1 + t - s) - s log q - (t - s) log(1 - q)``
    cancels terms of size ``t log t``; this form keeps float32 accurate to ~1e-2
    absolute for ``t <= 2**24`` (tests compare it with scipy in float64). ``qc``
    is ``1 - q`` computed in float64, so thresholds near 1 keep their precision.
    """
    s = s.astype(jnp.float32)
    t = t.astype(jnp.float32)
    q = q.astype(jnp.float32)
    qc = qc.astype(jnp.float32)
    f = t - s
    d = t * qc - f  # = s - t q = t (p_hat - q), exact in the form that matters near q = 1
    kl = (jnp.where(s > 0, s * jnp.log1p(d / jnp.maximum(t * q, 1e-30)), 0.0)
          + jnp.where(f > 0, f * jnp.log1p(-d / jnp.maximum(t * qc, 1e-30)), 0.0))
    inner = (s > 0) & (f > 0)
    sc, fc = jnp.maximum(s, 1.0), jnp.maximum(f, 1.0)
    corr = jnp.where(
        inner,
        0.5 * jnp.log(2 * jnp.pi * sc * fc / t) - _stirling_tail(t) + _stirling_tail(sc) + _stirling_tail(fc),
        0.0,
    )
    return kl - jnp.log1p(t) + corr


def _decide(s, t, q, qc, log_level, max_n):
    """Per-threshold decisions after ``s`` of ``t`` (broadcast ``(P, 1)`` against ``q`` ``(m,)``)."""
    need = log_level + _LOOP_MARGIN
    f = (t - s).astype(jnp.float32)
    above = t.astype(jnp.float32) * qc >= f  # s / t >= q
    strong = log_mixture32(s, t, q, qc) >= need
    yes = above & strong & (t > 0)
    no = ~above & strong & (t > 0)
    # Futility: max_n successes in a row from here would still not certify q.
    rest = max_n - t
    top = jnp.broadcast_to(max_n, t.shape)
    best = log_mixture32(s + rest, top, q, qc)
    futile = ~((top.astype(jnp.float32) * qc >= f) & (best >= need))
    yes = yes & jnp.isfinite(q)
    return jnp.where(yes, _YES, jnp.where(no | futile | ~jnp.isfinite(q), _NO, _OPEN)).astype(jnp.int8)


class _Grid(NamedTuple):
    """The bilateral condition in the loop (float32, traced: new radii compile nothing new).

    ``g`` is the table's p grid plus the sampler's TV bound (``gc = 1 - g``, from
    float64); ``v[i, j]`` is ``V`` of target ``j`` at grid point ``i`` rounded down,
    ``w[i, j]`` is ``1 - V`` rounded up (column 0: radius 0, ``V_0(p) = p``, the
    abstention test ``p_lower > p_upper``).
    """

    g: Any
    gc: Any
    v: Any
    w: Any
    log_level_b: Any


def _grid_index(s, t, g, gc, need, upper):
    """The largest grid index ``i`` with ``g[i]`` at or below the lower end of the sequence
    after ``s`` of ``t`` (``upper`` False: ``g[i]`` excluded from below) or at or below its
    upper end (``upper`` True: ``g[i]`` not excluded from above); all arguments broadcast.
    Index 0 always qualifies. Either predicate holds on a prefix of the grid (``log M_t`` is
    convex with its minimum at ``s / t``): one bisection."""
    s, t, need, upper = jnp.broadcast_arrays(s, t, need, upper)
    f = (t - s).astype(jnp.float32)
    tf = t.astype(jnp.float32)

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi + 1) // 2
        q, qc = g[mid], gc[mid]
        above = tf * qc >= f  # s / t >= q
        strong = log_mixture32(s, t, q, qc) >= need
        ok = jnp.where(upper, above | ~strong, above & strong) & (qc > 0) & (lo < hi)
        return jnp.where(ok, mid, lo), jnp.where(ok | (lo >= hi), hi, mid - 1)

    size = g.shape[0]
    start = (jnp.zeros(s.shape, jnp.int32), jnp.full(s.shape, size - 1, jnp.int32))
    return lax.fori_loop(0, max(size - 1, 1).bit_length(), body, start)[0]


def _decide_bilateral(uni, s, other, t, log_level, max_n, grid: _Grid):
    """The unilateral decisions ``uni`` ``(P, m)`` combined with the bilateral condition (counts ``(P,)``).

    Certified when either holds (the host takes the better, as :func:`soapbubble.certify`);
    refuted only when both are: the unilateral rule's "no", and the condition failing at
    the sequences' far ends (pA at its upper end, the runner-up at its lower end) or at the
    best ``max_n`` can still bring (every remaining sample for A). ``other`` is the largest
    count of another class; ``1 - pB`` is bounded from its complement ``t - other``, and
    every other class is at most ``1 - pA`` too (the cap of :func:`soapbubble.certify`).
    """
    need_a, need_b = log_level + _LOOP_MARGIN, grid.log_level_b + _LOOP_MARGIN
    top = jnp.broadcast_to(max_n, t.shape)
    # Three (pA, 1 - pB) pairs in one bisection: lower ends now, upper ends now, lower ends at max_n.
    counts = jnp.stack([s, t - other, s, t - other, s + (max_n - t), top - other])
    totals = jnp.stack([t, t, t, t, top, top])
    need = jnp.array([need_a, need_b] * 3)[:, None]
    upper = jnp.array([False, False, True, True, False, False])[:, None]
    i = _grid_index(counts, totals, grid.g, grid.gc, need, upper)

    def holds(a, b):  # V_r(pA) > 1 - V_r(1 - pB) on the grid; pB <= 1 - pA caps the runner-up
        return grid.v[a] > grid.w[jnp.maximum(a, b)]

    yes = holds(i[0], i[1])
    no = ~holds(i[2], i[3]) | ~holds(i[4], i[5])
    return jnp.where((uni == _YES) | yes, _YES, jnp.where((uni == _NO) & no, _NO, _OPEN)).astype(jnp.int8)


# --------------------------------------------------------------------------- the loop


class _Loop(NamedTuple):
    """Static configuration of the compiled pool loop."""

    static: Any
    mesh: Any
    pool: int
    num_classes: int
    n0_chunks: int
    slack: int
    bilateral: bool = False


@functools.partial(jax.jit, static_argnames=("cfg",))
def _run(key, xs, ids, rows, family, q, qc, log_level, n0, max_n, arrays, grid, *, cfg: _Loop):
    """The pool loop on every device; returns per-row arrays (device-sharded by rows).

    With ``cfg.bilateral`` (``grid`` a :class:`_Grid`, else None) the slots also count every
    class, decide the bilateral condition too, and return the largest other count at the
    stop and at each certified threshold's look.
    """
    m = q.shape[0]
    C = cfg.num_classes

    def local(key, xs, ids, rows, family, q, qc, log_level, n0, max_n, arrays, grid):
        dev = lax.axis_index(counting._AXIS)
        L = xs.shape[0]
        first = dev * L
        mine = jnp.clip(rows - first, 0, L)  # valid local rows
        logits_fn = counting.Classifier(cfg.static, arrays).rebuild()
        pool = cfg.pool
        slots = jnp.arange(pool)

        def fresh(next_row):
            """Assignments for slots taking rows next_row + rank."""
            return jnp.where(next_row + slots < mine, next_row + slots, -1)

        init = dict(
            row=fresh(0),
            chunk=jnp.zeros(pool, jnp.int32),
            sel=jnp.zeros((pool, C + 1), jnp.int32),
            top=jnp.zeros(pool, jnp.int32),
            s=jnp.zeros(pool, jnp.int32),
            t=jnp.zeros(pool, jnp.int32),
            bad=jnp.zeros(pool, jnp.int32),
            status=jnp.zeros((pool, m), jnp.int8),
            dec_s=jnp.zeros((pool, m), jnp.int32),
            dec_t=jnp.zeros((pool, m), jnp.int32),
            next=jnp.minimum(jnp.int32(pool), mine),
            out_top=jnp.full(L, -1, jnp.int32),
            out_s=jnp.zeros(L, jnp.int32),
            out_t=jnp.zeros(L, jnp.int32),
            out_bad=jnp.zeros(L, jnp.int32),
            out_status=jnp.zeros((L, m), jnp.int8),
            out_dec_s=jnp.zeros((L, m), jnp.int32),
            out_dec_t=jnp.zeros((L, m), jnp.int32),
        )
        if cfg.bilateral:  # estimation counts of every class, and the largest other one
            init.update(cls=jnp.zeros((pool, C), jnp.int32), dec_b=jnp.zeros((pool, m), jnp.int32),
                        out_b=jnp.zeros(L, jnp.int32), out_dec_b=jnp.zeros((L, m), jnp.int32))

        def active(st):
            return jnp.any(st["row"] >= 0)

        def step(st):
            row = st["row"]
            live = row >= 0
            safe = jnp.where(live, row, 0)
            selecting = st["chunk"] < cfg.n0_chunks
            j = jnp.where(selecting, st["chunk"], st["chunk"] - cfg.n0_chunks)

            def slot_key(r, sel, j):
                k_select, k_estimate = jax.random.split(jax.random.fold_in(key, ids[r]))
                return counting.chunk_key(lax.select(sel, k_select, k_estimate), j)

            keys = jax.vmap(slot_key)(safe, selecting, j)
            batch = counting.noisy_chunks(keys, xs[safe], family)
            v = counting.votes(logits_fn(batch), C).reshape(pool, CHUNK, C + 1)
            idx = j[:, None] * CHUNK + jnp.arange(CHUNK)[None, :]
            limit = jnp.where(selecting, n0, max_n)
            valid = (idx < limit[:, None]) & live[:, None]
            counts = jnp.sum(v & valid[:, :, None], axis=1, dtype=jnp.int32)  # (pool, C + 1)
            sel = st["sel"] + jnp.where(selecting[:, None], counts, 0)
            becomes = selecting & (st["chunk"] + 1 == cfg.n0_chunks)
            top = jnp.where(becomes, jnp.argmax(sel[:, :C], axis=-1).astype(jnp.int32), st["top"])
            est = ~selecting & live
            hits = jnp.take_along_axis(counts, st["top"][:, None], axis=1)[:, 0]
            s = st["s"] + jnp.where(est, hits, 0)
            t = st["t"] + jnp.where(est, jnp.sum(valid, axis=1, dtype=jnp.int32), 0)
            bad = st["bad"] + counts[:, C]

            new = _decide(s[:, None], t[:, None], q[None, :], qc[None, :], log_level, max_n)
            if cfg.bilateral:
                cls = st["cls"] + jnp.where(est[:, None], counts[:, :C], 0)
                other = jnp.max(jnp.where(jnp.arange(C)[None, :] == st["top"][:, None], -1, cls), axis=1)
                new = _decide_bilateral(new, s, other, t, log_level, max_n, grid)
            open_ = st["status"] == _OPEN
            status = jnp.where(est[:, None] & open_, new, st["status"])
            just = est[:, None] & open_ & (new == _YES)
            dec_s = jnp.where(just, s[:, None], st["dec_s"])
            dec_t = jnp.where(just, t[:, None], st["dec_t"])
            reset_extra = {}
            if cfg.bilateral:
                dec_b = jnp.where(just, other[:, None], st["dec_b"])
                reset_extra = dict(cls=cls, dec_b=dec_b)
            undecided = jnp.sum(status == _OPEN, axis=1)
            done = live & ((est & (undecided <= cfg.slack)) | (t >= max_n) | (bad > 0))

            # Write finished rows, then hand their slots the next rows.
            where = jnp.where(done, row, L)  # L: out of bounds, dropped
            out = {
                "out_top": st["out_top"].at[where].set(top, mode="drop"),
                "out_s": st["out_s"].at[where].set(s, mode="drop"),
                "out_t": st["out_t"].at[where].set(t, mode="drop"),
                "out_bad": st["out_bad"].at[where].set(bad, mode="drop"),
                "out_status": st["out_status"].at[where].set(status, mode="drop"),
                "out_dec_s": st["out_dec_s"].at[where].set(dec_s, mode="drop"),
                "out_dec_t": st["out_dec_t"].at[where].set(dec_t, mode="drop"),
            }
            if cfg.bilateral:
                out.update(out_b=st["out_b"].at[where].set(other, mode="drop"),
                           out_dec_b=st["out_dec_b"].at[where].set(dec_b, mode="drop"))
            rank = jnp.cumsum(done) - 1
            take = st["next"] + rank
            new_row = jnp.where(done, jnp.where(take < mine, take, -1), row)
            nxt = st["next"] + jnp.sum(done)
            reset = lambda a, zero: jnp.where(  # noqa: E731
                done.reshape((-1,) + (1,) * (a.ndim - 1)), zero, a)
            return dict(
                row=new_row,
                chunk=reset(st["chunk"] + 1, 0),
                sel=reset(sel, 0),
                top=reset(top, 0),
                s=reset(s, 0),
                t=reset(t, 0),
                bad=reset(bad, 0),
                status=reset(status, jnp.int8(_OPEN)),
                dec_s=reset(dec_s, 0),
                dec_t=reset(dec_t, 0),
                next=jnp.minimum(nxt, mine),
                **{k: reset(v, 0) for k, v in reset_extra.items()},
                **out,
            )

        st = lax.while_loop(active, step, init)
        names = ("top", "s", "t", "bad", "status", "dec_s", "dec_t") + (("b", "dec_b") if cfg.bilateral else ())
        return tuple(st["out_" + k] for k in names)

    rep, sharded = P(), P(counting._AXIS)
    return jax.shard_map(
        local, mesh=cfg.mesh,
        in_specs=(rep, sharded, sharded, rep, rep, rep, rep, rep, rep, rep, rep, rep),
        out_specs=(sharded,) * (9 if cfg.bilateral else 7),
        # Every device runs its own pool and no collective: nothing to check across devices.
        check_vma=False,
    )(key, xs, ids, rows, family, q, qc, log_level, n0, max_n, arrays, grid)


def _bucket(rows: int, n_dev: int, pool: int) -> int:
    """Rows per device, padded to a power of two (at least the pool)."""
    per = -(-rows // n_dev)
    return max(pool, 1 << max(per - 1, 0).bit_length())


def _round32(x: np.ndarray, up: bool) -> np.ndarray:
    """float64 to float32, rounded up or down (never to the other side of ``x``)."""
    x32 = x.astype(np.float32)
    wrong = x32 < x if up else x32 > x
    return np.where(wrong, np.nextafter(x32, np.float32(np.inf if up else -np.inf)), x32)


def _grid(table: table_lib.RadiusTable, radii: np.ndarray, sampler_tv: float, log_level_b: float) -> _Grid:
    """The loop's view of the bilateral condition at the abstention threshold and each target radius.

    Target ``r`` takes the V of the smallest grid radius ``>= r`` (a larger radius
    certifies ``r``, and its V is lower: rounding up is sound); past the grid, V = 0.
    """
    i = np.searchsorted(table.radii, radii, side="left")
    inside = i < table.radii.size
    v = np.where(inside[:, None], table.v[np.minimum(i, table.radii.size - 1)], 0.0)
    v = np.concatenate([table.v_p[None, :], v]).T  # (grid, 1 + m); V_0(p) = p: abstention
    g = table.v_p + sampler_tv
    return _Grid(jnp.asarray(g, jnp.float32), jnp.asarray(1.0 - g, jnp.float32),
                 jnp.asarray(_round32(v, up=False)), jnp.asarray(_round32(1.0 - v, up=True)),
                 np.float32(log_level_b))


def _at_looks(bound, count: np.ndarray, n: np.ndarray, mask: np.ndarray, alpha: float, empty: float) -> np.ndarray:
    """``bound(count, n, alpha)`` where ``mask`` (``empty`` elsewhere), once per distinct look."""
    out = np.full(count.shape, empty)
    if np.any(mask):
        looks, back = np.unique(np.stack([count[mask], n[mask]], axis=-1), axis=0, return_inverse=True)
        out[mask] = bound(looks[:, 0], looks[:, 1], alpha)[back.reshape(-1)]
    return out


def bilateral_bounds(count, other, n, dec_count, dec_other, dec_n, decided, budget: BilateralBudget,
                     sampler_tv: float) -> tuple[np.ndarray, np.ndarray]:
    """``(p_lower, p_upper)`` of a sequential bilateral certificate, float64 on the host.

    The anytime-valid counterpart of :func:`soapbubble.protocol.bilateral_bounds`: the
    mixture sequence's lower end on ``pA`` at ``budget.alpha_a`` and its upper end on each
    of the ``C - 1`` other classes at ``budget.alpha_b`` (their largest: the one at the
    largest count), all valid at every look at once (Ville; union bound over the ``C``
    sequences). So the best lower end and the least upper end over the stop and the
    looks that certified a threshold are valid together, and ``pB <= 1 - pA`` caps
    ``p_upper``. The sampler's TV bound is charged to both.

    Args:
      count, other, n: ``(rows,)`` counts at the stop: the selected class, the largest
        other class, the estimation samples (``n = 0``: no bound).
      dec_count, dec_other, dec_n: ``(rows, m)`` the same at each threshold's certifying look.
      decided: ``(rows, m)`` bool, which looks to use.
      budget: the split (:meth:`~soapbubble.bounds.WorstCase.bilateral_budget`).
      sampler_tv: the sampler's total-variation bound.

    Example:
      >>> from soapbubble import noise, worst_case
      >>> b = worst_case(noise.Gaussian(0.5), "l2").bilateral_budget(0.001, 3)
      >>> z = np.zeros((1, 1), np.int64)
      >>> lo, up = bilateral_bounds(np.array([700]), np.array([150]), np.array([1000]), z, z, z,
      ...                           z.astype(bool), b, 0.0)
      >>> bool(0.6 < lo[0] < 0.7 < 1 - up[0]), bool(0.15 < up[0] < 0.3)
      (True, True)
    """
    ran, decided = n > 0, np.asarray(decided, bool)
    low = np.maximum(_at_looks(confidence.mixture_lower, count, n, ran, budget.alpha_a, 0.0),
                     _at_looks(confidence.mixture_lower, dec_count, dec_n, decided, budget.alpha_a, 0.0).max(axis=1))
    p_lower = confidence.subtract_down(low, sampler_tv)
    cap = confidence.one_minus_up(p_lower)  # every other class has pB <= 1 - pA <= 1 - p_lower
    if budget.num_classes == 2:  # pB = 1 - pA: no bound of its own
        return p_lower, cap
    up = np.minimum(_at_looks(confidence.mixture_upper, other, n, ran, budget.alpha_b, 1.0),
                    _at_looks(confidence.mixture_upper, dec_other, dec_n, decided, budget.alpha_b, 1.0).min(axis=1))
    return p_lower, np.minimum(confidence.add_up(up, sampler_tv), cap)


def _sequential(key, logits_fn, xs, family, radii_for, *, attack, n0, max_n, alpha, batch_size, table,
                table_dir, slack, row_ids, bilateral=False):
    """Shared by certify_radii and certify_adaptive: checks, runs the loop, checks decisions on the host."""
    n0 = check.count(n0, "n0")
    max_n = check.count(max_n, "max_n")
    if max_n > 2**24:
        raise ValueError(f"max_n must be <= {2**24} (exact float32 counts in the loop), got {max_n}")
    bilateral = check.flag(bilateral, "bilateral")
    s = protocol.setup(key, logits_fn, xs, family, attack=attack, alpha=alpha, table=table, table_dir=table_dir,
                       batched=True, batch_size=batch_size, bilateral=bilateral)
    radii = radii_for(s.table)
    # Threshold 0 is abstention (p_lower >= 1/2); every threshold pays the sampler's TV bound.
    q_base = np.concatenate([[0.5], np.maximum(thresholds(s.table, radii), 0.5)])
    q = q_base + s.sampler_tv
    mesh = counting.local_mesh()
    pool = batch_size // CHUNK
    rows = s.xs.shape[0]
    ids = protocol.check_row_ids(row_ids, rows, batched=True).astype(np.int64)
    per_dev = _bucket(rows, mesh.size, pool)
    padded = jnp.zeros((per_dev * mesh.size, *s.input_shape), s.xs.dtype).at[:rows].set(s.xs)
    padded_ids = np.zeros(per_dev * mesh.size, np.uint32)
    padded_ids[:rows] = ids
    classes = counting.num_classes(s.model, pool * CHUNK, s.input_shape, s.xs.dtype)
    cfg = _Loop(s.model.static, mesh, pool, classes, -(-n0 // CHUNK), slack, bilateral)
    alpha_p = s.budget.alpha_p
    if bilateral:
        return _sequential_bilateral(s, radii, q_base, q, padded, padded_ids, rows, n0, max_n, classes, cfg)
    out = _run(s.key, padded, jnp.asarray(padded_ids), np.int32(rows), s.family, jnp.asarray(q, jnp.float32),
               jnp.asarray(np.where(np.isfinite(q), 1.0 - q, 0.0), jnp.float32), np.float32(math.log(1.0 / alpha_p)), np.int32(n0), np.int32(max_n), s.model.arrays, None, cfg=cfg)
    top, succ, used, bad, status, dec_s, dec_t = (np.asarray(a)[:rows].astype(np.int64) for a in out)
    protocol.refuse_nonfinite(bad, n0 + max_n)
    # The loop's decisions are only stopping times: re-check every certified one in float64.
    yes = (status == _YES) & confidence.mixture_excludes(dec_s, np.maximum(dec_t, 1), q[None, :], alpha_p)
    low_stop = confidence.mixture_lower(succ, np.maximum(used, 1), alpha_p)
    low_dec = np.where(yes, confidence.mixture_lower(dec_s, np.maximum(dec_t, 1), alpha_p), 0.0)
    low = np.maximum(np.where(used > 0, low_stop, 0.0), low_dec.max(axis=1))
    p_lower = confidence.subtract_down(low, s.sampler_tv)
    certified = yes | (p_lower[:, None] >= q_base[None, :])
    prediction = np.where(certified[:, 0], top, -1).astype(np.int32)
    cert = RadiiCertificate(prediction, certified[:, 1:] & (prediction[:, None] >= 0), used, p_lower, radii, alpha_p,
                            s.budget.alpha_d)
    return s, succ, cert


def _sequential_bilateral(s, radii, q_base, q, padded, padded_ids, rows, n0, max_n, classes, cfg):
    """The bilateral loop and its host check: the float64 bounds decide, the loop only stopped."""
    budget = s.rule.bilateral_budget(s.budget.alpha, classes, s.budget.alpha_d)
    level_b = budget.alpha_a if classes == 2 else budget.alpha_b  # C = 2: pB's bound is 1 - pA's
    grid = _grid(s.table, radii, s.sampler_tv, math.log(1.0 / level_b))
    out = _run(s.key, padded, jnp.asarray(padded_ids), np.int32(rows), s.family, jnp.asarray(q, jnp.float32),
               jnp.asarray(np.where(np.isfinite(q), 1.0 - q, 0.0), jnp.float32),
               np.float32(math.log(1.0 / budget.alpha_a)), np.int32(n0), np.int32(max_n), s.model.arrays, grid,
               cfg=cfg)
    top, succ, used, bad, status, dec_s, dec_t, other, dec_b = (np.asarray(a)[:rows].astype(np.int64) for a in out)
    protocol.refuse_nonfinite(bad, n0 + max_n)
    p_lower, p_upper = bilateral_bounds(succ, other, used, dec_s, dec_b, dec_t, status == _YES, budget, s.sampler_tv)
    # Certified where either condition holds at the final bounds, as soapbubble.certify: the
    # unilateral threshold or the table's bilateral radius; abstention: p_lower >= 1/2 or > p_upper.
    best = s.table.bilateral_radius(p_lower, p_upper)
    certified = (p_lower[:, None] >= q_base[None, :]) | np.concatenate(
        [(p_lower > p_upper)[:, None], best[:, None] >= radii[None, :]], axis=1)
    prediction = np.where(certified[:, 0], top, -1).astype(np.int32)
    cert = RadiiCertificate(prediction, certified[:, 1:] & (prediction[:, None] >= 0), used, p_lower, radii,
                            budget.alpha_p, budget.alpha_d, p_upper, budget.as_dict(BILATERAL_CONSTRUCTION)["bilateral"])
    return s, succ, cert


def certify_radii(
    key,
    logits_fn: Callable,
    xs,
    family,
    radii,
    *,
    attack: str = "l2",
    n0: int = 100,
    max_n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    table: table_lib.RadiusTable | None = None,
    table_dir: str | os.PathLike | None = None,
    row_ids=None,
    bilateral: bool = False,
) -> RadiiCertificate:
    """Decides, for every input and target radius, whether it is certified, with as few samples as possible.

    Args:
      key: PRNG key; input ``i`` uses ``fold_in(key, i)`` split into selection and
        estimation keys, as :func:`soapbubble.certify` with ``batched=True``.
      logits_fn: callable pytree ``(rows, *input_shape) -> (rows, num_classes)``
        (its arrays are traced).
      xs: inputs with a leading row axis ``(rows, *input_shape)``, floating,
        finite, pixel space.
      family: Gaussian, L2Family or MixedLinf.
      radii: 1-D strictly increasing array of target radii ``>= 0`` (attack norm).
      attack: "l2" or "linf".
      n0: selection samples per input, ``>= 1``.
      max_n: the largest number of estimation samples an input may use, in
        ``[1, 2**24]``; an input still undecided then is not certified at its
        open radii.
      alpha: total failure probability in (0, 1); the confidence sequence gets
        ``alpha_p = alpha - table.alpha_d``.
      batch_size: noisy samples per device per step (``>= 50``); the pool holds
        ``batch_size // 50`` inputs per device.
      table: the family's radius table (default: the cached one, as
        :func:`soapbubble.certify`).
      table_dir: cache directory for the default table.
      row_ids: optional ``(rows,)`` integers in ``[0, 2**32)``: row ``i`` draws with
        ``fold_in(key, row_ids[i])`` instead of ``fold_in(key, i)`` (a dataset's
        own indices, so results do not depend on how rows are grouped into calls
        or spread over processes).
      bilateral: decide with the bilateral condition too (a bool; module
        docstring): the table must keep the V grid (default: the cached bilateral
        table, as :func:`soapbubble.certify` with ``bilateral=True``).

    Returns:
      A :class:`RadiiCertificate` (with ``p_upper`` and the split when bilateral).

    Raises:
      ValueError, TypeError: for bad arguments (before any sampling), a table
        built for other parameters, or a classifier returning non-finite logits.
    """
    r = _check_radii(radii)
    return _sequential(key, logits_fn, xs, family, lambda table: r, attack=attack, n0=n0, max_n=max_n,
                       alpha=alpha, batch_size=batch_size, table=table, table_dir=table_dir, slack=0,
                       row_ids=row_ids, bilateral=bilateral)[2]


def certify_adaptive(
    key,
    logits_fn: Callable,
    xs,
    family,
    *,
    tol: float,
    attack: str = "l2",
    n0: int = 100,
    max_n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    table: table_lib.RadiusTable | None = None,
    table_dir: str | os.PathLike | None = None,
    row_ids=None,
    bilateral: bool = False,
) -> protocol.Certificate:
    """A certified radius per input, each input sampled until its radius cannot grow by ``tol`` more.

    The radii ``0, tol/2, tol, …`` up to the table's largest are decided
    sequentially (as :func:`certify_radii`); an input stops once at most one of
    them is undecided, so its certified radius is within ``tol`` of what any
    further sampling could certify (or ``max_n`` is spent). The radius reported
    is the table's radius at ``p_lower`` (rounded down), so it is sound exactly
    like :func:`soapbubble.certify`'s. With ``bilateral=True`` it is the larger of
    that and ``table.bilateral_radius(p_lower, p_upper)``, as ``certify(...,
    bilateral=True)``.

    Args:
      key: as :func:`certify_radii` (so are logits_fn, xs, family, attack, n0, max_n,
        alpha, batch_size, table, table_dir, row_ids and bilateral).
      tol: radius tolerance, ``> 0`` (attack norm).

    Returns:
      A :class:`~soapbubble.protocol.Certificate` with ``(rows,)`` arrays; its
      ``n`` holds the estimation samples each input used (``p_upper`` and the split
      filled in when bilateral).
    """
    try:
        tol = float(tol)
    except (TypeError, ValueError) as e:
        raise TypeError(f"tol must be a number > 0, got {tol!r}") from e
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be finite and > 0, got {tol!r}")

    bilateral = check.flag(bilateral, "bilateral")

    def grid(table):
        reach = np.isfinite(table.p_min)
        if bilateral:  # V_r(a) + V_r(b) > 1 needs some V_r > 1/2
            reach |= table.v.max(axis=1) > 0.5
        top = float(table.radii[reach].max(initial=0.0))
        count = int(min(top / (tol / 2), 4096)) + 1
        return np.arange(count) * (tol / 2)

    s, succ, rc = _sequential(key, logits_fn, xs, family, grid, attack=attack, n0=n0, max_n=max_n, alpha=alpha,
                              batch_size=batch_size, table=table, table_dir=table_dir, slack=1,
                              row_ids=row_ids, bilateral=bilateral)
    if rc.p_upper is None:
        radius = s.table.radius(rc.p_lower)
    else:
        radius = protocol.bilateral_certificate(s.table, rc.p_lower, rc.p_upper)[1]
    radius = np.where(rc.prediction >= 0, radius, 0.0)
    return protocol.Certificate(rc.prediction, radius, rc.p_lower, succ, rc.n_used, rc.alpha_p, rc.alpha_d,
                                rc.p_upper, rc.bilateral)
