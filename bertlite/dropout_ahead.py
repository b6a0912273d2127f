"""The next step's dropout masks, drawn while this step computes.

A step's masks (:func:`bertlite.dropout.encoder_masks`) are a function of the run seed, the step,
the global rows of each piece and the padded length, all known before the step runs. So while
a backend computes step ``k``, a background thread draws those of step ``k + 1`` for the same
pieces (NumPy's Philox and the comparisons release the GIL): the next step finds them ready when
its pieces are the same, and draws them itself otherwise. The masks are the same either way;
only when they are drawn changes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from bertlite.config import BERTConfig
from bertlite.dropout import encoder_masks

__all__ = ["MasksAhead"]

Masks = list[list[dict[str, np.ndarray]]]


def _draw(config: BERTConfig, seed: int, step: int, rows: tuple[tuple[int, int], ...],
          length: int, dtype: str = "float32") -> Masks:
    return [encoder_masks(config, seed, step, start, stop - start, length, dtype)
            for start, stop in rows]


class MasksAhead:
    """Per-piece masks of a step (``get``), and those of the next step started in a
    background thread. One per model (the masks of one run at a time)."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._future: Future | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def get(self, config: BERTConfig, seed: int, step: int, pieces: Sequence[slice],
            length: int, dtype: Any = np.float32) -> Masks:
        """The masks of every piece (its global rows ``pieces[i]``) at ``(seed, step)``,
        as :func:`bertlite.dropout.encoder_masks` gives them (``dtype``: float32, scaled, or
        bool keep masks); empty lists when ``config.dropout`` is 0 (and nothing drawn
        ahead)."""
        rows = tuple((int(s.start), int(s.stop)) for s in pieces)
        if config.dropout == 0:
            return [[] for _ in rows]
        key = (config, seed, step, rows, length, np.dtype(dtype).name)
        future, self._future = self._future, None
        if future is not None and self._key == key and self._pid == os.getpid():
            masks = future.result()
        else:
            masks = _draw(*key)
        if self._pool is None or self._pid != os.getpid():  # a forked child: a pool of its own
            self._pool, self._pid = ThreadPoolExecutor(1, "bertlite-masks-ahead"), os.getpid()
        self._key = (config, seed, step + 1, rows, length, np.dtype(dtype).name)
        self._future = self._pool.submit(_draw, *self._key)
        return masks
