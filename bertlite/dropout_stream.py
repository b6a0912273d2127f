"""The random stream behind :mod:`bertlite.dropout`: counter-based, so that any draw costs the
same to compute on its own.

* per ``(seed, step, site)`` a 64-bit stream key, word 0 of Philox-4x64-10 (Salmon et al.,
  "Parallel random numbers: as easy as 1, 2, 3", SC'11) of the counter
  ``(site, 0, 0, DOMAIN)`` under the key ``(seed, step)`` (:func:`stream_key`);
* word ``c`` of the stream is word ``c`` of SplitMix64 (Steele, Lea and Flood, "Fast
  splittable pseudorandom number generators", OOPSLA'14) seeded with that key:
  ``mix64(key + (c + 1) * GAMMA)`` (:func:`splitmix64`), read as four little-endian 16-bit
  draws, the lowest first.

Rows: the stream is read as rows of ``row_length`` draws; row ``r`` owns the words
``r * ceil(row_length / 4)`` onwards, its draw ``j`` is draw ``j % 4`` of word
``r * ceil(row_length / 4) + j // 4`` (a row's spare draws are unused). :func:`draw_rows` draws
any rows, or a prefix of each, in cache-sized chunks of vectorized NumPy with buffers kept per
thread; a big draw is shared by several threads (:func:`set_num_threads`; NumPy releases the
GIL). :func:`philox4x64` is checked against Random123's known answers, :func:`splitmix64`
against the sequential SplitMix64.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

#: Random draws per 64-bit word of the stream (16 bits a draw).
DRAWS_PER_WORD = 4
#: The Philox counter's last word: keeps these stream keys apart from any other use of Philox
#: with the key.
DOMAIN = 0x64726F70  # "drop"
#: SplitMix64's increment (the golden ratio's 64-bit fraction).
GAMMA = 0x9E3779B97F4A7C15

_U64 = (1 << 64) - 1
_M0, _M1 = 0xD2E7470EE14C6C93, 0xCA5A826395121157  # Philox-4x64 multipliers
_W0, _W1 = 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B  # Weyl key increments
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
#: words per chunk (512 KB: in cache while they become a mask)
_CHUNK_WORDS = 1 << 16
#: draws per thread at least, below which a draw is made by one thread
THREAD_MIN_DRAWS = 1 << 20
_THREADS: int | None = None
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def check_uint(name: str, value: Any, bits: int = 64) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not 0 <= int(value) < 1 << bits:
        raise ValueError(f"{name} must be in [0, 2**{bits}), got {value!r}")
    return int(value)



def philox4x64(counter: Sequence[int], key: Sequence[int], rounds: int = 10
               ) -> tuple[int, int, int, int]:
    """Philox-4x64 of one counter (four 64-bit words, word 0 first) under ``key`` (two words):
    the four output words."""
    if len(counter) != 4:
        raise ValueError(f"counter must be four 64-bit words, got {counter!r}")
    if len(key) != 2:
        raise ValueError(f"key must be two 64-bit words, got {key!r}")
    c0, c1, c2, c3 = (check_uint("counter word", c) for c in counter)
    k0, k1 = (check_uint("key word", k) for k in key)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _U64, (k1 + _W1) & _U64
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = (p1 >> 64) ^ c1 ^ k0, p1 & _U64, (p0 >> 64) ^ c3 ^ k1, p0 & _U64
    return c0, c1, c2, c3


@functools.lru_cache(maxsize=4096)
def stream_key(seed: int, step: int, site: int) -> int:
    """The 64-bit key of the stream of site ``site`` at step ``step`` of the run ``seed``:
    word 0 of Philox-4x64-10 of ``(site, 0, 0, DOMAIN)`` under ``(seed, step)``."""
    return philox4x64((check_uint("site", site), 0, 0, DOMAIN),
                      (check_uint("seed", seed), check_uint("step", step)))[0]


def _mix(z: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, in place on uint64 ``z`` (``tmp``: scratch of its shape)."""
    np.right_shift(z, _S30, out=tmp)
    z ^= tmp
    z *= _MIX1
    np.right_shift(z, _S27, out=tmp)
    z ^= tmp
    z *= _MIX2
    np.right_shift(z, _S31, out=tmp)
    z ^= tmp
    return z


