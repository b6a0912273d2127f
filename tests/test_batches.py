"""The batch order shared by the in-memory and the prepared-folder pipelines
(bertlite/data/batches.py): the permutation of ``(seed, pass)``, a batch reached at its
position equal to the one iterated to, and no more than 4 bytes kept per example."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from bertlite.data.batches import ShuffledBatches
from bertlite.data.loader import BatchIterator, prepare_data
from bertlite.data.prepare import prepare
from bertlite.data.prepared import PreparedBatches, PreparedData

SAMPLE = Path(__file__).resolve().parents[1] / "bertlite" / "data" / "sample" / "wiki.train.tokens"
MAX_LEN = 32


@pytest.fixture(scope="module")
def in_memory():
    return prepare_data(SAMPLE, MAX_LEN, seed=5, cache=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The sample corpus prepared into several shards."""
    return prepare(SAMPLE, tmp_path_factory.mktemp("prepared") / "p", max_len=MAX_LEN, seed=5,
                   shard_bytes=30_000, workers=1)


def both_paths(in_memory, folder, masking: str) -> list[ShuffledBatches]:
    examples, vocab = in_memory
    memory = BatchIterator(examples, 24, seed=3, masking=masking, vocab_size=len(vocab),
                           mask_id=vocab["<mask>"])
    return [memory, PreparedBatches(PreparedData(folder), 24, seed=3, masking=masking)]


def test_the_order_of_a_pass_is_the_permutation_of_seed_and_pass(in_memory, folder):
    for batches in both_paths(in_memory, folder, "static"):
        n = batches.num_examples
        for epoch in (0, 2):
            order = batches.order(epoch)
            expected = np.random.default_rng([3, 2, epoch]).permutation(n)
            np.testing.assert_array_equal(order, expected)
            assert order.dtype == np.uint32  # 4 bytes per example
        assert not np.array_equal(batches.order(0), batches.order(1))
        assert len(batches) == -(-n // 24)
        last = batches.indices(0, len(batches) - 1)
        assert len(last) == n - 24 * (len(batches) - 1)


@pytest.mark.parametrize("masking", ["static", "dynamic"])
def test_a_batch_at_its_position_is_the_one_iterated_to(in_memory, folder, masking):
    for batches in both_paths(in_memory, folder, masking):
        iterated = list(batches.iter_pass(1))
        assert len(iterated) == len(batches)
        for index in (0, 3, len(batches) - 1):
            for got, expected in zip(batches.batch(1, index), iterated[index]):
                np.testing.assert_array_equal(got, expected)
        resumed = list(itertools.islice(batches.stream(1, 3), len(batches) - 3 + 1))
        assert [(e, i) for e, i, _ in resumed] == (
            [(1, i) for i in range(3, len(batches))] + [(2, 0)])
        for (_, _, got), expected in zip(resumed, iterated[3:]):
            for x, y in zip(got, expected):
                np.testing.assert_array_equal(x, y)
        fresh = [b.nsp_labels for b in batches.iter_pass(2)]
        np.testing.assert_array_equal(resumed[-1][2].nsp_labels, fresh[0])


def test_prepared_batches_keep_four_bytes_per_example(folder):
    data = PreparedData(folder)
    assert len(data.shards) > 3
    batches = PreparedBatches(data, 16, seed=0, masking="dynamic")
    for _ in itertools.islice(batches.stream(0, 0), len(batches) + 2):  # into the next pass
        pass
    kept = [value for value in vars(batches).values() if value is not data]
    kept += [part for value in kept if isinstance(value, tuple) for part in value]
    nbytes = sum(value.nbytes for value in kept if isinstance(value, np.ndarray))
    assert nbytes == 4 * len(data)
