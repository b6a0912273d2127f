"""An on-disk cache of prepared examples, keyed by the input's content and every setting."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from bertlite.data.examples import PretrainingExamples
from bertlite.data.vocab import Vocab
from bertlite.io import atomic_path

#: Bump when the arrays a given input produces change.
CACHE_FORMAT = 3


def default_cache_dir() -> Path:
    """``$BERTLITE_CACHE``, else ``<data root>/prepared``."""
    env = os.environ.get("BERTLITE_CACHE")
    if env:
        return Path(env)
    from bertlite.data.corpus import default_data_root

    return default_data_root() / "prepared"


def file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(source_digest: str, **settings: object) -> str:
    """A key that changes whenever the input file or a setting that shapes the arrays does."""
    blob = json.dumps({"format": CACHE_FORMAT, "source": source_digest, **settings},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def load_cached(path: Path) -> tuple[PretrainingExamples, Vocab] | None:
    """The cached examples and vocabulary, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            vocab = Vocab.from_tokens([str(t) for t in data["vocab"]])
            if "tokenizer" in data.files:
                from bertlite.data.tokenizer import WordPieceTokenizer

                tokenized = WordPieceTokenizer.from_str(str(data["tokenizer"])).to_vocab()
                if tokenized != vocab:
                    return None
                vocab = tokenized
            arrays = {k: data[k] for k in data.files if k not in ("vocab", "tokenizer")}
        return PretrainingExamples(**arrays), vocab
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None


def save_cached(path: Path, examples: PretrainingExamples, vocab: Vocab) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            extra = {} if vocab.tokenizer is None else {
                "tokenizer": np.asarray(vocab.tokenizer.to_str(), dtype=str)}
            np.savez(f, vocab=np.asarray(vocab.idx_to_token, dtype=str), **extra,
                     **examples.arrays())
