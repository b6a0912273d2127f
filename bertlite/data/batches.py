"""Shuffled minibatches of numbered examples, whatever holds them: the order of every pass,
the batches' example indices, dynamic masks and exact resumption, written once for the
in-memory examples (:class:`bertlite.data.loader.BatchIterator`) and the memory-mapped
shards of a prepared folder (:class:`bertlite.data.prepared.PreparedBatches`).

The order of pass ``e`` is a permutation drawn from ``(seed, e)`` alone, so any position of a
run (pass, batch) is reached in O(1): that is how training resumes exactly. Only the order of
the pass being read is kept, as 4 bytes per example (``uint32``), so a corpus of any size costs
no more per example than that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from bertlite.data.examples import mask_tokens
from bertlite.errors import DataError

MASKING_MODES = ("static", "dynamic")


class Batch(NamedTuple):
    """One minibatch, fields in the order of the book's ``train_iter``."""

    tokens: np.ndarray          # (B, max_len) int32, masked input
    segments: np.ndarray        # (B, max_len) int32
    valid_lens: np.ndarray      # (B,) float32
    pred_positions: np.ndarray  # (B, max_preds) int32
    mlm_weights: np.ndarray     # (B, max_preds) float32
    mlm_labels: np.ndarray      # (B, max_preds) int32
    nsp_labels: np.ndarray      # (B,) int32


#: gathers one batch of a pass: (batch index, the example indices of the batch) -> Batch
Gather = Callable[[int, np.ndarray], Batch]


class ShuffledBatches:
    """Shuffled minibatches of ``num_examples`` examples; each ``iter()`` is a new pass.

    A subclass says how the batches of one pass are gathered (:meth:`gatherer`); this class
    decides which examples each batch holds. With ``masking="dynamic"`` the MLM masks are
    redrawn (:meth:`redraw_masks`, needs ``vocab_size`` and ``mask_id``; ``continuation``
    masks whole words).
    """

    def __init__(self, num_examples: int, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, masking: str = "static", drop_last: bool = False,
                 vocab_size: int | None = None, mask_id: int | None = None,
                 continuation: np.ndarray | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size > num_examples:
            raise DataError(f"batch_size {batch_size} is larger than the data "
                            f"({num_examples} examples); lower batch_size or use more text")
        if masking not in MASKING_MODES:
            raise DataError(f"masking must be one of {MASKING_MODES}, got {masking!r}")
        if masking == "dynamic" and (vocab_size is None or mask_id is None):
            raise DataError("dynamic masking needs vocab_size and mask_id")
        self._num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.shuffle, self.masking, self.drop_last = shuffle, masking, drop_last
        self.vocab_size, self.mask_id = vocab_size, mask_id
        self.continuation = continuation  # whole-word masking when dynamic masks are drawn
        self.epoch = 0  # the pass the next iter() starts
        self._order: tuple[int, np.ndarray] | None = None  # the pass whose order is kept

    def __len__(self) -> int:
        n = self._num_examples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_examples(self) -> int:
        return self._num_examples

    def order(self, epoch: int) -> np.ndarray:
        """The example order of pass ``epoch`` (``rng.permutation(n)`` of ``(seed, 2, epoch)``,
        drawn in place in the smallest index dtype)."""
        n = self._num_examples
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        if self._order is None or self._order[0] != epoch:
            order = np.arange(n, dtype=np.uint32 if n < 2**32 else np.uint64)
            np.random.default_rng([self.seed, 2, epoch]).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def indices(self, epoch: int, index: int) -> np.ndarray:
        """The example indices of batch ``index`` of pass ``epoch``, in batch order."""
        start = index * self.batch_size
        stop = min(self._num_examples, start + self.batch_size)
        return self.order(epoch)[start:stop] if self.shuffle else np.arange(start, stop)

    def redraw_masks(self, tokens: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray,
                     *key: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Dynamic masks of these rows (``masked_tokens, pred_positions, mlm_weights,
        mlm_labels``), drawn from ``(seed, 3, *key)``."""
        return mask_tokens(tokens, segments, valid_lens, vocab_size=self.vocab_size,
                           mask_id=self.mask_id, continuation=self.continuation,
                           rng=np.random.default_rng([self.seed, 3, *key]))

    def gatherer(self, epoch: int) -> Gather:
        """How the batches of pass ``epoch`` are gathered (what a pass shares, such as masks
        drawn for the whole pass, is made here, once)."""
        raise NotImplementedError

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch ``index`` of pass ``epoch``."""
        return self.gatherer(epoch)(index, self.indices(epoch, index))

    def iter_pass(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of pass ``epoch``, from batch index ``start`` on."""
        gather = self.gatherer(epoch)
        for i in range(start, len(self)):
            yield gather(i, self.indices(epoch, i))

    def stream(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """Endless ``(pass, batch index, batch)`` from a position on, for step-based training."""
        while True:
            for i, batch in enumerate(self.iter_pass(epoch, start), start):
                yield epoch, i, batch
            epoch, start = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.iter_pass(epoch)
