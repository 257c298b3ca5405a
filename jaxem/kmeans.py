"""k-means in JAX, used to initialise mixtures: greedy k-means++ seeding and Lloyd iterations.

Both are O(N·K·D) per pass, written as matrix products, jit-able and vmap-able over keys.
Per-sample weights are supported throughout.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32

from jaxem._linalg import PRECISION


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans`."""

    centers: jax.Array  # (K, D)
    labels: jax.Array  # (N,) int32
    inertia: jax.Array  # () weighted sum of squared distances to the nearest centre
    n_iter: jax.Array  # () int32 Lloyd iterations run


# Up to this many features the squared distances are summed feature by feature as
# elementwise operations rather than expanded into a matrix product: a product contracting
# over 2-4 features is mostly overhead, and batched over datasets (``fit_batch``) each
# member's tiny product is a call of its own. 1,000 datasets × 200 points, D = 2, K = 3: the
# distances took 1.9 ms a Lloyd iteration as a product (the initialisation's run 0.18 s,
# now 0.09 s); unbatched, N = 1e6, D = 4, K = 8: 520 -> 475 ms for 20 iterations. (The
# centre sums as reductions over a (K, N) mask instead of a product ran slower: 475 -> 715
# ms at N = 1e6.) And no cancellation: each term rounds relative to itself, where the
# expanded form rounds relative to |x|² + |c|².
SMALL_FEATURES = 4


def _sq_distances(x: jax.Array, x_sq: jax.Array, centers: jax.Array) -> jax.Array:
    """(N, K) ||x_n - c_k||²: feature by feature up to :data:`SMALL_FEATURES`, else by the
    expanded form (clipped: rounding can make it < 0)."""
    if x.shape[1] <= SMALL_FEATURES:
        return sum((x[:, j, None] - centers[None, :, j]) ** 2 for j in range(x.shape[1]))
    cross = jnp.matmul(x, centers.T, precision=PRECISION)
    return jnp.maximum(x_sq[:, None] - 2.0 * cross + jnp.sum(centers**2, axis=1)[None], 0.0)


def _prepare(x, weights):
    x = jnp.asarray(x)
    w = jnp.ones(x.shape[0], x.dtype) if weights is None else jnp.asarray(weights, x.dtype)
    # Centre the data first: the expanded distance form loses digits to a large common offset.
    offset = jnp.sum(w[:, None] * x, axis=0) / jnp.sum(w)
    return x - offset, w, offset


def _sampling_order(xc: jax.Array) -> jax.Array:
    """(N,) a canonical order of the rows: by their projection on a fixed direction.

    Drawing by inverse CDF in this order makes the seeding see the data as a weighted set,
    not a list: a sample of weight 3 and three copies of it (or rows shuffled, or zero-weight
    rows removed) cover the same interval of the CDF, so the same key picks the same
    points. That is scikit-learn's sample-weight contract (weight = repetition).
    """
    d = xc.shape[1]
    direction = jnp.cos(jnp.arange(1, d + 1, dtype=xc.dtype) * 0.7548776662466927)
    return _argsort(jnp.matmul(xc, direction, precision=PRECISION))


# Up to this many rows _argsort sorts by passes of single-integer sorts (below); beyond,
# by jnp.argsort.
RADIX_ARGSORT_MAX_ROWS = 1 << 24


def _argsort(values: jax.Array) -> jax.Array:
    """``jnp.argsort(values)`` of a 1-D float32 or float64 array (stable; -0.0 and 0.0 equal;
    no NaN), as a few sorts of single unsigned integers instead of one sort of (value,
    index) pairs: XLA:CPU sorts a lone integer array directly, but pairs through a
    comparator function called per comparison (2^18 float32 values: 65 ms by pairs, 34 ms
    in three passes; 1,000 datasets × 200 rows, each at -O0, profiled: 45 ms against
    11 ms).

    Least significant digit first, each pass sorts ``digit << b | position`` (``b`` bits
    for a position) and so orders by the digit, ties by the previous passes' order: a
    stable sort by the value's order-preserving integer bits."""
    n = values.shape[0]
    if n > RADIX_ARGSORT_MAX_ROWS or values.dtype not in (jnp.float32, jnp.float64):
        return jnp.argsort(values)
    wide = values.dtype == jnp.float64
    signed, unsigned, top = ((jnp.int64, jnp.uint64, 0x8000000000000000) if wide
                             else (jnp.int32, jnp.uint32, 0x80000000))
    size = 64 if wide else 32
    bits = jax.lax.bitcast_convert_type(jnp.where(values == 0, 0.0, values).astype(values.dtype),
                                        signed)
    # Order-preserving: negative floats' bits reversed, then the sign bit flipped.
    bits = jnp.where(bits < 0, bits ^ jnp.asarray(top - 1, signed), bits)
    key = jax.lax.bitcast_convert_type(bits, unsigned) ^ jnp.asarray(top, unsigned)
    b = max(1, (n - 1).bit_length())
    width = 32 - b
    positions = jnp.arange(n, dtype=jnp.uint32)
    order = None
    for shift in range(0, size, width):
        digit = ((key >> shift) & ((1 << min(width, size - shift)) - 1)).astype(jnp.uint32)
        if order is not None:
            digit = digit[order]
        passed = jax.lax.sort((digit << b) | positions) & jnp.uint32((1 << b) - 1)
        order = passed if order is None else order[passed]
    return order.astype(jnp.int32)


