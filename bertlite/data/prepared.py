"""Training data from a prepared folder (:func:`bertlite.data.prepare.prepare`): the shards
memory-mappable numpy files, minibatches gathered from them without loading the corpus.

A batch's records are read with positional reads (``os.preadv``, one per run of consecutive
rows) where the platform has them, else through the memory maps: pages touched through a
memory map stay in the process's resident set (with the kernel's read-ahead and fault-around,
about 200 KB per random row here, 1.2 GB after 100 batches of 64 from a 3 GB corpus), while
read pages stay in the page cache only, which the kernel reclaims as it needs.

The order of pass ``e`` is the in-memory pipeline's (:mod:`bertlite.data.batches`: a
permutation of ``(seed, e)``, 4 bytes per example for the pass being read), so any position
(pass, batch) is reached in O(1) and resumed runs continue exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bertlite.data.batches import Batch, Gather, ShuffledBatches
from bertlite.data.examples import continuation_mask
from bertlite.data.manifest import read_manifest
from bertlite.data.prepare import load_folder_vocab
from bertlite.data.shards import file_sha1, open_shard
from bertlite.data.vocab import Vocab
from bertlite.errors import DataError
from bertlite.sharding import process_parts

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

#: whether records are read with ``os.preadv`` (POSIX) rather than through the memory maps
POSITIONAL_READS = hasattr(os, "preadv")
#: whether the next reads are announced to the kernel (``posix_fadvise``, Linux and most POSIX)
ADVICE = POSITIONAL_READS and hasattr(os, "posix_fadvise")


def open_file_budget(soft_limit: int | None) -> int:
    """Shard files kept open at once: a quarter of the process's file limit, 16 to 1024
    (1024 where the limit is infinite, 256 where it is unknown)."""
    if soft_limit is None:
        return 256
    if soft_limit < 0:  # RLIM_INFINITY
        return 1024
    return max(16, min(1024, soft_limit // 4))


#: shard files open for reading at most at once
MAX_OPEN_SHARDS = open_file_budget(resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                                   if resource else None)


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
        self._files: dict[int, int] = {}  # shard -> an open file descriptor (positional reads)

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
        """The records of global example indices, in that order."""
        index = np.asarray(index, dtype=np.int64)
        which = self._shards_of(index)
        if not POSITIONAL_READS:
            return self.mapped_records(index, which)
        out = np.empty(len(index), dtype=self.shards[0].dtype)
        size = out.dtype.itemsize
        buffer = memoryview(out.view(np.uint8))
        runs = self._runs(index, which)
        self._advise(runs)  # all of the batch's reads at once, not one after another
        for shard, offset, start, stop in runs:
            read = os.preadv(self._file(shard), [buffer[start * size:stop * size]], offset)
            if read != (stop - start) * size:
                raise DataError(f"{self.shards[shard].filename} is shorter than its manifest "
                                "says (changed or damaged); prepare the corpus again")
        return out

    def will_need(self, index: np.ndarray) -> None:
        """Ask the kernel to start reading these examples' records now (the next batch's, while
        this step computes), so that :meth:`records` finds them in the page cache."""
        index = np.asarray(index, dtype=np.int64)
        if POSITIONAL_READS and len(index):
            self._advise(self._runs(index, self._shards_of(index)))

    def _shards_of(self, index: np.ndarray) -> np.ndarray:
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"example indices must be in [0, {len(self)}), got "
                             f"{index.min()}..{index.max()}")
        return np.searchsorted(self.offsets, index, side="right") - 1

    def _runs(self, index: np.ndarray, which: np.ndarray) -> list[tuple[int, int, int, int]]:
        """``(shard, file offset, start, stop)`` of each run of consecutive rows of one shard
        (``index[start:stop]``): an evaluation pass in order reads a batch at once."""
        if not len(index):
            return []
        size = self.shards[0].dtype.itemsize
        rows = index - self.offsets[which]
        breaks = np.flatnonzero((np.diff(index) != 1) | (np.diff(which) != 0)) + 1
        return [(int(which[start]), self.shards[int(which[start])].offset
                 + int(rows[start]) * size, start, stop)
                for start, stop in zip([0, *breaks.tolist()], [*breaks.tolist(), len(index)])]

    def _advise(self, runs: list[tuple[int, int, int, int]]) -> None:
        if not ADVICE:
            return
        size = self.shards[0].dtype.itemsize
        for shard, offset, start, stop in runs:
            os.posix_fadvise(self._file(shard), offset, (stop - start) * size,
                             os.POSIX_FADV_WILLNEED)

    def mapped_records(self, index: np.ndarray, which: np.ndarray) -> np.ndarray:
        """:meth:`records` through the memory maps (``which``: the shard of each index)."""
        if len(self.shards) == 1:
            return self.shards[0][index]
        out = np.empty(len(index), dtype=self.shards[0].dtype)
        for shard in np.unique(which).tolist():
            rows = which == shard
            out[rows] = self.shards[shard][index[rows] - self.offsets[shard]]
        return out

    def _file(self, shard: int) -> int:
        fd = self._files.pop(shard, None)  # popped and put back: the most recently used last
        if fd is None:
            if len(self._files) >= MAX_OPEN_SHARDS:  # many shards: close the least recently used
                os.close(self._files.pop(next(iter(self._files))))
            fd = os.open(self.shards[shard].filename, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._files[shard] = fd
        return fd

    def close(self) -> None:
        """Close the shard files opened for reading (they reopen when read again)."""
        files, self._files = getattr(self, "_files", {}), {}
        for fd in files.values():
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # descriptors mean nothing in another process


class PreparedBatches(ShuffledBatches):
    """Shuffled minibatches of a prepared folder, read from its memory maps: the batches of
    :class:`~bertlite.data.loader.BatchIterator` (the same order and interface; a folder of
    one shard gives the in-memory pipeline's batches). With ``masking="dynamic"`` each
    batch's masks are redrawn from ``(seed, pass, batch)``."""

    def __init__(self, data: PreparedData, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, masking: str = "static", drop_last: bool = False) -> None:
        super().__init__(len(data), batch_size, seed=seed, shuffle=shuffle, masking=masking,
                         drop_last=drop_last, vocab_size=len(data.vocab),
                         mask_id=data.vocab["<mask>"],
                         continuation=(continuation_mask(data.vocab)
                                       if data.settings.get("whole_word_mask") else None))
        self.data = data
        self._share: tuple[int, int, int, Callable[[float], float]] | None = None

    def read_share(self, rank: int, num_processes: int, *, accumulate: int = 1,
                   sum_over_processes: Callable[[float], float] | None = None) -> None:
        """Read only the rows process ``rank`` of ``num_processes`` trains on
        (:func:`bertlite.sharding.process_parts` with ``accumulate``) from now on.

        Every batch keeps its global shape; the other processes' rows are placeholders (zeros)
        and only their MLM weights carry a value: the other processes' weight total, summed by
        ``sum_over_processes`` (a collective every process calls once per batch, in the same
        order), so the whole batch's normalizers are those of the one-process batch. A batch
        with fewer rows than parts, and ``masking="dynamic"`` (its draws span the whole
        batch), are read whole, as in one process."""
        if num_processes <= 1:
            self._share = None
            return
        if sum_over_processes is None:
            raise ValueError("read_share over several processes needs sum_over_processes")
        process_parts(0, accumulate, rank, num_processes)  # checks the arguments
        self._share = (rank, num_processes, accumulate, sum_over_processes)

    def _share_rows(self, num_rows: int) -> slice | None:
        """This process's rows of a batch of ``num_rows``, or None to read the whole batch."""
        if self._share is None or self.masking == "dynamic":
            return None
        rank, num_processes, accumulate, _ = self._share
        if num_rows < num_processes * accumulate:
            return None
        parts = process_parts(num_rows, accumulate, rank, num_processes)
        return slice(parts[0].start, parts[-1].stop)

    @property
    def digest(self) -> str:
        return self.data.digest

    def gatherer(self, epoch: int) -> Gather:
        return lambda index, idx: self._gather(epoch, index, idx)

    def _gather(self, epoch: int, index: int, idx: np.ndarray) -> Batch:
        """Batch ``index`` of pass ``epoch``: the records of examples ``idx`` (this process's
        rows only, after :meth:`read_share`) as a Batch."""
        rows = self._share_rows(len(idx))
        if rows is None:
            rec = self.data.records(idx)
        else:
            rec = np.zeros(len(idx), dtype=self.data.shards[0].dtype)
            rec[rows] = self.data.records(idx[rows])
        if index + 1 < len(self):  # the next batch's records are read while this one trains
            upcoming = self.indices(epoch, index + 1)
            share = self._share_rows(len(upcoming))
            self.data.will_need(upcoming if share is None else upcoming[share])
        i32 = np.int32
        tokens, segments = rec["tokens"].astype(i32), rec["segments"].astype(i32)
        valid_lens = rec["valid_len"].astype(np.float32)
        if self.masking == "dynamic":
            masked, positions, weights, labels = self.redraw_masks(
                tokens, segments, valid_lens, epoch, index)
        else:
            masked, positions = rec["masked_tokens"].astype(i32), rec["pred_positions"].astype(i32)
            weights, labels = rec["mlm_weights"].astype(np.float32), rec["mlm_labels"].astype(i32)
        if rows is not None:  # the other processes' weight total, on one placeholder row
            own = float(weights[rows].sum(dtype=np.float64))
            others = self._share[3](own) - own
            weights[rows.stop % len(idx), 0] = others  # integers below 2**24: exact
        return Batch(masked, segments, valid_lens, positions, weights, labels,
                     rec["nsp_label"].astype(i32))


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
