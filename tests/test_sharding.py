"""The one batch-splitting policy of both backends (bertlite.sharding), tested without a
framework: every split covers the batch once, in order, and agrees with the per-backend pieces."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest

from bertlite.sharding import device_slices, normalizers, process_parts, step_pieces

CASES = list(itertools.product([0, 1, 3, 8, 17, 64], [1, 2, 3], [1, 2, 3], [1, 2, 4]))


@pytest.mark.parametrize("rows,accumulate,processes,devices", CASES)
def test_every_split_covers_the_batch_once_in_order(rows, accumulate, processes, devices):
    covered, sizes = [], []
    for rank in range(processes):
        parts = process_parts(rows, accumulate, rank, processes)
        assert len(parts) == accumulate  # every process runs the same number of parts
        for pieces in step_pieces(rows, accumulate=accumulate, num_devices=devices, rank=rank,
                                  num_processes=processes):
            assert 1 <= len(pieces) <= devices and all(p.stop > p.start for p in pieces)
            covered.extend(i for p in pieces for i in range(p.start, p.stop))
        sizes.extend(p.stop - p.start for p in parts)
    assert covered == list(range(rows))
    assert max(sizes) - min(sizes) <= 1


def test_parts_match_numpy_array_split():
    for rows, parts in [(17, 4), (3, 5), (64, 6)]:
        expected = [(int(a[0]), int(a[-1]) + 1) for a in np.array_split(np.arange(rows), parts)
                    if len(a)]
        got = [(s.start, s.stop) for r in range(parts) for s in process_parts(rows, 1, r, parts)
               if s.stop > s.start]
        assert got == expected


def test_short_part_runs_on_its_first_devices():
    assert device_slices(slice(10, 12), 4) == [slice(10, 11), slice(11, 12)]
    assert device_slices(slice(5, 5), 2) == []


def test_normalizers_are_the_whole_batch():
    weights = np.zeros((6, 4), np.float32)
    weights[:, :3] = 1
    weights[5, 2] = 0
    assert normalizers(weights) == (17.0, 6)
    with pytest.raises(ValueError, match="rows, predictions"):
        normalizers(weights.ravel())


@pytest.mark.parametrize("bad", [dict(accumulate=0), dict(accumulate=True), dict(rank=2),
                                 dict(num_processes=0), dict(accumulate=1.5)])
def test_bad_arguments_name_themselves(bad):
    args = dict(num_rows=8, accumulate=1, rank=0, num_processes=2) | bad
    with pytest.raises(ValueError, match="accumulate|rank|num_processes"):
        process_parts(**args)


@pytest.mark.skipif(importlib.util.find_spec("mxnet") is None, reason="mxnet is not installed")
@pytest.mark.parametrize("rows,devices", [(7, 2), (8, 3), (2, 4), (5, 5)])
def test_device_slices_are_what_split_and_load_makes(rows, devices):
    """The MXNet backend splits a part with ``gluon.utils.split_and_load(even_split=False)``
    over its first ``min(devices, rows)`` devices: the same rows as :func:`device_slices`."""
    import mxnet as mx

    data = mx.np.arange(rows) if mx.util.is_np_array() else mx.nd.arange(rows)
    used = [mx.cpu(i) for i in range(min(devices, rows))]
    shards = mx.gluon.utils.split_and_load(data, used, even_split=False)
    got = [shard.asnumpy().astype(int).tolist() for shard in shards]
    assert got == [list(range(s.start, s.stop)) for s in device_slices(slice(0, rows), devices)]
