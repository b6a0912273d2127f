"""An on-disk cache of prepared examples, keyed by the input's content and every setting. Each
entry also records those settings and is used only when they match, so a file copied or renamed
under another key is rebuilt, not trusted."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from bertlite.data.examples import PretrainingExamples
from bertlite.data.vocab import Vocab
from bertlite.errors import DataError
from bertlite.io import atomic_path

#: Bump when the arrays a given input produces change.
CACHE_FORMAT = 4


def default_cache_dir() -> Path:
    """``$BERTLITE_CACHE``, else ``<data root>/prepared``."""
    env = os.environ.get("BERTLITE_CACHE")
    if env:
        return Path(env)
    from bertlite.data.corpus import default_data_root

    return default_data_root() / "prepared"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-1 of a corpus file; one that cannot be read is a DataError naming it."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise DataError(f"cannot read corpus file {path}: {err.strerror or err}") from None
    return digest.hexdigest()


def cache_settings(source_digest: str, **settings: object) -> dict[str, object]:
    """What an entry is made from: the cache format, the input's digest and the settings."""
    return json.loads(json.dumps({"format": CACHE_FORMAT, "source": source_digest, **settings},
                                 sort_keys=True))


def cache_key(source_digest: str, **settings: object) -> str:
    """A key that changes whenever the input file or a setting that shapes the arrays does."""
    blob = json.dumps(cache_settings(source_digest, **settings), sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def load_cached(path: Path, settings: dict[str, object] | None = None
                ) -> tuple[PretrainingExamples, Vocab] | None:
    """The cached examples and vocabulary, or None when absent, unreadable, or made with
    other ``settings`` (:func:`cache_settings`) than those given."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if settings is not None and json.loads(str(data["settings"])) != settings:
                return None
            vocab = Vocab.from_tokens([str(t) for t in data["vocab"]], unk_anywhere=True)
            if "tokenizer" in data.files:
                from bertlite.data.tokenizer import WordPieceTokenizer

                tokenized = WordPieceTokenizer.from_str(str(data["tokenizer"])).to_vocab()
                if tokenized != vocab:
                    return None
                vocab = tokenized
            arrays = {k: data[k] for k in data.files
                      if k not in ("vocab", "tokenizer", "settings")}
        return PretrainingExamples(**arrays), vocab
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None


def save_cached(path: Path, examples: PretrainingExamples, vocab: Vocab,
                settings: dict[str, object] | None = None) -> None:
    """Write an entry (atomically, with the umask's mode), recording its ``settings``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            extra = {} if vocab.tokenizer is None else {
                "tokenizer": np.asarray(vocab.tokenizer.to_str(), dtype=str)}
            if settings is not None:
                extra["settings"] = np.asarray(json.dumps(settings, sort_keys=True), dtype=str)
            np.savez(f, vocab=np.asarray(vocab.idx_to_token, dtype=str), **extra,
                     **examples.arrays())
