"""Dropout masks as a function of where they apply, not of who computes them.

Every mask element is a 16-bit random draw fixed by the run seed, the step, the dropout *site*
(a layer's attention weights, or one of its two add & norm inputs: :func:`site_id`), the
*global* index of the example in the batch and the element's place in that example's shape.
So the mask of rows ``[a, b)`` computed alone equals rows ``a..b-1`` of the whole batch's mask:
accumulation micro-batches, devices, DDP ranks and kvstore workers all see the masks of one
process with the whole batch, and a resumed run the masks of an uninterrupted one (the step
is in the key). Backends that take their masks from here draw the same ones, bit for bit.

The draws come from a counter-based stream per ``(seed, step, site)``
(:mod:`bertlite.dropout_stream`: SplitMix64 keyed by Philox-4x64-10), so any element costs the
same to compute on its own.

Layout: a site's per-example shape ``(..., n)`` is a stack of *rows* of its last axis, row
``example * prod(shape[:-1]) + (flat index over the leading axes)`` of the site's stream read
in rows of ``n`` draws (:func:`bertlite.dropout_stream.draw_rows`). So a path that computes
fewer positions draws only those: some rows (the valid tokens, :func:`keep_rows` at
:func:`position_rows`), or a prefix of each row (the keys of an attention group padded to its
longest, ``take=``, at :func:`attention_rows`). The per-example shape is part of the layout:
every part of a batch must pass the same one (one example's shape at the batch's
``max_len``).

The draws become the mask chunk by chunk while in cache; a big mask is drawn by several threads
(:func:`set_num_threads`), and ``out=`` fills a buffer reused from step to step.

An element is dropped when its draw is below :func:`threshold` ``= round(p * 65536)``, so it is
kept with probability exactly :func:`keep_probability` ``= 1 - threshold(p) / 65536`` (``p``
rounded to a multiple of 2**-16); :func:`scaled_mask` scales kept elements by
``1 / keep_probability(p)``, which keeps every activation's expectation exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bertlite.config import BERTConfig
from bertlite.dropout_stream import (
    DRAWS_PER_WORD,
    THREAD_MIN_DRAWS,
    check_uint,
    default_threads,
    draw_rows,
    pool,
    scratch,
    set_num_threads,
)

__all__ = ["DRAWS_PER_WORD", "LEVELS", "SITE_KINDS", "encoder_masks", "keep_mask",
           "attention_rows", "keep_probability", "keep_rows", "mask_scale", "position_rows",
           "random_bits", "row_bits",
           "scaled_mask", "scaled_rows", "set_num_threads", "site_id", "site_shapes",
           "threshold"]

#: Distinct values of a draw.
LEVELS = 1 << 16
#: The dropout sites of an encoder block, in the book's names: the attention weights and the
#: inputs of the two add & norm layers.
SITE_KINDS = ("attention", "addnorm1", "addnorm2")


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


def mask_scale(p: float) -> float:
    """What a kept element is multiplied by, ``1 / keep_probability(p)``: a backend that takes
    bool masks (:func:`keep_rows`, :func:`keep_mask`) scales them by its float32 value, which
    gives :func:`scaled_mask`'s values exactly."""
    return 1.0 / keep_probability(p)


def site_id(layer: int, kind: str) -> int:
    """The site number of one dropout of encoder block ``layer`` (``kind`` one of
    :data:`SITE_KINDS`), the same in every backend."""
    layer = check_uint("layer", layer, 32)
    if kind not in SITE_KINDS:
        raise ValueError(f"unknown dropout site kind {kind!r}; choose one of {SITE_KINDS}")
    return layer * len(SITE_KINDS) + SITE_KINDS.index(kind)


def _check_rows(rows: Any) -> np.ndarray:
    index = np.asarray(rows)
    if not (index.size == 0 or np.issubdtype(index.dtype, np.integer)):
        raise TypeError(f"rows must be integer row indices, got {rows!r}")
    if index.size and index.min() < 0:
        raise ValueError(f"rows must be global row indices >= 0, got {index.min()}")
    return index.astype(np.int64, copy=False)


def _check_take(row_length: Any, take: Any) -> tuple[int, int]:
    row_length = check_uint("row_length", row_length)
    take = row_length if take is None else check_uint("take", take)
    if not 0 < take <= row_length:
        raise ValueError(f"take must be in [1, row_length={row_length}], got {take}")
    return row_length, take


