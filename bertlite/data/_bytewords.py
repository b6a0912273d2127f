"""Coding the words of lines of single-space-separated bytes with numpy, without a Python
object per word.

A word of up to 16 bytes is its own key: one or two little-endian 64-bit integers read
straight from the text, zero-padded (words hold no NUL byte, but for the one-byte word
``\\x00`` whose key is 0, so padding never makes two words equal). Equal keys are found with
a vectorized open-addressing hash table, so the cost is a few passes over the words instead
of a hash and a dictionary lookup per word in CPython. The few longer words are coded with a
dictionary.
"""

from __future__ import annotations

from operator import itemgetter

import numpy as np

_ODD_1 = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing multipliers
_ODD_2 = np.uint64(0xC2B2AE3D27D4EB4F)
#: masks of the low 0 to 8 bytes of a 64-bit integer
_LOW_BYTES = np.array([(1 << (8 * n)) - 1 for n in range(9)], dtype=np.uint64)


def _slots_of(keys: tuple[np.ndarray, ...], bits: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``slot_of, owner``: the slot of each key row in an open-addressing table of 2**bits
    slots, and the row that owns each slot (-1: free); None when the table is too crowded."""
    size = 1 << bits
    mixed = keys[0] * _ODD_1
    for column in keys[1:]:
        mixed ^= column * _ODD_2
    mixed >>= np.uint64(64 - bits)
    slot_of = mixed.astype(np.int32)
    owner = np.full(size, -1, dtype=np.int32)
    owner[slot_of] = np.arange(len(slot_of), dtype=np.int32)  # of rows racing, one wins
    holder = owner[slot_of]
    equal = keys[0][holder] == keys[0]
    for column in keys[1:]:
        equal &= column[holder] == column
    pending = np.flatnonzero(~equal)
    if np.count_nonzero(owner >= 0) > size // 2:
        return None  # crowded from the start: a bigger table probes less
    for _ in range(64):  # linear probing: a row moves on while its slot holds another key
        if not len(pending):
            return slot_of, owner
        slot = (slot_of[pending] + 1) & (size - 1)
        slot_of[pending] = slot
        free = owner[slot] < 0
        owner[slot[free]] = pending[free]
        holder = owner[slot]
        equal = keys[0][holder] == keys[0][pending]
        for column in keys[1:]:
            equal &= column[holder] == column[pending]
        pending = pending[~equal]
    return None


def distinct_rows(keys: tuple[np.ndarray, ...]
                  ) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
    """``codes, distinct``: the index of each key row (the rows of equal ``keys[i][j]`` over
    ``i``) among the distinct rows, and the distinct rows themselves, in no particular order;
    None where keys collide too often in the hash (crafted keys; words of natural text do
    not)."""
    bits = max(10, (len(keys[0]) // 2).bit_length())
    most_bits = max(12, (len(keys[0]) * 4).bit_length())
    while (found := _slots_of(keys, bits)) is None:
        bits += 2
        if bits > most_bits:
            return None
    slot_of, owner = found
    used = owner >= 0
    code_of_slot = np.cumsum(used, dtype=np.int32) - 1
    first = owner[used]
    return code_of_slot[slot_of], tuple(column[first] for column in keys)


def index_words(words: list) -> tuple[list, np.ndarray]:
    """``distinct, index``: the distinct words (in order of first occurrence) and the index of
    each word among them, with a dictionary (a hash and a lookup per word)."""
    index_of = dict.fromkeys(words)
    index_of.update(zip(index_of, range(len(index_of))))
    index = itemgetter(*words)(index_of) if len(words) > 1 else (index_of[words[0]],)
    return list(index_of), np.array(index, dtype=np.int32)


def _key_bytes(distinct: tuple[np.ndarray, ...]) -> list[bytes]:
    """The words that distinct key rows stand for (all-zero keys: the word ``\\x00``)."""
    matrix = np.stack([column.astype("<u8") for column in distinct], axis=1)
    as_bytes = matrix.view(np.uint8).reshape(len(matrix), -1)
    with_ends = np.concatenate([as_bytes, np.full((len(matrix), 1), 10, np.uint8)], axis=1)
    flat = with_ends.ravel()
    words = flat[flat != 0].tobytes().split(b"\n")[:-1]
    return [word or b"\x00" for word in words]


def code_lines(text: bytes) -> tuple[list[bytes], np.ndarray, np.ndarray] | None:
    """``distinct, index, line_ends``: the distinct words of lines of text, the index of each
    word among them, and the number of words up to the end of each line, as
    ``[line.split() for line in text.split(b"\\n")]`` would split them; None unless the words
    are separated by single spaces (no other whitespace, no space at a line's ends, no empty
    line). A NUL byte may only be the one-byte word ``\\x00``."""
    if any(c in text for c in (b"\t", b"\r", b"\x0b", b"\x0c")) or not text:
        return None
    if len(text) >= 2**31 - 16:  # offsets are int32 (half the memory traffic of int64)
        return None
    array = np.frombuffer(text, dtype=np.uint8)
    is_separator = array == 32
    is_separator |= array == 10
    separators = np.flatnonzero(is_separator).astype(np.int32)
    del is_separator
    starts = np.empty(len(separators) + 1, dtype=np.int32)
    starts[0] = 0
    np.add(separators, 1, out=starts[1:])
    lengths = np.empty_like(starts)
    lengths[:-1], lengths[-1] = separators, len(text)
    lengths -= starts
    if lengths.min() < 1:  # two separators in a row, or one at an end
        return None
    line_ends = np.flatnonzero(array[separators] == 10) + 1
    del separators
    line_ends = np.append(line_ends, len(starts))
    # 8 bytes from every offset (unaligned, overlapping): the text then 16 padding bytes
    window = np.ndarray((len(text) + 8,), dtype="<u8", buffer=text + bytes(16), strides=(1,))
    index = np.empty(len(starts), dtype=np.int32)
    distinct: list[bytes] = []
    short = lengths <= 8
    for group, width in ((short, 1), (~short & (lengths <= 16), 2)):
        words = np.flatnonzero(group)
        if not len(words):
            continue
        first, size = starts[words], lengths[words]
        low = window[first]
        if width == 1:
            low &= _LOW_BYTES[size]
            keys = (low,)
        else:
            high = window[first + 8]
            high &= _LOW_BYTES[size - 8]
            keys = (low, high)
        found = distinct_rows(keys)
        if found is None:
            return None
        codes, group_distinct = found
        index[words] = codes + len(distinct)
        distinct += _key_bytes(group_distinct)
    words = np.flatnonzero(lengths > 16)
    if len(words):
        long_distinct, long_index = index_words(
            [text[s:s + n] for s, n in zip(starts[words].tolist(), lengths[words].tolist())])
        index[words] = long_index + len(distinct)
        distinct += long_distinct
    return distinct, index, line_ends
