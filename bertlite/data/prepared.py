"""Training data from a prepared folder (:func:`bertlite.data.prepare.prepare`): the shards
memory-mapped, minibatches gathered from them without loading the corpus.

The order of pass ``e`` is a permutation drawn from ``(seed, e)`` alone, as in
:class:`bertlite.data.loader.BatchIterator` (the same permutation: a folder of one shard gives
the in-memory pipeline's batches), kept as 4 bytes per example (``uint32``) for the pass being
read; so any position (pass, batch) is reached in O(1) and resumed runs continue exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bertlite.data.examples import continuation_mask, mask_tokens
from bertlite.data.loader import MASKING_MODES, Batch
from bertlite.data.manifest import read_manifest
from bertlite.data.prepare import load_folder_vocab
from bertlite.data.shards import file_sha1, open_shard
from bertlite.data.vocab import Vocab
from bertlite.errors import DataError


class PreparedData:
    """A prepared folder: its manifest (checked, shard digests verified with ``verify``), its
    vocabulary and its shards as read-only memory maps."""

    def __init__(self, folder: str | os.PathLike, *, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, verify=verify)
        info = self.manifest["vocab"]
        vocab_file = self.folder / info["file"]
        if not vocab_file.is_file() or file_sha1(vocab_file) != info["sha1"]:
            raise DataError(f"{vocab_file} does not match its digest in the manifest (changed "
                            "or damaged); prepare the corpus again")
        self.vocab: Vocab = load_folder_vocab(self.folder)
        self.settings = self.manifest["settings"]
        self.shards = [open_shard(self.folder / s["file"]) for s in self.manifest["shards"]]
        counts = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def max_len(self) -> int:
        return int(self.settings["max_len"])

    @property
    def digest(self) -> str:
        """The manifest's key: the inputs' content and every setting."""
        return str(self.manifest["key"])

    def records(self, index: np.ndarray) -> np.ndarray:
        """The records of global example indices, in that order (read from the memory maps)."""
        index = np.asarray(index, dtype=np.int64)
        which = np.searchsorted(self.offsets, index, side="right") - 1
        if len(self.shards) == 1:
            return self.shards[0][index]
        out = np.empty(len(index), dtype=self.shards[0].dtype)
        for shard in np.unique(which).tolist():
            rows = which == shard
            out[rows] = self.shards[shard][index[rows] - self.offsets[shard]]
        return out


class PreparedBatches:
    """Shuffled minibatches of a prepared folder with the interface of
    :class:`~bertlite.data.loader.BatchIterator` (``stream``, ``iter_pass``, ``len``). With
    ``masking="dynamic"`` each batch's masks are redrawn from ``(seed, pass, batch)``."""

    def __init__(self, data: PreparedData, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, masking: str = "static", drop_last: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size > len(data):
            raise DataError(f"batch_size {batch_size} is larger than the data ({len(data)} "
                            "examples); lower batch_size or use more text")
        if masking not in MASKING_MODES:
            raise DataError(f"masking must be one of {MASKING_MODES}, got {masking!r}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.shuffle, self.masking, self.drop_last = shuffle, masking, drop_last
        self.continuation = (continuation_mask(data.vocab)
                             if data.settings.get("whole_word_mask") else None)
        self.epoch = 0
        self._order: tuple[int, np.ndarray] | None = None  # the pass whose order is kept

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_examples(self) -> int:
        return len(self.data)

    @property
    def digest(self) -> str:
        return self.data.digest

    def order(self, epoch: int) -> np.ndarray:
        """The example order of pass ``epoch``: the permutation BatchIterator draws."""
        n = len(self.data)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        if self._order is None or self._order[0] != epoch:
            order = np.arange(n, dtype=np.uint32 if n < 2**32 else np.uint64)
            np.random.default_rng([self.seed, 2, epoch]).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch ``index`` of pass ``epoch``."""
        stop = min(len(self.data), (index + 1) * self.batch_size)
        idx = (self.order(epoch)[index * self.batch_size:stop] if self.shuffle
               else np.arange(index * self.batch_size, stop))
        rec = self.data.records(idx)
        i32 = np.int32
        tokens, segments = rec["tokens"].astype(i32), rec["segments"].astype(i32)
        valid_lens = rec["valid_len"].astype(np.float32)
        if self.masking == "dynamic":
            vocab = self.data.vocab
            masked, positions, weights, labels = mask_tokens(
                tokens, segments, valid_lens, vocab_size=len(vocab), mask_id=vocab["<mask>"],
                rng=np.random.default_rng([self.seed, 3, epoch, index]),
                continuation=self.continuation)
        else:
            masked, positions = rec["masked_tokens"].astype(i32), rec["pred_positions"].astype(i32)
            weights, labels = rec["mlm_weights"].astype(np.float32), rec["mlm_labels"].astype(i32)
        return Batch(masked, segments, valid_lens, positions, weights, labels,
                     rec["nsp_label"].astype(i32))

    def iter_pass(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        for i in range(start, len(self)):
            yield self.batch(epoch, i)

    def stream(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """Endless ``(pass, batch index, batch)`` from a position on."""
        while True:
            for i in range(start, len(self)):
                yield epoch, i, self.batch(epoch, i)
            epoch, start = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.iter_pass(epoch)


def open_data(data: str | os.PathLike, *, format: str | None = None, max_len: int = 64,
              seed: int = 0, tokenizer: str = "word", wordpiece_vocab_size: int | None = None,
              whole_word_mask: bool = False, vocab: Vocab | None = None) -> PreparedData:
    """A prepared folder as is, or a corpus (file, folder or glob in a ``format``) prepared
    first into the data cache (reused next time: the manifest is the cache key). A prepared
    folder must have been made with this ``max_len`` (and ``vocab``, when given)."""
    from bertlite.data.manifest import is_prepared
    from bertlite.data.prepare import prepare

    if is_prepared(data):
        prepared = PreparedData(data)
        made = prepared.settings
        if made["max_len"] != max_len:
            raise DataError(f"{data} was prepared with max_len={made['max_len']}, this run has "
                            f"max_len={max_len}; use the same max_len or prepare it again")
        if vocab is not None and (prepared.vocab != vocab or (
                vocab.tokenizer is not None and prepared.vocab.tokenizer != vocab.tokenizer)):
            raise DataError(f"{data} was prepared with another vocabulary (or normalisation) "
                            "than the training data's; prepare it with `bertlite prepare ... "
                            "--vocab-from TRAINING_FOLDER`")
        return prepared
    options = {} if wordpiece_vocab_size is None else \
        {"wordpiece_vocab_size": wordpiece_vocab_size}
    folder = prepare(data, format=format, max_len=max_len, seed=seed, tokenizer=tokenizer,
                     whole_word_mask=whole_word_mask, vocab=vocab, **options)
    return PreparedData(folder)
