"""Data that stays on the host, read in fixed-size blocks and handed to the device ahead of use.

A *host source* is any of

- a path to a ``.npy`` file, or a ``np.memmap`` (e.g. ``np.load(path, mmap_mode="r")``):
  read with plain file reads into fresh buffers, never through the mapping, so the pages
  read stay in the operating system's page cache instead of this process's resident memory
  (a mapped page that has been touched counts towards RSS until the mapping goes);
- a *block source*: a re-iterable (iterating it again gives the same rows again; a
  generator is refused) of ``x_block`` arrays (n_b, D) or ``(x_block, weights_block)`` pairs
  of any sizes, e.g. an object whose ``__iter__`` reads one file after another or pages
  through a database cursor;
- :class:`HostData` itself, which also wraps a NumPy array in memory.

The drivers in :mod:`jaxem.streamed` see every source the same way: :meth:`HostData.blocks`
yields blocks of exactly ``block_rows`` rows (the last padded with zero-weight rows, which
contribute exactly nothing), so one compiled program serves every block, and
:func:`to_device` moves them host → device on a background thread one or two blocks ahead of
the computation (double buffering). Rows are checked as they are read: a NaN, an infinity or
a value beyond the compute dtype raises ``ValueError`` naming the rows.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import jax
import numpy as np

from jaxem import _validation

# Rows per block when none is given: blocks of about this many bytes of the compute dtype.
BLOCK_BYTES = 32 * 2**20
# Rows of the random subsample an initialisation runs on at large N (see init_rows()).
INIT_ROWS = 2**18
# ... and at most about this many bytes of them.
INIT_BYTES = 64 * 2**20


class Block(NamedTuple):
    """One fixed-size block: rows beyond ``n_valid`` are zero-weight padding."""

    x: np.ndarray  # (block_rows, D)
    weights: np.ndarray  # (block_rows,)
    n_valid: int
    start: int  # index of the block's first row in the whole source


def is_host_data(x) -> bool:
    """Whether ``x`` is data the drivers stream from the host rather than put on a device
    whole: a path, a ``np.memmap``, :class:`HostData`, or a block source (an iterable that
    is not an array, list or tuple)."""
    if isinstance(x, (str, os.PathLike, np.memmap, HostData)):
        return True
    if isinstance(x, (np.ndarray, jax.Array, list, tuple, dict, bytes)) or np.isscalar(x):
        return False
    if any(hasattr(x, a) for a in ("__array__", "__array_interface__", "shape", "iloc")):
        return False  # array-likes, sparse matrices and DataFrames are in memory
    return isinstance(x, Iterable)


def _npy_layout(path) -> tuple[int, tuple[int, ...], np.dtype, bool]:
    """(byte offset of the data, shape, dtype, fortran_order) of a ``.npy`` file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        return f.tell(), shape, dtype, fortran


def _memmap_file_offset(x: np.memmap) -> int | None:
    """Byte position in ``x.filename`` of ``x``'s first element, when ``x`` is a C-ordered
    view whose rows sit one after another in the file; else None (read it by slicing)."""
    if getattr(x, "filename", None) is None or not x.flags.c_contiguous:
        return None
    root = x
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root, np.memmap) or getattr(root, "offset", None) is None:
        return None
    if root.base is None or not root.flags.c_contiguous:
        return None
    return int(root.offset) + (x.ctypes.data - root.ctypes.data)


