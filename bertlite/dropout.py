"""Dropout masks as a function of where they apply, not of who computes them.

Every mask element is a 16-bit draw of a counter-based generator, Philox-4x64-10 (Salmon et al.,
"Parallel random numbers: as easy as 1, 2, 3", SC'11), keyed by ``(run seed, step)``; its counter
names the element: the dropout *site* (a layer's attention weights, or one of its two add & norm
inputs: :func:`site_id`), the *global* index of the example in the batch, and the element's
flat index within that example's shape (position, then feature). So the mask of rows
``[a, b)`` computed alone equals rows ``a..b-1`` of the whole batch's mask: accumulation
micro-batches, devices, DDP ranks and kvstore workers all see the masks of one process with the
whole batch, and a resumed run the masks of an uninterrupted one (the step is in the key).
Backends that take their masks from here draw the same ones, bit for bit.

Layout: one Philox block (4 x 64 bits) gives 16 draws, read as little-endian 16-bit words.
Example ``r`` of a site whose per-example shape has ``n`` elements owns the blocks
``r * ceil(n / 16)`` to ``(r + 1) * ceil(n / 16) - 1`` (its last block's spare draws are unused);
block ``b`` of site ``s`` is the counter ``(b, s, 0, DOMAIN)`` (word 0, the lowest, first) under
the key ``(seed, step)``. Element ``i`` of example ``r`` is draw ``i % 16`` of its block
``r * ceil(n / 16) + i // 16``. The per-example shape is part of the layout, so every part of a
batch must pass the same one (one example's shape at the batch's ``max_len``); a path that
computes fewer positions (packed valid tokens, groups padded to their longest) draws the mask
at that shape and takes its elements from it.

The draws come from NumPy's C Philox (:class:`numpy.random.Philox`, bit-identical in NumPy 1.23
and 2.x), one generator state per site and contiguous run of rows, in cache-sized chunks that
become the mask at once; a big mask is drawn by several threads (:func:`set_num_threads`;
NumPy's generator releases the GIL), and ``out=`` fills a buffer reused from step to step.
:func:`philox4x64` is a vectorized NumPy version of the same function; both are checked
against Random123's known answers.

An element is dropped when its draw is below :func:`threshold` ``= round(p * 65536)``, so it is
kept with probability exactly :func:`keep_probability` ``= 1 - threshold(p) / 65536`` (``p``
rounded to a multiple of 2**-16); :func:`scaled_mask` scales kept elements by
``1 / keep_probability(p)``, which keeps every activation's expectation exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bertlite.config import BERTConfig

#: Random draws per Philox-4x64 block (4 words of 64 bits, 16 bits a draw).
DRAWS_PER_BLOCK = 16
#: Distinct values of a draw.
LEVELS = 1 << 16
#: The counter's last word: keeps these masks apart from any other use of Philox with the key.
DOMAIN = 0x64726F70  # "drop"
#: The dropout sites of an encoder block, in the book's names: the attention weights and the
#: inputs of the two add & norm layers.
SITE_KINDS = ("attention", "addnorm1", "addnorm2")

_U64 = (1 << 64) - 1
_M0, _M1 = 0xD2E7470EE14C6C93, 0xCA5A826395121157  # Philox-4x64 multipliers
_W0, _W1 = 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B  # Weyl key increments
_LO32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
#: draws per chunk (about 256 KB of bits, in cache while they become a mask)
_CHUNK_DRAWS = 1 << 17
#: draws per thread at least, below which a mask is drawn by one thread
_THREAD_MIN_DRAWS = 1 << 20
_THREADS: int | None = None
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _check_uint(name: str, value: Any, bits: int = 64) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not 0 <= int(value) < 1 << bits:
        raise ValueError(f"{name} must be in [0, 2**{bits}), got {value!r}")
    return int(value)


def _check_p(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)):
        raise TypeError(f"dropout probability p must be a float in [0, 1), got {p!r}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
    return float(p)


def threshold(p: float) -> int:
    """Draws below this are dropped: ``round(p * 65536)``, at most 65535 (one value kept)."""
    return min(round(_check_p(p) * LEVELS), LEVELS - 1)


def keep_probability(p: float) -> float:
    """The exact probability that an element is kept: ``1 - threshold(p) / 65536``."""
    return 1.0 - threshold(p) / LEVELS


def site_id(layer: int, kind: str) -> int:
    """The site number of one dropout of encoder block ``layer`` (``kind`` one of
    :data:`SITE_KINDS`), the same in every backend."""
    layer = _check_uint("layer", layer, 32)
    if kind not in SITE_KINDS:
        raise ValueError(f"unknown dropout site kind {kind!r}; choose one of {SITE_KINDS}")
    return layer * len(SITE_KINDS) + SITE_KINDS.index(kind)


# -- Philox-4x64-10 ------------------------------------------------------------------------------


def _mulhilo(m: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(hi, lo)`` 64-bit halves of the 128-bit products ``m * x`` (32-bit limbs)."""
    m_lo, m_hi = np.uint64(m & 0xFFFFFFFF), np.uint64(m >> 32)
    x_lo, x_hi = x & _LO32, x >> _S32
    ll, lh, hl, hh = x_lo * m_lo, x_lo * m_hi, x_hi * m_lo, x_hi * m_hi
    mid = (ll >> _S32) + (lh & _LO32) + (hl & _LO32)
    hi = hh + (lh >> _S32) + (hl >> _S32) + (mid >> _S32)
    return hi, x * np.uint64(m)  # the low half is the product modulo 2**64


