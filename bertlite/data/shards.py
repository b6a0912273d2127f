"""Shards of prepared examples: one ``.npy`` file of fixed-width numpy records each, written
atomically and opened with ``np.memmap`` (``np.load(mmap_mode="r")``), so training reads the
examples it needs from disk instead of holding the corpus in memory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from bertlite.data.corpus import TokenizedCorpus
from bertlite.data.examples import PretrainingExamples, max_num_mlm_preds
from bertlite.io import atomic_path


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of a vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def record_dtype(max_len: int, vocab_size: int) -> np.dtype:
    """One example as a fixed-width record: the input, masked input and segments of
    ``max_len`` tokens, the valid length, the NSP label and the MLM prediction slots."""
    tok = token_dtype(vocab_size)
    pos = token_dtype(max_len)
    k = max_num_mlm_preds(max_len)
    return np.dtype([("tokens", tok, (max_len,)), ("masked_tokens", tok, (max_len,)),
                     ("segments", np.uint8, (max_len,)), ("valid_len", pos),
                     ("nsp_label", np.uint8), ("pred_positions", pos, (k,)),
                     ("mlm_weights", np.uint8, (k,)), ("mlm_labels", tok, (k,))])


def to_records(examples: PretrainingExamples, dtype: np.dtype) -> np.ndarray:
    """The examples as records of ``dtype`` (see :func:`record_dtype`)."""
    records = np.empty(len(examples), dtype=dtype)
    records["tokens"] = examples.tokens
    records["masked_tokens"] = examples.masked_tokens
    records["segments"] = examples.segments
    records["valid_len"] = examples.valid_lens
    records["nsp_label"] = examples.nsp_labels
    records["pred_positions"] = examples.pred_positions
    records["mlm_weights"] = examples.mlm_weights
    records["mlm_labels"] = examples.mlm_labels
    return records


def to_examples(records: np.ndarray) -> PretrainingExamples:
    """Records back as the pipeline's arrays (int32 ids, float32 lengths and weights)."""
    i32 = np.int32
    return PretrainingExamples(
        tokens=records["tokens"].astype(i32), segments=records["segments"].astype(i32),
        valid_lens=records["valid_len"].astype(np.float32),
        nsp_labels=records["nsp_label"].astype(i32),
        masked_tokens=records["masked_tokens"].astype(i32),
        pred_positions=records["pred_positions"].astype(i32),
        mlm_weights=records["mlm_weights"].astype(np.float32),
        mlm_labels=records["mlm_labels"].astype(i32))


def file_sha1(path: str | os.PathLike) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(path: Path, records: np.ndarray) -> dict[str, object]:
    """Write records to ``path`` atomically (a temporary file renamed into place once whole, so
    a full disk or a kill never leaves half a shard under the name); its entry for the
    manifest."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, records, allow_pickle=False)
        sha1 = file_sha1(tmp)
        size = tmp.stat().st_size
    return {"file": path.name, "examples": int(len(records)), "bytes": int(size), "sha1": sha1}


def open_shard(path: Path) -> np.ndarray:
    """A shard's records, memory-mapped (read-only)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def save_words(path: Path, corpus: TokenizedCorpus) -> None:
    """Keep a chunk's coded words (between the passes of ``prepare``), atomically."""
    types = np.frombuffer("\n".join(corpus.types).encode("utf-8"), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, codes=corpus.codes, sizes=corpus.paragraph_sizes, types=types)


def load_words(path: Path) -> TokenizedCorpus:
    with np.load(path, allow_pickle=False) as kept:
        text = kept["types"].tobytes().decode("utf-8")
        return TokenizedCorpus(text.split("\n") if text else [], kept["codes"], kept["sizes"])