def _read_exactly(fd: int, buf: np.ndarray, position: int) -> None:
    """Fill ``buf`` from byte ``position`` of the open file ``fd`` (``preadv``, which
    releases the GIL and leaves the file position alone, so threads can share the file)."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], position + done)
        else:  # pragma: no cover - Windows: one reader at a time per descriptor
            os.lseek(fd, position + done, os.SEEK_SET)
            got = os.readv(fd, [view[done:]])
        if got <= 0:
            raise ValueError(f"the file ended early: {len(view) - done} bytes missing at byte "
                             f"{position + done}")
        done += got


class HostData:
    """A host source (see the module docstring) with its optional per-row weights.

    Args:
      x: a ``.npy`` path, a ``np.memmap``, a NumPy array, or a block source.
      weights: optional (N,) non-negative weights for a path, memmap or array (a NumPy
        array or memmap); a block source gives its weights with its blocks.
      rows: optional ``slice(start, stop)`` of a path, memmap or array (and its weights):
        only those rows are read, e.g. one process's share
        (:func:`jaxem.distributed.process_rows`).
    """

    def __init__(self, x, weights=None, rows: slice | None = None):
        self.path = None
        self.offset = None
        self.array = None
        self.source = None
        if isinstance(x, HostData):
            if weights is not None or rows is not None:
                raise ValueError("weights and rows cannot be given with a HostData, which "
                                 "has its own")
            self.__dict__.update(x.__dict__)
            return
        if isinstance(x, (str, os.PathLike)):
            path = os.fspath(x)
            if not os.path.isfile(path):
                raise ValueError(f"x: no such file: {path!r}")
            try:
                offset, shape, dtype, fortran = _npy_layout(path)
            except (ValueError, OSError) as e:
                raise ValueError(f"x: {path!r} is not a readable .npy file: {e}") from None
            needed = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if os.path.getsize(path) < needed:
                raise ValueError(f"x: {path!r} is truncated: its header declares shape "
                                 f"{tuple(shape)} ({needed} bytes with the header), the file "
                                 f"holds {os.path.getsize(path)}")
            if fortran:  # column-major: rows are not contiguous, read through a mapping
                self.array = np.load(path, mmap_mode="r")
            else:
                self.path, self.offset = path, offset
            self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        elif isinstance(x, np.ndarray):
            self.shape, self.dtype = x.shape, x.dtype
            offset = _memmap_file_offset(x) if isinstance(x, np.memmap) else None
            if offset is None:
                self.array = x
            else:
                self.path, self.offset = x.filename, offset
        else:
            if iter(x) is x:
                raise TypeError("x: a block source must be re-iterable (EM reads it once per "
                                "iteration); got an iterator or generator, which can be read "
                                "once. Wrap it in a class whose __iter__ starts it again.")
            self.source = x
            self.shape, self.dtype = None, None
            if weights is not None:
                raise ValueError("weights cannot be given with a block source: yield "
                                 "(x_block, weights_block) pairs instead")
        if self.shape is not None:
            if len(self.shape) != 2 or self.shape[0] < 1 or self.shape[1] < 1:
                raise ValueError(f"x must be 2-D (n_samples, n_features) with at least one "
                                 f"of each, got shape {self.shape}")
            if not (np.issubdtype(self.dtype, np.floating)
                    or np.issubdtype(self.dtype, np.integer)):
                raise TypeError(f"x must hold real numbers, got dtype {self.dtype}")
        self.weights = None
        if weights is not None:
            _validation.check_sample_weight(weights, self.shape[0], "weights")
            self.weights = weights
        if rows is not None:
            self._select(rows)
        self._n_features = None if self.shape is None else self.shape[1]

    def _select(self, rows: slice) -> None:
        if self.shape is None:
            raise ValueError("rows cannot be given with a block source")
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise ValueError(f"rows must be a slice of consecutive rows, got {rows!r}")
        start, stop, _ = rows.indices(self.shape[0])
        if stop <= start:
            raise ValueError(f"rows {rows!r} selects no row of {self.shape[0]}")
        if self.path is not None:
            self.offset += start * self.shape[1] * self.dtype.itemsize
        else:
            self.array = self.array[start:stop]
        if self.weights is not None:
            self.weights = self.weights[start:stop]
        self.shape = (stop - start, self.shape[1])

    @property
    def n_rows(self) -> int | None:
        """N, or None for a block source (not known without a pass)."""
        return None if self.shape is None else self.shape[0]

    @property
    def n_features(self) -> int:
        """D (for a block source, read from its first block)."""
        if self._n_features is None:
            for xb, _ in self._chunks():
                self._n_features = xb.shape[1]
                break
            else:
                raise ValueError("x: the block source yielded no blocks")
        return self._n_features

    def compute_dtype(self) -> np.dtype:
        """The floating dtype the fit runs in: float64 only for float64 data with JAX's
        x64 mode on, else float32 (JAX's default)."""
        if self.dtype is None:
            for xb, _ in self._chunks():
                self.dtype = np.asarray(xb).dtype
                break
        kind = self.dtype if np.issubdtype(self.dtype, np.floating) else np.dtype(float)
        return np.dtype(jax.dtypes.canonicalize_dtype(kind))

    # ------------------------------------------------------------------ reading
    def _chunks(self, rows: int = 2**16) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """(x, weights or None) pieces of any size, in order, as stored."""
        if self.source is not None:
            for item in self.source:
                if isinstance(item, tuple):
                    if len(item) != 2:
                        raise ValueError("a block source yields x_block or (x_block, "
                                         f"weights_block), got a tuple of {len(item)}")
                    xb, wb = item
                else:
                    xb, wb = item, None
                xb = np.asarray(xb)
                if xb.ndim != 2:
                    raise ValueError(f"a block must be 2-D (rows, n_features), got shape "
                                     f"{xb.shape}")
                if self._n_features is not None and xb.shape[1] != self._n_features:
                    raise ValueError(f"a block has {xb.shape[1]} features, the first had "
                                     f"{self._n_features}")
                if wb is not None:
                    wb = np.asarray(wb)
                    if wb.shape != xb.shape[:1]:
                        raise ValueError(f"a weights block must have shape {xb.shape[:1]}, "
                                         f"got {wb.shape}")
                yield xb, wb
            return
        n, d = self.shape
        w = self.weights
        if self.path is None:
            for i in range(0, n, rows):
                yield (self.array[i:i + rows],
                       None if w is None else np.asarray(w[i:i + rows]))
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            row_bytes = d * self.dtype.itemsize
            for i in range(0, n, rows):
                buf = np.empty((min(rows, n - i), d), self.dtype)
                _read_exactly(fd, buf, self.offset + i * row_bytes)
                yield buf, None if w is None else np.asarray(w[i:i + len(buf)])
        finally:
            os.close(fd)

    def blocks(self, block_rows: int, dtype) -> Iterator[Block]:
        """Fixed-size blocks of ``block_rows`` rows in ``dtype``, the last one padded with
        zero-weight rows; each block's rows are checked (finite, within ``dtype``'s range,
        weights finite and non-negative)."""
        dtype = np.dtype(dtype)
        d = self.n_features
        x_buf = np.zeros((block_rows, d), dtype)
        w_buf = np.zeros((block_rows,), dtype)
        filled = start = 0
        for xb, wb in self._chunks(block_rows):
            i = 0
            while i < len(xb):
                take = min(block_rows - filled, len(xb) - i)
                rows = slice(filled, filled + take)
                _check_rows(xb[i:i + take], wb, i, take, start + filled, dtype)
                with np.errstate(over="ignore"):
                    x_buf[rows] = xb[i:i + take]
                w_buf[rows] = 1.0 if wb is None else wb[i:i + take]
                filled += take
                i += take
                if filled == block_rows:
                    yield Block(x_buf, w_buf, filled, start)
                    start += filled
                    x_buf = np.zeros((block_rows, d), dtype)
                    w_buf = np.zeros((block_rows,), dtype)
                    filled = 0
        if filled:
            yield Block(x_buf, w_buf, filled, start)
        elif start == 0:
            raise ValueError("x: the source holds no rows")

    def read_block(self, start: int, block_rows: int, dtype) -> Block:
        """The block of ``block_rows`` rows from row ``start`` of a path, memmap or array
        (not a block source), in ``dtype``, padded and checked as :meth:`blocks` does. A
        file of the compute dtype is read straight into the block's buffer."""
        dtype = np.dtype(dtype)
        n, d = self.shape
        n_valid = min(block_rows, n - start)
        x = np.empty((block_rows, d), dtype)
        direct = self.path is not None and self.dtype == dtype
        if self.path is not None:
            raw = x[:n_valid] if direct else np.empty((n_valid, d), self.dtype)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                _read_exactly(fd, raw, self.offset + start * d * self.dtype.itemsize)
            finally:
                os.close(fd)
        else:
            raw = self.array[start:start + n_valid]
        w = None if self.weights is None else np.asarray(self.weights[start:start + n_valid])
        _check_rows(raw, w, 0, n_valid, start, dtype)
        if not direct:
            with np.errstate(over="ignore"):
                x[:n_valid] = raw
        x[n_valid:] = 0
        weights = np.zeros(block_rows, dtype)
        weights[:n_valid] = 1.0 if w is None else w
        return Block(x, weights, n_valid, start)

    def device_blocks(self, block_rows: int, dtype, depth: int = 2,
                      workers: int | None = None) -> Iterator[tuple[Block, tuple]]:
        """``(block, (x_device, weights_device))`` for every block, read and copied to the
        device ahead of the consumer (:func:`to_device`). A path, memmap or array is read by
        ``workers`` threads at once (default :data:`READ_WORKERS`; file reads and NumPy's
        copies run outside the GIL), each block from its own offset; a block source, which
        can only be read in order, by one."""
        if self.source is not None:
            return to_device(self.blocks(block_rows, dtype), depth)
        workers = READ_WORKERS if workers is None else max(1, int(workers))
        starts = range(0, self.shape[0], block_rows)
        return _prefetch_in_order(lambda s: self.read_block(s, block_rows, dtype), starts,
                                  depth + workers - 1, workers)

    def count(self) -> tuple[int, float]:
        """(rows, total weight), by a pass over a block source."""
        n, total = 0, 0.0
        for xb, wb in self._chunks():
            n += len(xb)
            total += len(xb) if wb is None else float(np.sum(wb, dtype=np.float64))
        return n, total


def _check_rows(xb, wb, i, take, first, dtype):
    """Rows ``i .. i + take`` of a piece (starting at row ``first`` of the source) are
    finite, fit ``dtype``, and their weights are finite and non-negative.

    Cheap on good data: one sum without a temporary (a NaN or an infinity makes it
    non-finite) and, only when the stored values are wider than ``dtype``, their range;
    the exact test runs only when the sum says something may be wrong."""
    part = np.asarray(xb[i:i + take])
    where = f"rows {first}..{first + take - 1}"
    if part.dtype.kind == "f":
        with np.errstate(all="ignore"):
            total = np.add.reduce(part, axis=None)
        if not np.isfinite(total) and not np.all(np.isfinite(part)):
            raise ValueError(f"x contains NaN or infinite values ({where})")
        if (part.dtype.itemsize > np.dtype(dtype).itemsize and part.size
                and max(-float(part.min()), float(part.max())) > float(np.finfo(dtype).max)):
            raise ValueError(f"x has values beyond {np.dtype(dtype)}'s range ({where}): "
                             + _validation.X64_HINT)
    if wb is not None:
        wp = np.asarray(wb[i:i + take])
        if not np.all(np.isfinite(wp)) or np.any(wp < 0):
            raise ValueError(f"weights must be finite and non-negative ({where})")


def default_block_rows(n_features: int, dtype, n_rows: int | None = None) -> int:
    """Rows per block: about :data:`BLOCK_BYTES` of data, a multiple of 256, at most the
    data's own rows (rounded up to 256)."""
    rows = BLOCK_BYTES // max(n_features * np.dtype(dtype).itemsize, 1)
    rows = max(256, rows // 256 * 256)
    if n_rows is not None:
        rows = min(rows, -(-n_rows // 256) * 256)
    return int(rows)


def init_rows(n_features: int, dtype) -> int:
    """Rows of the subsample an initialisation (k-means) runs on when the data have more:
    :data:`INIT_ROWS`, fewer for wide data (at most :data:`INIT_BYTES`, at least 4096)."""
    per_row = max(n_features * np.dtype(dtype).itemsize, 1)
    return int(min(INIT_ROWS, max(4096, INIT_BYTES // per_row)))


# Threads reading a path, memmap or array ahead of the device: a quarter of the cores, 1 to
# 4 (one on the 2-core CI machine, whose cores the E-step needs; measured on a 16-core GPU
# host, one reader thread delivered 0.72 GB/s against device_put's 5 GB/s).
READ_WORKERS = min(4, max(1, (os.cpu_count() or 1) // 4))


def _on_device(b: Block) -> tuple[Block, tuple]:
    """``(block, (x_device, weights_device))``: the block copied to the default device."""
    return b, (jax.device_put(b.x), jax.device_put(b.weights))


def _prefetch_in_order(load, items, window: int, workers: int):
    """``(block, (x_device, w_device))`` for ``load(item)`` of every item, in order,
    computed by ``workers`` threads at most ``window`` items ahead."""
    x64 = bool(jax.config.jax_enable_x64)  # see to_device

    def job(item):
        with jax.enable_x64(x64):
            return _on_device(load(item))

    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxem-read")
    pending: collections.deque = collections.deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(job, item))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(pool.submit(job, item))
                break
            yield result
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


def to_device(blocks: Iterator[Block], depth: int = 2) -> Iterator[tuple[Block, tuple]]:
    """``(block, (x_device, weights_device))`` for each block, read and transferred on a
    background thread up to ``depth`` blocks ahead of the consumer: while the device works
    on one block, the next is read from disk and copied to it. An error on the reader's
    side is raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()
    # JAX's float64 mode may be set for this thread only (a `with jax.enable_x64()`):
    # the reader thread transfers under the consumer's setting, or float64 blocks would
    # arrive as float32.
    x64 = bool(jax.config.jax_enable_x64)

    def produce():
        try:
            with jax.enable_x64(x64):
                _produce()
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    def _produce():
        for b in blocks:
            item = _on_device(b)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        q.put(done)

    thread = threading.Thread(target=produce, name="jaxem-blocks", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def subsample(data: HostData, m: int, seed: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(x, weights)``: a random subsample of at most ``m`` rows of ``data``, in one pass.

    Rows are chosen by weighted reservoir sampling (Efraimidis & Spirakis's A-Res: row n
    gets the key ``log(u_n) / w_n``, the ``m`` largest keys are kept), so without weights it
    is a uniform sample without replacement, and zero-weight rows are never chosen; the
    chosen rows come back with unit weight. The uniforms ``u_n`` are drawn in row order
    from one generator, so the sample does not depend on how the source cuts its blocks.
    When no more than ``m`` rows have positive weight, all of them are kept, with their
    weights: the subsample is the data.
    """
    rng = np.random.Generator(np.random.Philox(seed))
    keys = np.empty(0)
    kept_x = np.empty((0, data.n_features), dtype)
    kept_w = np.empty(0, dtype)
    start = 0
    dropped = False
    for xb, wb in data._chunks():
        n_b = len(xb)
        u = rng.random(n_b)
        w = np.ones(n_b) if wb is None else np.asarray(wb, np.float64)
        with np.errstate(divide="ignore"):
            k = np.where(w > 0, np.log(u) / np.where(w > 0, w, 1.0), -np.inf)
        _check_rows(xb, wb, 0, n_b, start, np.dtype(dtype))
        start += n_b
        if len(keys) >= m:  # a full reservoir: only keys above its least can enter
            enter = k > keys.min()
            dropped = dropped or bool(np.any(np.isfinite(k[~enter])))
            xb, w, k = np.asarray(xb)[enter], w[enter], k[enter]
        keys = np.concatenate([keys, k])
        kept_x = np.concatenate([kept_x, np.asarray(xb, dtype)])
        kept_w = np.concatenate([kept_w, w.astype(dtype)])
        if len(keys) > m:
            top = np.argpartition(-keys, m - 1)[:m]
            top.sort()
            rest = np.ones(len(keys), bool)
            rest[top] = False
            dropped = dropped or bool(np.any(np.isfinite(keys[rest])))
            keys, kept_x, kept_w = keys[top], kept_x[top], kept_w[top]
    positive = np.isfinite(keys)
    kept_x, kept_w = kept_x[positive], kept_w[positive]
    if dropped:
        kept_w = np.ones_like(kept_w)
    return kept_x, kept_w