def row_bits(seed: int, step: int, site: int, rows: Any, row_length: int,
             take: int | None = None) -> np.ndarray:
    """The uint16 draws ``(*rows.shape, take)`` of the rows ``rows`` (global row ids, any
    shape; see the layout above) of ``row_length`` draws, their first ``take`` (all by
    default), of site ``site`` at step ``step`` of the run ``seed``."""
    index = _check_rows(rows)
    row_length, take = _check_take(row_length, take)
    flat = index.reshape(-1)
    out = np.empty((flat.size, take), dtype=np.uint16)

    def emit(first: int, bits: np.ndarray) -> None:
        out[first:first + len(bits)] = bits

    draw_rows(seed, step, site, flat, row_length, take, emit)
    return out.reshape(*index.shape, take)


def keep_rows(seed: int, step: int, site: int, p: float, rows: Any, row_length: int,
              take: int | None = None, out: np.ndarray | None = None,
              threads: int | None = None) -> np.ndarray:
    """Which elements dropout keeps (bool ``(*rows.shape, take)``) in the rows ``rows``
    (global row ids, any shape: example ``e``'s rows of a per-example shape ``(..., n)`` are
    ``e * prod(shape[:-1])`` onwards) of ``row_length`` elements, their first ``take``: what a
    path that computes only some positions reads of :func:`keep_mask`'s mask. ``out``: a
    C-contiguous bool array of that shape to fill; ``threads``: at most this many draw it
    (default: :func:`set_num_threads`')."""
    drop = np.uint16(threshold(p))

    def fill(part: np.ndarray, bits: np.ndarray) -> None:
        np.greater_equal(bits, drop, out=part)

    return _rows(seed, step, site, rows, row_length, take, out, np.dtype(bool), fill, threads)


def scaled_rows(seed: int, step: int, site: int, p: float, rows: Any, row_length: int,
                take: int | None = None, dtype: Any = np.float32,
                out: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """:func:`keep_rows` as ``dtype`` (float32), kept elements ``1 / keep_probability(p)``
    (:func:`scaled_mask`'s values at those rows)."""
    drop = np.uint16(threshold(p))
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating-point type, got {dtype!r}")
    scale = np.dtype(dtype).type(mask_scale(p))

    def fill(part: np.ndarray, bits: np.ndarray) -> None:
        np.greater_equal(bits, drop, out=part)
        part *= scale

    return _rows(seed, step, site, rows, row_length, take, out, np.dtype(dtype), fill,
                 threads)


def _rows(seed: int, step: int, site: int, rows: Any, row_length: int, take: int | None,
          out: np.ndarray | None, dtype: np.dtype,
          fill: Callable[[np.ndarray, np.ndarray], None], threads: int | None) -> np.ndarray:
    index = _check_rows(rows)
    row_length, take = _check_take(row_length, take)
    flat = index.reshape(-1)
    result = out = _output(out, (*index.shape, take), dtype)
    out = out.reshape(flat.size, take)

    def emit(first: int, bits: np.ndarray) -> None:
        fill(out[first:first + len(bits)], bits)

    draw_rows(seed, step, site, flat, row_length, take, emit, threads)
    return result


# -- whole masks ---------------------------------------------------------------------------------


def _examples(rows: Any) -> np.ndarray:
    """Global example indices: a ``range`` or a 1-D integer sequence."""
    if isinstance(rows, range):
        if rows.start < 0 or (len(rows) and rows[-1] < 0):
            raise ValueError(f"rows must be global example indices >= 0, got {rows!r}")
        return np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)
    index = np.asarray(rows)
    if index.ndim != 1 or not (index.size == 0 or np.issubdtype(index.dtype, np.integer)):
        raise TypeError("rows must be a range or a 1-D sequence of integer example indices, "
                        f"got {rows!r}")
    if index.size and index.min() < 0:
        raise ValueError(f"rows must be global example indices >= 0, got {index.min()}")
    return index.astype(np.int64)


def _check_shape(shape: Any) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if (not shape or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d <= 0
                         for d in shape)):
        raise ValueError(f"shape (one example's) must be positive integers, got {shape!r}")
    return tuple(int(d) for d in shape)


