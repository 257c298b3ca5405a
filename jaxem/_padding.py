"""Row counts rounded up to a few sizes, so that the number of samples is not a compile key.

Every distinct N is a new XLA program (seconds of compilation on a CPU). The estimator and
the model search therefore pad the data with zero-weight rows up to :func:`padded_size`: the
weights make this exact (a zero-weight row adds exactly nothing to the statistics, the
k-means seeding never draws it), so a refit on 120 rows after one on 100 reuses the program.
"""

from __future__ import annotations

import numpy as np

# Every N up to this shares one program: small fits are all compile time.
MIN_ROWS = 256
# Above it, sizes m·2^e with STEPS <= m < 2·STEPS: at most 1/STEPS of the rows are padding.
STEPS = 16
# Beyond this many rows N is its own size: a compile is small next to the fit's run, and a
# padded copy of the data would not be small next to memory.
MAX_PADDED_ROWS = 2**20


def padded_size(n: int) -> int:
    """The bucket of ``n`` rows: :data:`MIN_ROWS`, or the least m·2^e ≥ n with
    STEPS ≤ m < 2·STEPS (a ladder of 16 sizes per doubling, ≤ 6.25% padding); ``n`` itself
    beyond :data:`MAX_PADDED_ROWS`."""
    n = int(n)
    if n <= MIN_ROWS:
        return MIN_ROWS
    if n > MAX_PADDED_ROWS:
        return n
    e = (n - 1).bit_length() - STEPS.bit_length()
    return -(-n // (1 << e)) << e


def pad_rows(x: np.ndarray, weights: np.ndarray | None, n_to: int | None = None):
    """``(x, weights)`` padded to ``n_to`` rows (default :func:`padded_size`): copies of the
    last row, of weight zero. ``weights`` None counts as all ones."""
    n = x.shape[0]
    n_to = padded_size(n) if n_to is None else n_to
    w = np.ones(n, x.dtype) if weights is None else np.asarray(weights, x.dtype)
    if n_to == n:
        return x, w
    x = np.concatenate([x, np.repeat(x[-1:], n_to - n, axis=0)])
    return x, np.concatenate([w, np.zeros(n_to - n, x.dtype)])