def _draw(u: jax.Array, mass: jax.Array, order: jax.Array) -> jax.Array:
    """Row indices drawn with probability ∝ ``mass`` (N,) by inverse CDF over ``order``,
    for uniform variates ``u`` in [0, 1) of any shape.

    The CDF and the uniform draw resolve 2⁻²⁴ of the total mass in float32: at N ≳ 1e7 a
    single ordinary point's chance is coarse, while the points k-means++ wants (far ones,
    of large mass) are drawn accurately.
    """
    cdf = _prefix_sums(mass[order])
    # side="right": a row of zero mass (an empty interval) is never drawn, even at u = 0.
    # Found by comparing every entry (how many are ≤ u·total): the binary search's index,
    # at the cost of the candidates' distances (N per candidate), in one kernel where the
    # search is a loop of its own (a 1,000-dataset fit_batch program at -O0: traced,
    # lowered, compiled and run 0.07 s faster).
    pos = jnp.minimum(jnp.searchsorted(cdf, u * cdf[-1], side="right", method="compare_all"),
                      mass.shape[0] - 1)
    return order[pos]


# Up to this many rows the prefix sums of a draw are one product with a triangle of ones
# (N² multiply-adds in the backend's matrix product) rather than XLA:CPU's cumulative sum
# (two reduce-windows, each output summing its window afresh, in loops LLVM does not
# optimise at -O0 where small programs compile): 1,000 datasets × 200 rows, three draws
# each, -O0, profiled: 28 ms against 15 ms. They round differently (a draw can differ only
# where its variate falls within a rounding of an interval's end).
SMALL_CDF_ROWS = 256


def _prefix_sums(values: jax.Array) -> jax.Array:
    """(N,) inclusive prefix sums of ``values`` (N,)."""
    n = values.shape[0]
    if n > SMALL_CDF_ROWS:
        return jnp.cumsum(values)
    rows = jnp.arange(n)
    lower = (rows[:, None] >= rows[None, :]).astype(values.dtype)
    return jnp.matmul(lower, values, precision=PRECISION)


# Candidate j of centre i is drawn with the variate of index i·_DRAW_STRIDE + j: unique for
# up to _DRAW_STRIDE candidates a centre, and the same whatever the number of clusters.
_DRAW_STRIDE = 1 << 16


def _seeding_uniforms(key, n_clusters: int, n_trials: int, dtype) -> jax.Array:
    """(K, T) uniform variates for the seeding, entry (i, j) drawn from the key and its
    index i·_DRAW_STRIDE + j alone: a row does not depend on how many rows (clusters)
    follow nor an entry on how many candidates there are, so a search over K draws for K
    live clusters exactly what a K-cluster program draws. All of them come from one
    vectorised draw: each random call site compiles a hash of its own, and drawn centre by
    centre (four sites, the first centre outside the loop) the seeding of 1,000 datasets ×
    200 rows compiled in 0.43 s instead of 0.24 s. A threefry key (JAX's default) hashes
    each index once (:func:`_threefry_uniforms`); another generator folds the index into
    the key and draws from that."""
    idx = (jnp.arange(n_clusters, dtype=jnp.uint32)[:, None] * _DRAW_STRIDE
           + jnp.arange(n_trials, dtype=jnp.uint32)[None])
    words = _threefry_words(key)
    if words is not None:
        return _threefry_uniforms(words, idx, dtype)
    return jax.vmap(jax.vmap(
        lambda i: jax.random.uniform(jax.random.fold_in(key, i), (), dtype)))(idx)


def _threefry_words(key):
    """The two uint32 words of a threefry key (typed, or raw under the default generator),
    or None for another generator."""
    typed = (key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
             else jax.random.wrap_key_data(key))
    if str(jax.random.key_impl(typed)) != "threefry2x32":
        return None
    return jax.random.key_data(typed)