def philox4x64(counter: Any, key: Sequence[int], rounds: int = 10) -> np.ndarray:
    """Philox-4x64 of counters ``(..., 4)`` (uint64, word 0 first) under ``key`` (two words):
    the ``(..., 4)`` uint64 outputs. Vectorized NumPy; the reference for the fast path."""
    ctr = np.asarray(counter, dtype=np.uint64)
    if ctr.shape[-1:] != (4,):
        raise ValueError(f"counter must have shape (..., 4), got {ctr.shape}")
    if len(key) != 2:
        raise ValueError(f"key must be two 64-bit words, got {key!r}")
    k0, k1 = (_check_uint("key word", k) for k in key)
    c0, c1, c2, c3 = (ctr.reshape(-1, 4)[:, i].copy() for i in range(4))
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _U64, (k1 + _W1) & _U64
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
    return np.stack([c0, c1, c2, c3], axis=-1).reshape(ctr.shape)


def _threads() -> int:
    if _THREADS:
        return _THREADS
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:  # the frameworks' own thread count (torchrun sets 1)
        return min(4, int(omp))
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def set_num_threads(threads: int | None) -> None:
    """Threads that draw a big mask. ``None`` (the default): ``$OMP_NUM_THREADS`` when set (as
    the frameworks do), else the usable CPUs; at most 4."""
    global _THREADS
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    _THREADS = threads


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE < threads:
        _POOL, _POOL_SIZE = ThreadPoolExecutor(threads, "bertlite-dropout"), threads
    return _POOL


def _forget_pool() -> None:
    """A forked child has none of the parent's threads: it starts a pool of its own."""
    global _POOL, _POOL_SIZE
    _POOL, _POOL_SIZE = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


# -- masks -------------------------------------------------------------------------------------


def _row_runs(rows: Any) -> tuple[list[tuple[int, int]], int]:
    """Runs ``(first, length)`` of consecutive global row indices, and the row count."""
    if isinstance(rows, range) and rows.step == 1:
        if rows.start < 0:
            raise ValueError(f"rows must be global example indices >= 0, got {rows!r}")
        return ([(rows.start, len(rows))] if len(rows) else []), len(rows)
    index = np.asarray(rows)
    if index.ndim != 1 or not (index.size == 0 or np.issubdtype(index.dtype, np.integer)):
        raise TypeError("rows must be a range or a 1-D sequence of integer example indices, "
                        f"got {rows!r}")
    if index.size and index.min() < 0:
        raise ValueError(f"rows must be global example indices >= 0, got {index.min()}")
    index = index.astype(np.int64)
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks]).astype(np.int64)
    ends = np.concatenate([breaks, [index.size]]).astype(np.int64)
    return ([(int(index[s]), int(e - s)) for s, e in zip(starts, ends)] if index.size else []
            ), int(index.size)


def _check_shape(shape: Any) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if (not shape or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d <= 0
                         for d in shape)):
        raise ValueError(f"shape (one example's) must be positive integers, got {shape!r}")
    return tuple(int(d) for d in shape)


