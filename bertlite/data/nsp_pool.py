"""The corpus-wide pool of random next sentences for :func:`bertlite.data.prepare.prepare`.

A shard is built alone (in any worker, on any machine), so by itself it can only draw the
random sentence B of an NSP pair from its own text. Before the examples are built, every task
contributes a few sentences, drawn from ``(seed, task)`` out of the first :data:`POOL_WINDOW`
bytes of its text, to a pool of about :data:`POOL_SENTENCES` sentences (``nsp-pool.npz``, a few
MB whatever the corpus size). A shard then takes each random B from the pool's sentences of
*other* tasks with the probability that a sentence of the corpus lies outside its task (by
bytes), else from its own text, so random sentences come from the whole corpus.

The pool depends only on the plan, the vocabulary and the seed: the same for any number of
workers or parts (each part builds it alike), and a corpus of one task has none (its examples
stay those of the in-memory pipeline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bertlite.data.examples import EncodedCorpus, encode_corpus
from bertlite.data.formats import ReadStats, chunks, tokenize_chunk
from bertlite.io import atomic_path

#: about how many sentences the pool holds (at least one per task)
POOL_SENTENCES = 16_384
#: the text read at the start of each task to draw its pool sentences from
POOL_WINDOW = 256 << 10
POOL_FILE = "nsp-pool.npz"


def task_bytes(task: dict[str, Any]) -> int:
    """The size of a task's text in bytes (a compressed file: its size on disk)."""
    read = task["read"]
    end = read["end"] if read["end"] >= 0 else Path(read["path"]).stat().st_size
    return max(1, end - read["start"])


def set_others_shares(tasks: list[dict[str, Any]]) -> None:
    """Each task's ``others_share``: the fraction of the corpus outside it (0 for one task)."""
    sizes = [task_bytes(t) for t in tasks]
    total = sum(sizes)
    for task, size in zip(tasks, sizes):
        task["others_share"] = 0.0 if len(tasks) == 1 else 1.0 - size / total


def _task_sample(task: dict[str, Any]) -> tuple[int, np.ndarray, np.ndarray]:
    """``(task index, token ids, sentence lengths)`` of the task's pool sentences."""
    from bertlite.data.prepare import load_folder_vocab

    vocab = load_folder_vocab(Path(task["out"]))
    first = next(chunks(stats=ReadStats(), **{**task["read"], "chunk_bytes": POOL_WINDOW}),
                 None)
    empty = np.zeros(0, dtype=np.int64)
    if first is None:
        return task["index"], empty.astype(np.int32), empty
    corpus = encode_corpus(tokenize_chunk(first), vocab)
    lens = corpus.sentence_lens
    candidates = np.flatnonzero(lens > 0)
    rng = np.random.default_rng([task["settings"]["seed"], 4, task["index"]])
    pick = np.sort(rng.choice(candidates, size=min(task["pool_k"], len(candidates)),
                              replace=False))
    return task["index"], _gather(corpus, pick), lens[pick]


def _gather(corpus: EncodedCorpus, pick: np.ndarray) -> np.ndarray:
    """The token ids of sentences ``pick``, one after another."""
    lens = corpus.sentence_lens[pick]
    offsets = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    return corpus.token_ids[np.repeat(corpus.sentence_starts[pick], lens) + offsets]


def build_pool(out: Path, key: str, tasks: list[dict[str, Any]], workers: int) -> None:
    """Write the folder's pool unless it is there for this key (tasks read in ``workers``
    processes; the result does not depend on how many)."""
    from bertlite.data.prepare import _run

    path = out / POOL_FILE
    if len(tasks) <= 1 or (path.is_file() and _pool_key(path) == key):
        return
    k = max(1, POOL_SENTENCES // len(tasks))
    samples = sorted(_run(_task_sample, [{**t, "pool_k": k} for t in tasks], workers),
                     key=lambda sample: sample[0])
    ids = np.concatenate([s[1] for s in samples]).astype(np.int32)
    lens = np.concatenate([s[2] for s in samples]).astype(np.int64)
    owner = np.concatenate([np.full(len(s[2]), s[0], dtype=np.int64) for s in samples])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=ids, lens=lens, task=owner,
                     key=np.frombuffer(key.encode(), dtype=np.uint8))


def _pool_key(path: Path) -> str:
    with np.load(path, allow_pickle=False) as kept:
        return kept["key"].tobytes().decode()


def others_of(out: Path, index: int) -> EncodedCorpus | None:
    """The pool's sentences of tasks other than ``index`` (None without a pool)."""
    path = out / POOL_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as kept:
        ids, lens, owner = kept["ids"], kept["lens"], kept["task"]
    starts = np.cumsum(lens) - lens
    keep = owner != index
    offsets = np.arange(int(lens[keep].sum())) - np.repeat(np.cumsum(lens[keep]) - lens[keep],
                                                           lens[keep])
    other_ids = ids[np.repeat(starts[keep], lens[keep]) + offsets]
    kept_lens = lens[keep]
    return EncodedCorpus(other_ids, np.cumsum(kept_lens) - kept_lens, kept_lens,
                         np.zeros(0, dtype=np.int64))
