"""bertlite.dropout and its stream (bertlite.dropout_stream): Philox and SplitMix64 known
answers, masks that do not depend on how the batch is split, their statistics, independence
and argument errors (no framework needed)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from bertlite import dropout as D
from bertlite import dropout_stream as S

# Random123's published known answers (kat_vectors): counter words, key words, output words.
KAT_4X64 = {
    7: [
        ([0] * 4, [0] * 2, [0x5DC8EE6268EC62CD, 0x139BC570B6C125A0, 0x84D6DEB4FB65F49E,
                            0xAFF7583376D378C2]),
        ([2**64 - 1] * 4, [2**64 - 1] * 2, [0x071DD84367903154, 0x48E2BBDC722B37D1,
                                            0x6AFA9890BB89F76C, 0x9194C8D8ADA56AC7]),
        ([0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89],
         [0x452821E638D01377, 0xBE5466CF34E90C6C],
         [0x513A366704EDF755, 0xF05D9924C07044D3, 0xBEF2CB9CBEA74C6C, 0x8DB948DE4CAA1F8A]),
    ],
    10: [
        ([0] * 4, [0] * 2, [0x16554D9ECA36314C, 0xDB20FE9D672D0FDC, 0xD7E772CEE186176B,
                            0x7E68B68AEC7BA23B]),
        ([2**64 - 1] * 4, [2**64 - 1] * 2, [0x87B092C3013FE90B, 0x438C3C67BE8D0224,
                                            0x9CC7D7C69CD777B6, 0xA09CAEBF594F0BA0]),
        ([0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89],
         [0x452821E638D01377, 0xBE5466CF34E90C6C],
         [0xA528F45403E61D95, 0x38C72DBD566E9788, 0xA5A1610E72FD18B5, 0x57BD43B5E52B7FE6]),
    ],
}


@pytest.mark.parametrize("rounds,counter,key,expected",
                         [(r, *case) for r, cases in KAT_4X64.items() for case in cases])
def test_philox4x64_known_answers(rounds, counter, key, expected):
    assert list(S.philox4x64(counter, key, rounds=rounds)) == expected


def _splitmix64(seed, n):
    """The sequential SplitMix64 of Steele, Lea and Flood (Vigna's splitmix64.c), n outputs."""
    state, out = seed, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
        out.append(z ^ (z >> 31))
    return out


def test_splitmix64_is_the_sequential_generator():
    # its published first outputs from seed 0
    assert _splitmix64(0, 2) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    for seed in (0, 1, 2**64 - 1, 0x243F6A8885A308D3):
        words = S.splitmix64(seed, np.arange(40, dtype=np.uint64))
        assert words.dtype == np.uint64
        assert [int(w) for w in words] == _splitmix64(seed, 40)
    # any word on its own: counter c is the c-th output
    assert int(S.splitmix64(7, [39])[0]) == _splitmix64(7, 40)[39]


def test_stream_keys_are_philox_of_the_site():
    assert S.stream_key(3, 5, 7) == S.philox4x64((7, 0, 0, S.DOMAIN), (3, 5))[0]
    keys = {S.stream_key(seed, step, site) for seed in range(3) for step in range(3)
            for site in range(3)}
    assert len(keys) == 27


def _reference_bits(seed, step, site, rows, shape):
    """The documented layout, from the scalar references: element ``j`` of row ``r`` (example
    ``e``'s leading index ``a``: ``r = e * prod(shape[:-1]) + a``) is draw ``j % 4`` of word
    ``r * ceil(n / 4) + j // 4`` of SplitMix64 seeded with the site's stream key."""
    n, per_example = shape[-1], math.prod(shape[:-1])
    words = -(-n // 4)
    key = S.philox4x64((site, 0, 0, S.DOMAIN), (seed, step))[0]
    out = np.empty((len(rows), per_example, n), dtype=np.uint16)
    for i, e in enumerate(rows):
        for a in range(per_example):
            first = (e * per_example + a) * words
            stream = [(key + (first + c + 1) * 0x9E3779B97F4A7C15) % 2**64
                      for c in range(words)]
            ws = [_mix(z) for z in stream]
            draws = [(w >> (16 * lane)) & 0xFFFF for w in ws for lane in range(4)]
            out[i, a] = draws[:n]
    return out.reshape(len(rows), *shape)


def _mix(z):
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
    return z ^ (z >> 31)


@pytest.mark.parametrize("seed,step,site,rows,shape", [
    (0, 0, 0, range(3), (16,)),
    (7, 123, 5, range(40, 44), (3, 37)),  # 37 draws a row: the last word's three spare
    (2**64 - 1, 2**64 - 1, 2**40, [9, 2, 2**20], (2, 5, 5)),
])
def test_fast_path_is_the_documented_layout(seed, step, site, rows, shape):
    bits = D.random_bits(seed, step, site, rows, shape)
    assert bits.dtype == np.uint16 and bits.shape == (len(rows), *shape)
    np.testing.assert_array_equal(bits, _reference_bits(seed, step, site, rows, shape))


def test_keep_rows_are_the_whole_masks_elements():
    """What a path that computes fewer positions draws: some rows, a prefix of each."""
    rng = np.random.default_rng(1)
    batch, shape, p = 12, (3, 10, 10), 0.3  # (heads, queries, keys) of one example
    whole = D.keep_mask(5, 6, 7, p, 0, batch, shape)
    rows_of_whole = whole.reshape(-1, shape[-1])
    np.testing.assert_array_equal(D.keep_rows(5, 6, 7, p, np.arange(batch * 30), 10),
                                  rows_of_whole)
    for _ in range(20):
        index = rng.integers(0, batch * 30, size=tuple(rng.integers(1, 5, size=2)))
        take = int(rng.integers(1, 11))
        got = D.keep_rows(5, 6, 7, p, index, 10, take=take)
        assert got.shape == (*index.shape, take) and got.dtype == bool
        np.testing.assert_array_equal(got, rows_of_whole[index][..., :take])
    # the bits under them, and an out buffer
    np.testing.assert_array_equal(D.row_bits(5, 6, 7, [4, 0], 10, take=6),
                                  D.random_bits(5, 6, 7, range(1), shape)
                                  .reshape(-1, 10)[[4, 0], :6])
    out = np.empty((2, 10), bool)
    assert D.keep_rows(5, 6, 7, p, [3, 1], 10, out=out) is out
    np.testing.assert_array_equal(out, rows_of_whole[[3, 1]])
    # drawn by several threads: the same
    try:
        D.set_num_threads(3)
        many = D.keep_rows(5, 6, 7, p, np.arange(200_000), 16)
        D.set_num_threads(1)
        np.testing.assert_array_equal(D.keep_rows(5, 6, 7, p, np.arange(200_000), 16), many)
    finally:
        D.set_num_threads(None)


def test_any_split_of_the_batch_gives_the_same_masks():
    rng = np.random.default_rng(0)
    shape, batch, p = (5, 24), 64, 0.2
    whole = D.keep_mask(11, 3, 4, p, 0, batch, shape)
    scaled = D.scaled_mask(11, 3, 4, p, 0, batch, shape)
    for _ in range(40):  # random cuts: micro-batches, devices, ranks and their combinations
        cuts = np.sort(rng.choice(np.arange(1, batch), size=rng.integers(1, 8), replace=False))
        edges = [0, *cuts.tolist(), batch]
        parts = [D.keep_mask(11, 3, 4, p, a, b - a, shape) for a, b in zip(edges, edges[1:])]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
        a, b = edges[1], edges[2]
        np.testing.assert_array_equal(D.scaled_mask(11, 3, 4, p, a, b - a, shape), scaled[a:b])
    # any set of rows, in any order (examples grouped by length, a rank's strided share)
    bits = D.random_bits(11, 3, 4, range(batch), shape)
    for _ in range(10):
        rows = rng.choice(batch, size=rng.integers(1, batch), replace=False)
        np.testing.assert_array_equal(D.random_bits(11, 3, 4, rows, shape), bits[rows])
    np.testing.assert_array_equal(D.random_bits(11, 3, 4, range(0, batch, 2), shape),
                                  bits[::2])


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_draw_the_same_masks(threads):
    shape = (2, 64, 64)  # the tiny config's attention weights: big enough for threads
    try:
        D.set_num_threads(1)
        one = D.scaled_mask(5, 9, 1, 0.2, 3, 300, shape)
        D.set_num_threads(threads)
        assert S.default_threads() == threads
        many = D.scaled_mask(5, 9, 1, 0.2, 3, 300, shape)
        parts = [D.scaled_mask(5, 9, 1, 0.2, 3 + a, 100, shape) for a in (0, 100, 200)]
    finally:
        D.set_num_threads(None)
    np.testing.assert_array_equal(many, one)
    np.testing.assert_array_equal(np.concatenate(parts), one)


def test_default_threads_follow_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert S.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert S.default_threads() == 4
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= S.default_threads() <= 4


def test_threshold_and_keep_probability_are_exact():
    assert D.threshold(0.2) == 13107 and D.keep_probability(0.2) == 1 - 13107 / 65536
    assert D.threshold(0.25) == 16384 and D.keep_probability(0.25) == 0.75
    assert D.threshold(0.0) == 0 and D.keep_probability(0.0) == 1.0
    assert D.threshold(0.9999999) == 65535  # at least one value of 65536 is kept
    bits = D.random_bits(1, 2, 3, range(50), (40,))
    mask = D.keep_mask(1, 2, 3, 0.2, 0, 50, (40,))
    np.testing.assert_array_equal(mask, bits >= 13107)
    scaled = D.scaled_mask(1, 2, 3, 0.2, 0, 50, (40,))
    assert scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled, np.where(mask, np.float32(65536 / 52429), 0))
    assert D.scaled_mask(1, 2, 3, 0.2, 0, 50, (40,), dtype=np.float64).dtype == np.float64
    assert D.keep_mask(1, 2, 3, 0.0, 0, 50, (40,)).all()
    np.testing.assert_array_equal(D.scaled_mask(1, 2, 3, 0.0, 0, 50, (40,)), 1.0)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_keep_fraction_and_expectation(p):
    rows, shape = 256, (64, 32)
    n = rows * math.prod(shape)
    q = D.keep_probability(p)
    mask = D.keep_mask(0, 1, 2, p, 0, rows, shape)
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(mask.mean() - q) < 5 * sigma
    scaled = D.scaled_mask(0, 1, 2, p, 0, rows, shape).astype(np.float64)
    assert abs(scaled.mean() - 1.0) < 5 * math.sqrt((1 - q) / q / n)
    # no position or feature is favoured: per-feature keep fractions within 5 sigma
    per_feature = mask.reshape(-1, shape[-1]).mean(axis=0)
    assert np.abs(per_feature - q).max() < 5 * math.sqrt(q * (1 - q) / (n / shape[-1]))


def test_draws_are_uniform_16_bit():
    bits = D.random_bits(3, 4, 5, range(64), (128, 16)).reshape(-1)
    n = bits.size
    ones = np.unpackbits(bits.view(np.uint8)).reshape(-1, 8).mean(axis=0)
    assert np.abs(ones - 0.5).max() < 5 * 0.5 / math.sqrt(n * 2)
    counts = np.bincount(bits >> 8, minlength=256)  # chi-square of the high byte, 255 dof
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
    assert 255 - 6 * math.sqrt(2 * 255) < chi2 < 255 + 6 * math.sqrt(2 * 255)


@pytest.mark.parametrize("other", [
    dict(seed=12), dict(step=4), dict(site=3), dict(seed=3, step=11),  # (seed, step) swapped
])
def test_masks_are_independent_across_seeds_steps_sites(other):
    where = dict(seed=11, step=3, site=2)
    q = D.keep_probability(0.5)
    a = D.keep_mask(where["seed"], where["step"], where["site"], 0.5, 0, 128, (32, 32))
    moved = {**where, **other}
    b = D.keep_mask(moved["seed"], moved["step"], moved["site"], 0.5, 0, 128, (32, 32))
    agree = (a == b).mean()  # independent masks agree with probability q^2 + (1 - q)^2
    expected = q * q + (1 - q) * (1 - q)
    assert abs(agree - expected) < 5 * math.sqrt(expected * (1 - expected) / a.size)


def test_rows_and_positions_get_their_own_draws():
    bits = D.random_bits(0, 0, 0, range(256), (8, 16)).astype(np.int64)
    # neighbouring rows (counter blocks) and positions are uncorrelated
    for x, y in ((bits[1:], bits[:-1]), (bits[:, 1:], bits[:, :-1])):
        r = np.corrcoef(x.reshape(-1), y.reshape(-1))[0, 1]
        assert abs(r) < 5 / math.sqrt(x.size)
    # the site is part of the counter: site 1's rows are not site 0's rows shifted
    other = D.random_bits(0, 0, 1, range(256), (8, 16))
    assert not any(np.array_equal(other[0], row) for row in bits)


def test_encoder_masks_one_per_site_and_layer():
    from bertlite.config import BERTConfig

    config = BERTConfig(vocab_size=50, num_hiddens=8, ffn_num_hiddens=16, num_heads=2,
                        num_layers=3, dropout=0.25)
    masks = D.encoder_masks(config, 7, 2, 4, 5, 6)
    assert len(masks) == 3 and all(list(m) == list(D.SITE_KINDS) for m in masks)
    for layer, per_layer in enumerate(masks):
        assert per_layer["attention"].shape == (5, 2, 6, 6)
        assert per_layer["addnorm1"].shape == per_layer["addnorm2"].shape == (5, 6, 8)
        for kind, mask in per_layer.items():
            np.testing.assert_array_equal(mask, D.scaled_mask(
                7, 2, D.site_id(layer, kind), 0.25, 4, 5, mask.shape[1:]))
    assert set(np.unique(masks[0]["addnorm1"])) == {0.0, np.float32(4 / 3)}
    assert D.encoder_masks(config.replace(dropout=0.0), 7, 2, 4, 5, 6) == []


def test_site_ids_are_distinct_and_stable():
    ids = [D.site_id(layer, kind) for layer in range(4) for kind in D.SITE_KINDS]
    assert ids == list(range(12))
    with pytest.raises(ValueError, match="unknown dropout site kind 'ffn'"):
        D.site_id(0, "ffn")


@pytest.mark.parametrize("p,error,message", [
    (1.0, ValueError, r"p must be in \[0, 1\), got 1.0"),
    (-0.1, ValueError, r"p must be in \[0, 1\)"),
    (float("nan"), ValueError, r"p must be in \[0, 1\)"),
    ("0.2", TypeError, "p must be a float"),
    (True, TypeError, "p must be a float"),
])
def test_bad_probability(p, error, message):
    with pytest.raises(error, match=message):
        D.keep_mask(0, 0, 0, p, 0, 4, (8,))
    with pytest.raises(error, match=message):
        D.threshold(p)


@pytest.mark.parametrize("call,error,message", [
    (lambda: D.keep_mask(-1, 0, 0, 0.2, 0, 4, (8,)), ValueError, r"seed must be in \[0, 2\*\*64"),
    (lambda: D.keep_mask(0, 2**64, 0, 0.2, 0, 4, (8,)), ValueError, "step must be in"),
    (lambda: D.keep_mask(0, 0, 1.5, 0.2, 0, 4, (8,)), TypeError, "site must be an integer"),
    (lambda: D.keep_mask(0, 0, 0, 0.2, -2, 4, (8,)), ValueError, "row_start must be in"),
    (lambda: D.keep_mask(0, 0, 0, 0.2, 0, -4, (8,)), ValueError, "rows must be a number"),
    (lambda: D.keep_mask(0, 0, 0, 0.2, 0, 4, (8, 0)), ValueError, "shape .* positive"),
    (lambda: D.keep_mask(0, 0, 0, 0.2, 0, 4, ()), ValueError, "shape .* positive"),
    (lambda: D.random_bits(0, 0, 0, [1, -3], (8,)), ValueError, "indices >= 0"),
    (lambda: D.random_bits(0, 0, 0, [[1, 2]], (8,)), TypeError, "1-D sequence"),
    (lambda: D.random_bits(0, 0, 0, [0.5], (8,)), TypeError, "1-D sequence"),
    (lambda: D.random_bits(0, 0, 0, [2**62], (64,)), ValueError, "2\\*\\*64 words"),
    (lambda: D.keep_rows(0, 0, 0, 0.2, [1, 2], 8, take=9), ValueError, r"take must be in \[1, "),
    (lambda: D.keep_rows(0, 0, 0, 0.2, [1, -2], 8), ValueError, "row indices >= 0"),
    (lambda: D.keep_rows(0, 0, 0, 0.2, [0.5], 8), TypeError, "integer row indices"),
    (lambda: D.set_num_threads(0), ValueError, "threads must be a positive integer"),
    (lambda: S.philox4x64([1, 2, 3], [0, 0]), ValueError, "four 64-bit words"),
    (lambda: S.philox4x64([1, 2, 3, 4], [0]), ValueError, "two 64-bit words"),
])
def test_argument_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_out_buffers_are_filled_in_place():
    keep = np.empty((6, 3, 40), dtype=bool)
    assert D.keep_mask(2, 3, 4, 0.2, 10, 6, (3, 40), out=keep) is keep
    np.testing.assert_array_equal(keep, D.keep_mask(2, 3, 4, 0.2, 10, 6, (3, 40)))
    scaled = np.full((6, 3, 40), np.nan, dtype=np.float32)
    assert D.scaled_mask(2, 3, 4, 0.2, 10, 6, (3, 40), out=scaled) is scaled
    np.testing.assert_array_equal(scaled, D.scaled_mask(2, 3, 4, 0.2, 10, 6, (3, 40)))
    for bad in (np.empty((6, 3, 41), bool), np.empty((6, 3, 40), np.uint8),
                np.empty((6, 40, 3), bool).transpose(0, 2, 1)):
        with pytest.raises(ValueError, match=r"out must be a writeable C-contiguous bool array "
                                             r"of shape \(6, 3, 40\)"):
            D.keep_mask(2, 3, 4, 0.2, 10, 6, (3, 40), out=bad)
    with pytest.raises(ValueError, match="dtype must be a floating-point type"):
        D.scaled_mask(2, 3, 4, 0.2, 10, 6, (3, 40), dtype=np.int32)


def test_a_forked_child_draws_with_threads_of_its_own():
    """The thread pool does not survive fork(); the child starts its own (no deadlock)."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork() on this platform")
    shape = (2, 64, 64)
    try:
        D.set_num_threads(2)
        expected = D.keep_mask(1, 2, 3, 0.2, 0, 300, shape)  # the parent's pool now exists
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(D.keep_mask, (1, 2, 3, 0.2, 0, 300, shape)).get(timeout=120)
    finally:
        D.set_num_threads(None)
    np.testing.assert_array_equal(got, expected)


def test_empty_and_scalar_shapes():
    assert D.keep_mask(0, 0, 0, 0.2, 5, 0, (3, 4)).shape == (0, 3, 4)
    assert D.random_bits(0, 0, 0, [], 7).shape == (0, 7)
    np.testing.assert_array_equal(D.random_bits(0, 0, 0, range(3), 7),
                                  D.random_bits(0, 0, 0, range(3), (7,)))


def test_masks_need_no_framework():
    code = ("import sys, bertlite.dropout as d; d.keep_mask(0, 0, 0, 0.2, 0, 2, 8); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mxnet')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_valid_lens_draw_only_the_valid_positions_rows():
    """A static-shape model (MXNet's graph) takes whole masks but reads only the rows at valid
    positions: those are the whole masks' rows, the others 0 (False), in a new or given
    buffer."""
    lens = np.array([3, 7, 1, 5])
    for shape in ((2, 7, 7), (7, 16)):  # attention (heads, queries, keys); add & norm
        full = D.scaled_mask(1, 2, 3, 0.2, 5, 4, shape)
        some = D.scaled_mask(1, 2, 3, 0.2, 5, 4, shape, valid_lens=lens)
        keep = D.keep_mask(1, 2, 3, 0.2, 5, 4, shape, valid_lens=lens)
        reused = D.scaled_mask(1, 2, 3, 0.2, 5, 4, shape, valid_lens=lens,
                               out=np.full((4, *shape), np.nan, dtype=np.float32))
        for i, n in enumerate(lens):
            valid = (i, Ellipsis, slice(None, n), slice(None))
            padded = (i, Ellipsis, slice(n, None), slice(None))
            np.testing.assert_array_equal(some[valid], full[valid])
            np.testing.assert_array_equal(keep[valid], full[valid] > 0)
            assert not some[padded].any() and not keep[padded].any()
        np.testing.assert_array_equal(reused, some)
        masks = D.encoder_masks(CONFIG_TINY, 1, 2, 5, 4, 7, valid_lens=lens)
        np.testing.assert_array_equal(
            masks[0]["addnorm1"], D.scaled_mask(1, 2, D.site_id(0, "addnorm1"), 0.25, 5, 4,
                                                (7, 8), valid_lens=lens))
    with pytest.raises(ValueError, match="position axis"):
        D.keep_mask(1, 2, 3, 0.2, 0, 4, (7,), valid_lens=lens)
    with pytest.raises(ValueError, match="one length per example"):
        D.keep_mask(1, 2, 3, 0.2, 0, 3, (7, 4), valid_lens=lens)


def _tiny_config():
    from bertlite.config import BERTConfig

    return BERTConfig(vocab_size=50, num_hiddens=8, ffn_num_hiddens=16, num_heads=2,
                      num_layers=2, dropout=0.25)


CONFIG_TINY = _tiny_config()


def test_encoder_masks_drawn_side_by_side_are_the_same():
    lens = np.random.default_rng(0).integers(1, 65, size=240)
    try:
        D.set_num_threads(1)
        one = D.encoder_masks(CONFIG_TINY, 3, 4, 10, 240, 64, valid_lens=lens)
        D.set_num_threads(2)  # 2.2 M draws: the six sites drawn two at a time
        two = D.encoder_masks(CONFIG_TINY, 3, 4, 10, 240, 64, valid_lens=lens)
    finally:
        D.set_num_threads(None)
    assert [list(layer) for layer in two] == [list(D.SITE_KINDS)] * 2
    for a, b in zip(one, two):
        for kind in D.SITE_KINDS:
            np.testing.assert_array_equal(a[kind], b[kind])
