"""How one global batch is cut for a step: processes (DDP ranks, kvstore workers), accumulation
micro-batches and the devices of one process, with the normalizers every piece's loss shares.

Written once for both backends, so that any split gives the one-process gradient: every piece's
loss is a sum over its rows divided by the *whole* batch's normalizers (the MLM weight total and
the number of examples), and the pieces' gradients add up to the whole batch's. The rows of a
piece are contiguous, so a piece also knows its global row offset (what a per-row random draw,
such as a dropout mask keyed by the example's place in the batch, needs).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = ["Normalizers", "device_slices", "normalizers", "process_parts", "step_pieces"]


class Normalizers(NamedTuple):
    """The whole batch's loss denominators."""

    mlm_weight_total: float  # sum of the MLM weights (the number of predicted positions)
    num_examples: int  # rows of the global batch (the NSP denominator)


def _check(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _cut(start: int, stop: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices of ``[start, stop)`` whose sizes differ by at most one,
    the longer ones first (as ``numpy.array_split``); some are empty when rows are few."""
    size, extra = divmod(stop - start, parts)
    bounds = [start]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (1 if i < extra else 0))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def process_parts(num_rows: int, accumulate: int = 1, rank: int = 0,
                  num_processes: int = 1) -> list[slice]:
    """This process's ``accumulate`` micro-batches of a global batch of ``num_rows``.

    The batch is cut into ``num_processes * accumulate`` contiguous parts (sizes differing by
    at most one); process ``rank`` takes parts ``rank * accumulate`` to
    ``(rank + 1) * accumulate - 1``. A part is empty when the batch has fewer rows than parts:
    a backend whose processes must run the same passes (DDP) keeps it as a no-op, others skip it.
    """
    num_rows = _check("num_rows", num_rows, 0)
    accumulate = _check("accumulate", accumulate, 1)
    num_processes = _check("num_processes", num_processes, 1)
    rank = _check("rank", rank, 0)
    if rank >= num_processes:
        raise ValueError(f"rank {rank} is not below num_processes {num_processes}")
    parts = _cut(0, num_rows, num_processes * accumulate)
    return parts[rank * accumulate:(rank + 1) * accumulate]


def device_slices(part: slice, num_devices: int) -> list[slice]:
    """A micro-batch's rows over the devices of one process, contiguous, sizes differing by at
    most one; a part shorter than the device list runs on its first devices only (no empty
    slice is returned)."""
    num_devices = _check("num_devices", num_devices, 1)
    rows = part.stop - part.start
    return [s for s in _cut(part.start, part.stop, min(num_devices, max(rows, 1)))
            if s.stop > s.start]


def step_pieces(num_rows: int, *, accumulate: int = 1, num_devices: int = 1, rank: int = 0,
                num_processes: int = 1) -> list[list[slice]]:
    """Every piece this process computes in one step: one list of device slices per non-empty
    micro-batch, in the order they run."""
    return [device_slices(part, num_devices)
            for part in process_parts(num_rows, accumulate, rank, num_processes)
            if part.stop > part.start]


def normalizers(mlm_weights: Any) -> Normalizers:
    """The whole batch's normalizers from its ``(rows, predictions)`` MLM weights (host numpy;
    the float64 sum of 0/1 weights is exact)."""
    weights = np.asarray(mlm_weights)
    if weights.ndim != 2:
        raise ValueError(f"mlm_weights must be (rows, predictions), got shape {weights.shape}")
    return Normalizers(float(weights.astype(np.float64).sum()), int(weights.shape[0]))