def splitmix64(key: int, counters: Any) -> np.ndarray:
    """Words ``counters`` (uint64) of SplitMix64 seeded with ``key``: ``mix64(key + (c + 1) *
    GAMMA)``, the ``c``-th output (from 0) of the sequential generator."""
    z = np.asarray(counters, dtype=np.uint64) + np.uint64(1)
    z = z * np.uint64(GAMMA) + np.uint64(check_uint("key", key))
    return _mix(z, np.empty_like(z))


def default_threads() -> int:
    """Threads that share a big draw (:func:`set_num_threads`)."""
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


def pool(threads: int) -> ThreadPoolExecutor:
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


_LOCAL = threading.local()


def _ramp(words: int) -> np.ndarray:
    """``(c + 1) * GAMMA`` for ``c < words`` (one array, extended on demand)."""
    ramp = getattr(_LOCAL, "ramp", None)
    if ramp is None or ramp.size < words:
        ramp = _LOCAL.ramp = (np.arange(1, max(words, _CHUNK_WORDS) + 1, dtype=np.uint64)
                              * np.uint64(GAMMA))
    return ramp[:words]


def scratch(name: str, size: int, dtype: Any = np.uint64) -> np.ndarray:
    """A 1-D buffer of ``size`` for this thread, kept under ``name`` from call to call: a
    chunk's temporaries without allocating (and page-faulting) them every time. It is
    overwritten by the next call with the same name in this thread."""
    buffers = _LOCAL.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.size < size or buffer.dtype != np.dtype(dtype):
        buffer = buffers[name] = np.empty(max(size, _CHUNK_WORDS), dtype=dtype)
    return buffer[:size]


def draw_rows(seed: int, step: int, site: int, rows: np.ndarray, row_length: int, take: int,
              emit: Callable[[int, np.ndarray], None], threads: int | None = None) -> None:
    """Draw the first ``take`` draws of every row of ``rows`` (1-D row ids of rows of
    ``row_length``) of the stream of ``(seed, step, site)`` chunk by chunk, handing each to
    ``emit(first, bits)`` with ``bits`` a ``(k, take)`` uint16 view (valid during the call) of
    rows ``first .. first + k - 1``; a big draw is shared by several threads (at most
    ``threads``, default :func:`default_threads`)."""
    key = stream_key(seed, step, site)
    words = -(-row_length // DRAWS_PER_WORD)
    need = -(-take // DRAWS_PER_WORD)
    if rows.size and int(rows.max()) * words + need > _U64:
        raise ValueError(f"rows of {row_length} draws up to row {int(rows.max())} exceed the "
                         "2**64 words of a site's stream")
    per_chunk = max(1, _CHUNK_WORDS // need)
    row_step = np.uint64(words * GAMMA & _U64)  # a row further: words * GAMMA more
    consecutive = need == words and (rows.size < 2 or bool((np.diff(rows) == 1).all()))

    def work(lo: int, hi: int) -> None:
        size = min(per_chunk, hi - lo)
        # word c of the stream is mix64(key + (c + 1) * GAMMA): the chunk's words from their
        # rows' first words, or, for whole consecutive rows, from one ramp
        ramp = _ramp(size * need)
        offsets = ramp[:need] + np.uint64(key)
        z, tmp = scratch("words", size * need), scratch("mix", size * need)
        z, tmp = z.reshape(size, need), tmp.reshape(size, need)
        for first in range(lo, hi, per_chunk):
            k = min(per_chunk, hi - first)
            part = rows[first:first + k]
            if consecutive:
                start = np.uint64((int(part[0]) * words * GAMMA + key) & _U64)
                np.add(ramp[:k * need], start, out=z[:k].reshape(-1))
            else:
                np.add((part.astype(np.uint64) * row_step)[:, None], offsets, out=z[:k])
            _mix(z[:k], tmp[:k])
            emit(first, z[:k].astype("<u8", copy=False).view("<u2")[:, :take])

    threads = min(threads or default_threads(), max(1, rows.size * take // THREAD_MIN_DRAWS))
    if threads == 1:
        work(0, rows.size)
        return
    bounds = [rows.size * i // threads for i in range(threads + 1)]
    for future in [pool(threads).submit(work, lo, hi) for lo, hi in zip(bounds, bounds[1:])]:
        future.result()