def _example_rows(examples: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The global row ids of these examples' masks of per-example ``shape``, in order."""
    per_example = math.prod(shape[:-1])
    return (examples[:, None] * per_example + np.arange(per_example, dtype=np.int64)).reshape(-1)


def _valid_rows(examples: np.ndarray, shape: tuple[int, ...], valid_lens: Any
                ) -> tuple[np.ndarray, np.ndarray]:
    """The global row ids, and their places in the mask, of the rows at a valid position
    (the second-to-last axis below the example's valid length)."""
    if len(shape) < 2:
        raise ValueError(f"valid_lens needs a per-example shape with a position axis (the "
                         f"second-to-last), got {shape}")
    lens = np.asarray(valid_lens)
    if lens.shape != examples.shape or not (lens.size == 0
                                            or np.issubdtype(lens.dtype, np.number)):
        raise ValueError(f"valid_lens must give one length per example ({examples.size}), "
                         f"got {valid_lens!r}")
    per_example = math.prod(shape[:-1])
    positions = np.arange(per_example) % shape[-2]
    index, row = np.nonzero(positions[None, :] < lens.astype(np.int64)[:, None])
    return examples[index] * per_example + row, index * per_example + row


def _whole(seed: int, step: int, site: int, examples: np.ndarray, shape: tuple[int, ...],
           out: np.ndarray, fill: Callable[[np.ndarray, np.ndarray], None],
           valid_lens: Any = None, threads: int | None = None) -> np.ndarray:
    flat = out.reshape(-1, shape[-1])
    seed, step, site = (check_uint(n, v) for n, v in (("seed", seed), ("step", step),
                                                        ("site", site)))
    if valid_lens is None:
        rows = _example_rows(examples, shape)

        def emit(first: int, bits: np.ndarray) -> None:
            fill(flat[first:first + len(bits)], bits)
    else:  # the valid rows only, each in its place; the others 0
        rows, places = _valid_rows(examples, shape, valid_lens)
        flat[...] = 0

        def emit(first: int, bits: np.ndarray) -> None:
            part = scratch("mask rows", bits.size, out.dtype).reshape(bits.shape)
            fill(part, bits)
            flat[places[first:first + len(bits)]] = part

    draw_rows(seed, step, site, rows, shape[-1], shape[-1], emit, threads)
    return out


def random_bits(seed: int, step: int, site: int, rows: range | Sequence[int],
                shape: int | Sequence[int]) -> np.ndarray:
    """The uint16 draws ``(len(rows), *shape)`` of site ``site`` at step ``step`` of the run
    ``seed``, for the global example indices ``rows`` (a ``range`` for a contiguous part of the
    batch, else any sequence); ``shape`` is one example's shape at this site."""
    examples, shape = _examples(rows), _check_shape(shape)
    out = np.empty((examples.size, *shape), dtype=np.uint16)

    def fill(part: np.ndarray, bits: np.ndarray) -> None:
        part[...] = bits

    return _whole(seed, step, site, examples, shape, out, fill)


def keep_mask(seed: int, step: int, site: int, p: float, row_start: int, rows: int,
              shape: int | Sequence[int], out: np.ndarray | None = None,
              valid_lens: Any = None, threads: int | None = None) -> np.ndarray:
    """Which elements dropout keeps (bool ``(rows, *shape)``), for the global examples
    ``row_start .. row_start + rows - 1``; each kept with probability :func:`keep_probability`.
    ``out``: a C-contiguous bool array of that shape to fill (a buffer reused every step).
    ``valid_lens`` (one per example): draw only the rows at valid positions (the
    second-to-last axis below the example's valid length) and leave the others False: what a
    model that gives padded keys no attention weight reads (its padded positions never reach
    a valid one). ``threads``: at most this many draw it (default: :func:`set_num_threads`')."""
    drop = np.uint16(threshold(p))
    examples, shape = _examples(_row_range(row_start, rows)), _check_shape(shape)
    out = _output(out, (examples.size, *shape), np.dtype(bool))

    def fill(part: np.ndarray, bits: np.ndarray) -> None:
        np.greater_equal(bits, drop, out=part)

    return _whole(seed, step, site, examples, shape, out, fill, valid_lens, threads)


def scaled_mask(seed: int, step: int, site: int, p: float, row_start: int, rows: int,
                shape: int | Sequence[int], dtype: Any = np.float32,
                out: np.ndarray | None = None, valid_lens: Any = None,
                threads: int | None = None) -> np.ndarray:
    """:func:`keep_mask` as ``dtype`` (float32), kept elements ``1 / keep_probability(p)``:
    dropout is ``x * scaled_mask(...)``, with every element's expectation kept exactly.
    ``out``: a C-contiguous array of that shape and dtype to fill; ``valid_lens``,
    ``threads``: as :func:`keep_mask`'s (the other rows 0)."""
    drop = np.uint16(threshold(p))
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating-point type, got {dtype!r}")
    examples, shape = _examples(_row_range(row_start, rows)), _check_shape(shape)
    out = _output(out, (examples.size, *shape), np.dtype(dtype))
    scale = out.dtype.type(mask_scale(p))

    def fill(part: np.ndarray, bits: np.ndarray) -> None:
        np.greater_equal(bits, drop, out=part)
        part *= scale

    return _whole(seed, step, site, examples, shape, out, fill, valid_lens, threads)


def _output(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``out`` (checked) or a new array of ``shape``."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if (not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous {dtype} array of shape "
                         f"{shape}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    return out


def _row_range(row_start: int, rows: int) -> range:
    row_start = check_uint("row_start", row_start)
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 0:
        raise ValueError(f"rows must be a number of examples >= 0, got {rows!r}")
    return range(row_start, row_start + int(rows))


def site_shapes(config: BERTConfig, length: int) -> dict[str, tuple[int, ...]]:
    """One example's mask shape at every site of a block, for a batch padded to ``length``:
    ``"attention"`` ``(num_heads, length, length)`` (heads, then queries, then keys, as both
    backends lay out the attention weights) and ``"addnorm1"``, ``"addnorm2"``
    ``(length, num_hiddens)``."""
    length = check_uint("length", length)
    return {"attention": (config.num_heads, length, length),
            "addnorm1": (length, config.num_hiddens), "addnorm2": (length, config.num_hiddens)}


def position_rows(examples: Any, positions: Any, length: int) -> np.ndarray:
    """The rows of an add & norm site (per-example shape ``(length, hidden)``) at the global
    ``examples`` and their ``positions`` (broadcast together): ``example * length +
    position``."""
    return np.asarray(examples, dtype=np.int64) * length + np.asarray(positions, dtype=np.int64)


def attention_rows(examples: Any, queries: Any, num_heads: int, length: int) -> np.ndarray:
    """The rows ``(len(examples), num_heads, queries)`` of the attention site (per-example
    shape ``(num_heads, length, length)``) of the global ``examples`` (1-D) at their query
    positions ``queries`` (``(len(examples), Q)``, or ``(1, Q)`` for all alike), every head."""
    examples = np.asarray(examples, dtype=np.int64)[:, None, None]
    heads = np.arange(num_heads, dtype=np.int64)[None, :, None]
    return (examples * num_heads + heads) * length + np.asarray(queries, dtype=np.int64)[:, None, :]


def encoder_masks(config: BERTConfig, seed: int, step: int, row_start: int, rows: int,
                  length: int, dtype: Any = np.float32, valid_lens: Any = None,
                  layers: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
    """The scaled masks of every dropout of the encoder for the global examples ``row_start ..
    row_start + rows - 1`` of a batch padded to ``length``, per layer by site
    (:func:`site_shapes`, batch-major). ``dtype=bool``: the keep masks (:func:`keep_mask`, a
    quarter of float32's memory) for a backend that scales by :func:`mask_scale` only the
    elements it reads. ``valid_lens``: only the valid positions' rows drawn, the others 0
    (:func:`keep_mask`). ``layers``: these layers only (default all). Empty when
    ``config.dropout`` is 0."""
    if config.dropout == 0:
        return []
    shapes = site_shapes(config, length)
    sites = [(layer, kind) for layer in (range(config.num_layers) if layers is None else layers)
             for kind in shapes]
    draw = keep_mask if np.dtype(dtype) == np.dtype(bool) else functools.partial(scaled_mask,
                                                                                 dtype=dtype)

    def site_mask(layer: int, kind: str, threads: int | None = None) -> np.ndarray:
        return draw(seed, step, site_id(layer, kind), config.dropout, row_start, rows,
                    shapes[kind], valid_lens=valid_lens, threads=threads)

    threads = default_threads()
    draws = rows * sum(math.prod(shapes[kind]) for _, kind in sites)
    if threads > 1 and len(sites) > 1 and draws >= 2 * THREAD_MIN_DRAWS:
        # the sites side by side, one thread each (no thread waits on another's pool task)
        futures = [pool(threads).submit(site_mask, layer, kind, 1) for layer, kind in sites]
        masks = [future.result() for future in futures]
    else:
        masks = [site_mask(layer, kind) for layer, kind in sites]
    per_layer = len(shapes)
    return [dict(zip(shapes, masks[i:i + per_layer])) for i in range(0, len(masks), per_layer)]