def _segments(runs: list[tuple[int, int]], parts: int) -> list[list[tuple[int, int, int]]]:
    """The runs cut into ``parts`` pieces of about equal rows: lists of ``(out_row, first,
    length)``, each piece contiguous in the output."""
    total = sum(length for _, length in runs)
    size = max(1, -(-total // parts))
    pieces: list[list[tuple[int, int, int]]] = [[]]
    out_row, room = 0, size
    for first, length in runs:
        while length:
            if not room:
                pieces.append([])
                room = size
            take = min(length, room)
            pieces[-1].append((out_row, first, take))
            out_row, first, length, room = out_row + take, first + take, length - take, room - take
    return pieces


def _generate(seed: int, step: int, site: int, rows: Any, shape: Any,
              emit: Callable[[int, np.ndarray], None]) -> tuple[int, tuple[int, ...]]:
    """Draw the bits of ``rows`` x ``shape`` chunk by chunk (a few hundred KB, cache-sized),
    handing each to ``emit(out_row, bits)`` with ``bits`` a ``(k, prod(shape))`` uint16 view;
    big masks are drawn by several threads (NumPy's Philox runs without the GIL). Returns the
    row count and the checked shape."""
    key = np.array([_check_uint("seed", seed), _check_uint("step", step)], dtype=np.uint64)
    site = _check_uint("site", site)
    shape = _check_shape(shape)
    runs, count = _row_runs(rows)
    per_row = math.prod(shape)
    blocks = -(-per_row // DRAWS_PER_BLOCK)
    if runs and max(first + length for first, length in runs) * blocks >= 1 << 64:
        raise ValueError(f"rows x shape {shape} exceed the 2**64 blocks of a site's counter")
    rows_per_chunk = max(1, _CHUNK_DRAWS // (blocks * DRAWS_PER_BLOCK))
    threads = min(_threads(), max(1, count * per_row // _THREAD_MIN_DRAWS))

    def work(piece: list[tuple[int, int, int]]) -> None:
        gen = np.random.Philox(key=key)
        for out_row, first, length in piece:
            # NumPy steps its counter before each block: start one block before the run's
            base = (first * blocks + (site << 64) + (DOMAIN << 192) - 1) % (1 << 256)
            gen.state = {"bit_generator": "Philox", "buffer": np.zeros(4, np.uint64),
                         "buffer_pos": 4, "has_uint32": 0, "uinteger": 0,
                         "state": {"key": key, "counter": np.array(
                             [(base >> (64 * i)) & _U64 for i in range(4)], dtype=np.uint64)}}
            for done in range(0, length, rows_per_chunk):
                k = min(rows_per_chunk, length - done)
                raw = gen.random_raw(4 * blocks * k)
                bits = raw.astype("<u8", copy=False).view("<u2").reshape(k, -1)
                emit(out_row + done, bits[:, :per_row])

    pieces = _segments(runs, threads)
    if len(pieces) == 1:
        work(pieces[0])
    else:
        for future in [_pool(len(pieces)).submit(work, piece) for piece in pieces]:
            future.result()
    return count, shape


def random_bits(seed: int, step: int, site: int, rows: range | Sequence[int],
                shape: int | Sequence[int]) -> np.ndarray:
    """The uint16 draws ``(len(rows), *shape)`` of site ``site`` at step ``step`` of the run
    ``seed``, for the global example indices ``rows`` (a ``range`` for a contiguous part of the
    batch, else any sequence); ``shape`` is one example's shape at this site."""
    count, shape = _prepare(rows, shape)
    out = np.empty((count, math.prod(shape)), dtype=np.uint16)

    def emit(row: int, bits: np.ndarray) -> None:
        out[row:row + len(bits)] = bits

    _generate(seed, step, site, rows, shape, emit)
    return out.reshape(count, *shape)


def keep_mask(seed: int, step: int, site: int, p: float, row_start: int, rows: int,
              shape: int | Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
    """Which elements dropout keeps (bool ``(rows, *shape)``), for the global examples
    ``row_start .. row_start + rows - 1``; each kept with probability :func:`keep_probability`.
    ``out``: a C-contiguous bool array of that shape to fill (a buffer reused every step)."""
    drop = np.uint16(threshold(p))
    index = _row_range(row_start, rows)
    count, shape = _prepare(index, shape)
    result = out = _output(out, count, shape, np.dtype(bool))
    out = out.reshape(count, math.prod(shape))

    def emit(row: int, bits: np.ndarray) -> None:
        np.greater_equal(bits, drop, out=out[row:row + len(bits)])

    _generate(seed, step, site, index, shape, emit)
    return result


def scaled_mask(seed: int, step: int, site: int, p: float, row_start: int, rows: int,
                shape: int | Sequence[int], dtype: Any = np.float32,
                out: np.ndarray | None = None) -> np.ndarray:
    """:func:`keep_mask` as ``dtype`` (float32), kept elements ``1 / keep_probability(p)``:
    dropout is ``x * scaled_mask(...)``, with every element's expectation kept exactly.
    ``out``: a C-contiguous array of that shape and dtype to fill."""
    drop = np.uint16(threshold(p))
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating-point type, got {dtype!r}")
    index = _row_range(row_start, rows)
    count, shape = _prepare(index, shape)
    result = out = _output(out, count, shape, np.dtype(dtype))
    out = out.reshape(count, math.prod(shape))
    scale = out.dtype.type(1.0 / keep_probability(p))

    def emit(row: int, bits: np.ndarray) -> None:
        part = out[row:row + len(bits)]
        np.greater_equal(bits, drop, out=part)
        part *= scale

    _generate(seed, step, site, index, shape, emit)
    return result


def _prepare(rows: Any, shape: Any) -> tuple[int, tuple[int, ...]]:
    return _row_runs(rows)[1], _check_shape(shape)


def _output(out: np.ndarray | None, count: int, shape: tuple[int, ...], dtype: np.dtype
            ) -> np.ndarray:
    """``out`` (checked) or a new array of shape ``(count, *shape)``."""
    if out is None:
        return np.empty((count, *shape), dtype=dtype)
    if (not isinstance(out, np.ndarray) or out.shape != (count, *shape) or out.dtype != dtype
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous {dtype} array of shape "
                         f"{(count, *shape)}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    return out


def _row_range(row_start: int, rows: int) -> range:
    row_start = _check_uint("row_start", row_start)
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 0:
        raise ValueError(f"rows must be a number of examples >= 0, got {rows!r}")
    return range(row_start, row_start + int(rows))


def mask_scale(p: float) -> float:
    """What a kept element is multiplied by, ``1 / keep_probability(p)``: a backend that takes
    bool masks (:func:`encoder_masks` with ``dtype=bool``) scales them by its float32 value,
    which gives :func:`scaled_mask`'s values exactly."""
    return 1.0 / keep_probability(p)


def encoder_masks(config: BERTConfig, seed: int, step: int, row_start: int, rows: int,
                  length: int, dtype: Any = np.float32) -> list[dict[str, np.ndarray]]:
    """The scaled masks of every dropout of the encoder for the global examples ``row_start ..
    row_start + rows - 1`` of a batch padded to ``length``: per layer, ``"attention"``
    ``(rows, num_heads, length, length)`` (batch-major, then heads, as both backends lay out
    the attention weights) and ``"addnorm1"``, ``"addnorm2"`` ``(rows, length, num_hiddens)``.
    ``dtype=bool``: the keep masks (:func:`keep_mask`, a quarter of float32's memory) for a
    backend that scales by :func:`mask_scale` only the elements it reads. Empty when
    ``config.dropout`` is 0."""
    if config.dropout == 0:
        return []
    length = _check_uint("length", length)
    shapes = {"attention": (config.num_heads, length, length),
              "addnorm1": (length, config.num_hiddens), "addnorm2": (length, config.num_hiddens)}
    if np.dtype(dtype) == np.dtype(bool):
        return [{kind: keep_mask(seed, step, site_id(layer, kind), config.dropout, row_start,
                                 rows, shape)
                 for kind, shape in shapes.items()}
                for layer in range(config.num_layers)]
    return [{kind: scaled_mask(seed, step, site_id(layer, kind), config.dropout, row_start,
                               rows, shape, dtype=dtype)
             for kind, shape in shapes.items()}
            for layer in range(config.num_layers)]