def _threefry_uniforms(words, counters, dtype) -> jax.Array:
    """Uniform variates in [0, 1), one per uint32 counter, each from one threefry hash of
    the counter under the key ``words``: the bits ``jax.random.bits`` gives the element of
    that flat index, made a float as ``jax.random.uniform`` makes them. One hash where
    ``uniform(fold_in(key, i))`` takes two, each a loop of its own in a CPU program (a
    1,000-dataset ``fit_batch`` traced, lowered and compiled 0.06 s faster)."""
    flat = jnp.ravel(counters)
    hashed = threefry_2x32(words, jnp.concatenate([jnp.zeros_like(flat), flat]))
    high, low = hashed[:flat.size], hashed[flat.size:]
    dtype = jnp.dtype(dtype)
    if dtype.itemsize == 8:
        bits = (high.astype(jnp.uint64) << 32) | low.astype(jnp.uint64)
        one, shift = np.uint64(np.float64(1.0).view(np.uint64)), 64 - 52
    else:
        bits, one, shift = high ^ low, np.uint32(np.float32(1.0).view(np.uint32)), 32 - 23
    floats = jax.lax.bitcast_convert_type((bits >> shift) | one, dtype) - 1.0
    return floats.astype(dtype).reshape(counters.shape)


def _plusplus(key, xc, x_sq, w, n_clusters: int, n_live=None):
    """Greedy k-means++ in ``n_clusters`` slots, of which the first ``n_live`` (traced;
    default all) get centres; the others stay at 0 (the data's centre) and are dead.

    The first centre is drawn by weight; each next one is the best of
    :func:`seeding_trials` (``n_live``) candidates drawn by weight × squared distance to the
    nearest centre so far (scikit-learn's greedy rule). The centres of the live slots equal
    those of an ``n_live``-cluster run with the same key: every candidate has its own
    variate (:func:`_seeding_uniforms`), and only the first :func:`seeding_trials`
    (``n_live``) of them compete. One loop over the slots, the first included, so the draw
    and the distances are traced and compiled once.
    """
    n, d = xc.shape
    n_live = n_clusters if n_live is None else n_live
    max_trials = seeding_trials(n_clusters)
    n_trials = jnp.asarray([seeding_trials(k) for k in range(1, n_clusters + 1)])[n_live - 1]
    order = _sampling_order(xc)
    u = _seeding_uniforms(key, n_clusters, max_trials, xc.dtype)
    trial = jnp.arange(max_trials)

    def body(i, carry):
        centers, closest = carry
        # The first centre: by weight alone, one candidate. Later ones by weight × distance;
        # where every point already sits on a centre (duplicates), by weight alone.
        mass = w * jnp.where(i > 0, closest, 0.0)
        mass = jnp.where(jnp.sum(mass) > 0, mass, w)
        cand = _draw(u[i], mass, order)
        d_cand = _sq_distances(xc, x_sq, xc[cand])  # (N, T)
        new_closest = jnp.minimum(closest[:, None], d_cand)
        pot = jnp.sum(w[:, None] * new_closest, axis=0)
        competing = trial < jnp.where(i > 0, n_trials, 1)
        best = jnp.argmin(jnp.where(competing, pot, jnp.inf))
        live = i < n_live
        return (centers.at[i].set(jnp.where(live, xc[cand[best]], centers[i])),
                jnp.where(live, new_closest[:, best], closest))

    init = (jnp.zeros((n_clusters, d), xc.dtype), jnp.full((n,), jnp.inf, xc.dtype))
    centers, _ = jax.lax.fori_loop(0, n_clusters, body, init)
    return centers


def _live_mask(n_clusters: int, n_live) -> jax.Array:
    return jnp.arange(n_clusters) < (n_clusters if n_live is None else n_live)


# Up to this many clusters the nearest centre is found by comparing the columns in turn
# (elementwise selects, fused with the distances) rather than by an argmin: an argmin is a
# reduction over (value, index) pairs whose combining function XLA:CPU calls per element
# unless LLVM inlines it, which it does not at -O0 (fit_batch's initialisation): 1,000
# Lloyd passes over 200 rows, K = 3, took 7.2 µs each as an argmin and ~1 µs as selects.
SMALL_CLUSTERS = 8


def _nearest(xc, x_sq, centers, live) -> jax.Array:
    """(N,) the nearest live centre of each row (the first of equals) and (N,) the squared
    distance to it."""
    d2 = jnp.where(live[None], _sq_distances(xc, x_sq, centers), jnp.inf)
    if d2.shape[1] > SMALL_CLUSTERS:
        return jnp.argmin(d2, axis=1), jnp.min(d2, axis=1)
    index, best = jnp.zeros(d2.shape[0], jnp.int32), d2[:, 0]
    for k in range(1, d2.shape[1]):
        closer = d2[:, k] < best
        index, best = jnp.where(closer, k, index), jnp.where(closer, d2[:, k], best)
    return index, best


@jax.jit
def nearest_center(x: jax.Array, centers: jax.Array, n_live=None) -> jax.Array:
    """(N,) index of the nearest of ``centers`` (K, D) for each row of ``x`` (N, D); with
    ``n_live``, of the first ``n_live`` centres only."""
    live = _live_mask(centers.shape[0], n_live)
    offset = jnp.sum(jnp.where(live[:, None], centers, 0.0), axis=0) / jnp.sum(live)
    xc = x - offset
    return _nearest(xc, jnp.sum(xc**2, axis=1), centers - offset, live)[0]


def seeding_trials(n_clusters: int) -> int:
    """Candidates per centre of greedy k-means++ (Arthur & Vassilvitskii 2007) for K
    clusters: scikit-learn's 2 + ⌊log K⌋. Runs for K values with the same count draw the
    same centres (one the prefix of the other, same key)."""
    return 2 + int(np.log(n_clusters))


# The public functions are jitted: called eagerly, their loops would otherwise be traced and
# compiled again on every call (a fresh closure each time), and every other op dispatched
# one by one. Inside a caller's jit/vmap they are simply inlined.
@functools.partial(jax.jit, static_argnames="n_clusters")
def kmeans_plusplus(
    key: jax.Array, x: jax.Array, n_clusters: int, weights: jax.Array | None = None,
    n_live: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Greedy k-means++ seeding.

    Args:
      key: PRNG key.
      x: (N, D) data.
      n_clusters: number of centres K (static).
      weights: optional (N,) non-negative sample weights.
      n_live: optional (traced) number of centres to seed, 1..K: the rest are dead slots
        (at the data's mean). The live centres equal an ``n_live``-centre seeding's.

    Returns:
      (K, D) centres, each live one a data point.
    """
    xc, w, offset = _prepare(x, weights)
    x_sq = jnp.sum(xc**2, axis=1)
    return _plusplus(key, xc, x_sq, w, n_clusters, n_live) + offset


@functools.partial(jax.jit, static_argnames="n_clusters")
def kmeans(
    key: jax.Array,
    x: jax.Array,
    n_clusters: int,
    weights: jax.Array | None = None,
    max_iter: int = 300,
    tol: float = 1e-4,
    n_live: jax.typing.ArrayLike | None = None,
) -> KMeansResult:
    """k-means: k-means++ seeding, then Lloyd iterations until the centres stop moving.

    Args:
      key: PRNG key.
      x: (N, D) data.
      n_clusters: number of clusters K (static).
      weights: optional (N,) non-negative sample weights.
      max_iter: cap on Lloyd iterations.
      tol: stop when the total squared centre shift is below ``tol`` times the mean
        per-feature variance of the data (scikit-learn's rule).
      n_live: optional (traced) number of clusters in use, 1..K; the other slots are dead
        (no points, centre at the data's mean). Gives an ``n_live``-cluster run's result.

    Returns:
      :class:`KMeansResult`. A cluster that loses all its points keeps its previous centre.
    """
    xc, w, offset = _prepare(x, weights)
    x_sq = jnp.sum(xc**2, axis=1)
    centers = _plusplus(key, xc, x_sq, w, n_clusters, n_live)
    live = _live_mask(n_clusters, n_live)
    w_sum = jnp.sum(w)
    threshold = tol * jnp.mean(jnp.sum(w[:, None] * xc**2, axis=0) / w_sum)

    def assign(c):
        return jax.nn.one_hot(_nearest(xc, x_sq, c, live)[0], n_clusters, dtype=xc.dtype)

    def cond(state):
        _, shift, it = state
        return (it < max_iter) & (shift > threshold)

    # The counts come with the sums, from a column of ones: one product, where a sum of
    # its own recomputed the assignment (XLA fuses it into each consumer; 1,000 datasets
    # × 200 rows at -O0, profiled: the Lloyd loops 73 → 58 ms).
    xc_one = jnp.concatenate([xc, jnp.ones((xc.shape[0], 1), xc.dtype)], axis=1)

    def body(state):
        c, _, it = state
        wr = assign(c) * w[:, None]
        moments = jnp.matmul(wr.T, xc_one, precision=PRECISION)
        sums, counts = moments[:, :-1], moments[:, -1]
        new = jnp.where(counts[:, None] > 0, sums / jnp.where(counts > 0, counts, 1.0)[:, None], c)
        return new, jnp.sum((new - c) ** 2), it + 1

    init_state = (centers, jnp.asarray(jnp.inf, xc.dtype), jnp.asarray(0, jnp.int32))
    centers, _, n_iter = jax.lax.while_loop(cond, body, init_state)
    labels, d2 = _nearest(xc, x_sq, centers, live)
    labels = labels.astype(jnp.int32)
    inertia = jnp.sum(w * d2)
    return KMeansResult(centers + offset, labels, inertia, n_iter)
