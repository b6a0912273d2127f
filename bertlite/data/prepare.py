"""``bertlite.prepare``: a corpus of any size to a folder of memory-mapped shards, as a stream.

Two passes over the corpus, each split into tasks (byte ranges of plain files that start at a
paragraph boundary, or whole compressed files) spread over worker processes: the vocabulary
(word counts merged across workers, or a WordPiece vocabulary trained on a sample), then the
examples, one shard per chunk of text. Memory is bounded by the chunk size (from
``memory_mb``), not by the corpus. Each finished task leaves ``task-NNNNN.json``, so an
interrupted run resumes where it stopped, and ``part="i/N"`` prepares every N-th task (one
machine's share); the manifest is written once all tasks are done (``merge``).

The book's rules hold (NSP pairs within a paragraph, 15% of the tokens predicted with
80/10/10, masks drawn once); the random next sentence comes from the whole corpus: from the
shard's own text or from a small pool drawn from every task beforehand
(:mod:`bertlite.data.nsp_pool`). The first shard draws from the same seeds as the in-memory
pipeline, so a WikiText corpus of one shard gives exactly the examples of
:func:`bertlite.data.loader.prepare_data`.
"""

from __future__ import annotations

import errno
import functools
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bertlite.data.corpus import TokenizedCorpus
from bertlite.data.examples import (
    EncodedCorpus,
    PretrainingExamples,
    build_nsp_pairs,
    continuation_mask,
    encode_corpus,
    mask_tokens,
)
from bertlite.data.formats import (
    ReadStats,
    chunks,
    detect_format,
    expand_inputs,
    plan_ranges,
    tokenize_chunk,
)
from bertlite.data.manifest import (
    MANIFEST,
    MANIFEST_VERSION,
    read_json,
    read_manifest,
    settings_key,
    write_json,
)
from bertlite.data.nsp_pool import (
    POOL_SENTENCES,
    POOL_WINDOW,
    build_pool,
    others_of,
    set_others_shares,
)
from bertlite.data.shards import (
    file_sha1,
    load_words,
    record_dtype,
    save_words,
    to_records,
    write_shard,
)
from bertlite.data.tokenizer import (
    DEFAULT_WORDPIECE_VOCAB_SIZE,
    LOWERCASE,
    TOKENIZER_KINDS,
    WordPieceTokenizer,
)
from bertlite.data.vocab import Vocab, build_vocab
from bertlite.errors import DataError

DEFAULT_MEMORY_MB = 1024
PLAN = "prepare.json"
VOCAB_FILE, TOKENIZER_FILE, VOCAB_DONE = "vocab.txt", "tokenizer.json", "vocab.json"


def chunk_bytes_for(memory_mb: int) -> int:
    """Text per shard for a memory budget (1/48 of it, at most 64 MB): a worker takes about 12
    times its chunk while the chunk's examples are built, so about three workers fit in the
    budget beside this process (:func:`workers_within`)."""
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 64:
        raise DataError(f"memory_mb must be an integer of at least 64, got {memory_mb!r}")
    return min(64 << 20, (memory_mb << 20) // 48)


def workers_within(memory_mb: int, chunk_bytes: int) -> int:
    """How many workers fit in the memory budget: each holds one chunk while it is coded and
    its examples built (about 12 times the chunk, plus the interpreter), beside this process
    (about 100 MB, and the vocabulary's counts)."""
    per_worker = 12 * chunk_bytes + (40 << 20)
    return max(1, ((memory_mb << 20) - (100 << 20)) // per_worker)


def parse_part(part: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/N"`` (or ``(i, N)``) -> ``(i, N)`` with ``0 <= i < N``."""
    if part is None:
        return None
    try:
        i, n = (int(x) for x in (part.split("/") if isinstance(part, str) else part))
    except (ValueError, TypeError):
        raise DataError(f"part must look like 'i/N' (say 0/4), got {part!r}") from None
    if not 0 <= i < n:
        raise DataError(f"part {i}/{n}: i must be in 0..N-1")
    return i, n


def _count_task(task: dict[str, Any]) -> tuple[dict[str, int], ReadStats]:
    """Word counts of one task (pass 1). The coded words of its chunks are kept in the folder
    (``words-*.npz``, about 4 bytes a word) for pass 2, which then need not read and split the
    text again; they are deleted once the task's shards are written."""
    out, index = Path(task["out"]), task["index"]
    stats = ReadStats()
    counts: Counter[str] = Counter()
    num = 0
    for num, chunk in enumerate(chunks(stats=stats, **task["read"]), 1):
        corpus = tokenize_chunk(chunk, task["read"].get("lowercase", True))
        del chunk
        counts.update(dict(zip(corpus.types, corpus.counts().tolist())))
        save_words(out / f"words-{index:05d}-{num - 1:03d}.npz", corpus)
    write_json(out / f"words-{index:05d}.json", {"chunks": num, "stats": asdict(stats)})
    return dict(counts), stats


def _task_corpora(task: dict[str, Any], stats: ReadStats) -> Iterator[TokenizedCorpus]:
    """The words of a task's chunks: kept by pass 1, else read from the text."""
    out, index = Path(task["out"]), task["index"]
    kept = out / f"words-{index:05d}.json"
    if kept.is_file():
        record = read_json(kept)
        stats.add(ReadStats(**record["stats"]))
        for sub in range(record["chunks"]):
            yield load_words(out / f"words-{index:05d}-{sub:03d}.npz")
        return
    for chunk in chunks(stats=stats, **task["read"]):
        yield tokenize_chunk(chunk, task["read"].get("lowercase", True))


def _drop_words(out: Path, index: int) -> None:
    for path in out.glob(f"words-{index:05d}*"):
        path.unlink(missing_ok=True)


def load_folder_vocab(folder: Path) -> Vocab:
    """The vocabulary of a prepared folder (with its WordPiece tokenizer, if any)."""
    tokenizer_file = folder / TOKENIZER_FILE
    if tokenizer_file.is_file():
        return WordPieceTokenizer.load(tokenizer_file).to_vocab()
    return Vocab.load(folder / VOCAB_FILE)


def build_shard_examples(corpus: EncodedCorpus, vocab: Vocab, max_len: int, seed: int,
                         shard: tuple[int, int], whole_word_mask: bool = False,
                         others: EncodedCorpus | None = None, others_share: float = 0.0
                         ) -> PretrainingExamples | None:
    """The examples of one shard (None when no pair fits): the book's rules, drawn from
    ``(seed, shard)``; shard ``(0, 0)`` draws as :func:`bertlite.data.examples.build_examples`
    does. A random next sentence comes from ``others`` (the pool's sentences of other shards)
    with probability ``others_share``."""
    extra = [] if shard == (0, 0) else list(shard)
    ids = vocab.special_ids
    tokens, segments, valid_lens, nsp_labels = build_nsp_pairs(
        corpus, max_len, np.random.default_rng([seed, 0, *extra]), pad_id=ids["<pad>"],
        cls_id=ids["<cls>"], sep_id=ids["<sep>"], others=others, others_share=others_share,
        others_rng=np.random.default_rng([seed, 5, *shard]))
    if len(tokens) == 0:
        return None
    masked, positions, weights, labels = mask_tokens(
        tokens, segments, valid_lens, vocab_size=len(vocab), mask_id=ids["<mask>"],
        rng=np.random.default_rng([seed, 1, *extra]),
        continuation=continuation_mask(vocab) if whole_word_mask else None)
    return PretrainingExamples(tokens, segments, valid_lens, nsp_labels, masked, positions,
                               weights, labels)


def _shard_task(task: dict[str, Any]) -> dict[str, Any]:
    """Build and write the shards of one task (pass 2); its record for the manifest."""
    out = Path(task["out"])
    vocab = load_folder_vocab(out)
    settings = task["settings"]
    dtype = record_dtype(settings["max_len"], len(vocab))
    stats = ReadStats()
    shards = []
    index = task["index"]
    share = task.get("others_share", 0.0)
    others = others_of(out, index) if share > 0 else None
    for sub, words in enumerate(_task_corpora(task, stats)):
        corpus = encode_corpus(words, vocab)
        del words
        examples = build_shard_examples(corpus, vocab, settings["max_len"], settings["seed"],
                                        (index, sub), settings["whole_word_mask"],
                                        others=others, others_share=share)
        if examples is None:
            continue
        path = out / f"shard-{index:05d}-{sub:03d}.npy"
        try:
            shards.append(write_shard(path, to_records(examples, dtype)))
        except OSError as err:  # a full disk, say: the temporary file is gone, nothing listed
            raise DataError(f"cannot write {path}: {err.strerror or err}; free some space and "
                            "run the same command again (it resumes)") from None
    record = {"index": index, "shards": shards, "stats": asdict(stats)}
    write_json(out / f"task-{index:05d}.json", record)
    _drop_words(out, index)
    return record


def _run(fn: Any, tasks: list[dict[str, Any]], workers: int) -> Iterator[Any]:
    """``fn`` over tasks, in ``workers`` processes, or in this process for one worker. Forked
    where the platform allows (no re-import of the caller's script, which a script without an
    ``if __name__ == "__main__"`` guard would not survive; the workers use numpy only)."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(fn, tasks)


def _word_vocab(tasks: list[dict[str, Any]], min_freq: int, workers: int) -> Vocab:
    counts: Counter[str] = Counter()
    stats = ReadStats()
    for task_counts, task_stats in _run(_count_task, tasks, workers):
        counts.update(task_counts)
        stats.add(task_stats)
    if not counts:
        raise _no_document()
    return build_vocab(counts, min_freq=min_freq)


def _sample_sentences(tasks: list[dict[str, Any]], sample_bytes: int) -> Iterator[str]:
    taken = 0
    for task in tasks:
        for chunk in chunks(stats=ReadStats(), **task["read"]):
            for paragraph in chunk:
                if isinstance(paragraph, bytes):
                    paragraph = paragraph.decode("utf-8").lower().strip().split(" . ")
                yield from paragraph
                taken += sum(map(len, paragraph))
                if taken >= sample_bytes:
                    return


def _no_document() -> DataError:
    return DataError("the corpus has no paragraph or document of two or more sentences, which "
                     "next sentence prediction needs; check the format (wikitext: sentences "
                     "separated by ' . ', one paragraph a line; lines: one sentence a line, a "
                     "blank line between documents)")


def _ensure_vocab(out: Path, key: str, tasks: list[dict[str, Any]], settings: dict[str, Any],
                  vocab: Vocab | None, workers: int) -> None:
    """Write the vocabulary to the folder unless it is there for this key."""
    done = out / VOCAB_DONE
    if done.is_file() and read_json(done).get("key") == key:
        return
    if vocab is None:
        if settings["tokenizer"] == "wordpiece":
            sentences = list(_sample_sentences(tasks, settings["wordpiece_sample_mb"] << 20))
            if not sentences:
                raise _no_document()
            vocab = WordPieceTokenizer.train(
                sentences, vocab_size=settings["wordpiece_vocab_size"],
                min_frequency=settings["min_freq"]).to_vocab()
        else:
            vocab = _word_vocab(tasks, settings["min_freq"], workers)
    if vocab.tokenizer is not None:
        vocab.tokenizer.save(out / TOKENIZER_FILE)
    vocab.save(out / VOCAB_FILE)
    write_json(done, {"key": key, "size": len(vocab), "sha1": file_sha1(out / VOCAB_FILE)})


def _disk_full_is_data_error(fn: Any) -> Any:
    """A full disk or a file-size limit anywhere in ``prepare`` (shards, kept words, the
    pool, the manifest; in this process or a worker) as one clear error: every file is written
    atomically, so nothing half-written is left under its name, and a rerun resumes."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise
            out = kwargs.get("out", args[1] if len(args) > 1 else None)
            where = err.filename or (f"into {out}" if out else "the prepared folder")
            raise DataError(f"cannot write {where}: {err.strerror or err}; free some space and "
                            "run the same command again (it resumes)") from None
    return wrapper


@_disk_full_is_data_error
def prepare(corpus: str | os.PathLike | list, out: str | os.PathLike | None = None, *,
            format: str | None = None, max_len: int = 64, seed: int = 0, min_freq: int = 5,
            tokenizer: str = "word",
            wordpiece_vocab_size: int = DEFAULT_WORDPIECE_VOCAB_SIZE,
            wordpiece_sample_mb: int = 256, whole_word_mask: bool = False,
            jsonl_field: str = "text", skip_bad_lines: bool = False,
            memory_mb: int = DEFAULT_MEMORY_MB, workers: int | None = None,
            part: str | tuple[int, int] | None = None, vocab: Vocab | None = None,
            shard_bytes: int | None = None, verbose: bool = False) -> Path:
    """Prepare a corpus (a file, folder or glob, in a format of
    :mod:`bertlite.data.formats`) for training into the folder ``out`` (default: a folder
    under the data cache named by the cache key); returns the folder.

    A folder already prepared with the same settings from the same inputs is reused; an
    interrupted run continues where it stopped. ``workers`` processes (default: the cores)
    share the work, as many as fit in ``memory_mb``; ``part="i/N"`` does one machine's share
    and leaves the manifest to a last :func:`merge`. ``vocab`` (say, the training folder's,
    for a held-out split) is used as is. ``shard_bytes`` sets the text per shard (by default
    from ``memory_mb``).
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 4:
        raise DataError(f"max_len must be an integer of at least 4 (<cls> a <sep> b <sep>), "
                        f"got {max_len!r}")
    if tokenizer not in TOKENIZER_KINDS:
        raise DataError(f"tokenizer must be one of {list(TOKENIZER_KINDS)}, got {tokenizer!r}")
    started = time.perf_counter()
    files = expand_inputs(corpus)
    fmt = detect_format(files, format)
    chunk_bytes = chunk_bytes_for(memory_mb) if shard_bytes is None else int(shard_bytes)
    if chunk_bytes < 1:
        raise DataError(f"shard_bytes must be positive, got {shard_bytes!r}")
    part_of = parse_part(part)
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    workers = min(workers, workers_within(memory_mb, chunk_bytes))  # the budget bounds them
    lowercase = True  # the book's words and bertlite's WordPiece; a cased BERT's keeps the case
    if vocab is not None:
        tokenizer = "word" if vocab.tokenizer is None else vocab.tokenizer.kind
        lowercase = vocab.tokenizer is None or vocab.tokenizer.lowercase
    settings = {"format": fmt, "max_len": max_len, "seed": int(seed), "min_freq": min_freq,
                "tokenizer": tokenizer, "whole_word_mask": bool(whole_word_mask),
                "jsonl_field": jsonl_field, "skip_bad_lines": bool(skip_bad_lines),
                "chunk_bytes": chunk_bytes, "nsp_pool": [POOL_SENTENCES, POOL_WINDOW],
                "vocab": None if vocab is None else file_digest_of_tokens(vocab)}
    if not lowercase:  # only then: the keys of earlier preparations stay as they were
        settings["lowercase"] = False
    if tokenizer == "wordpiece":
        settings.update(wordpiece_vocab_size=wordpiece_vocab_size,
                        wordpiece_sample_mb=wordpiece_sample_mb)
    inputs = [{"path": str(p), "size": p.stat().st_size, "sha1": file_sha1(p)} for p in files]
    key = settings_key(settings, inputs)
    if out is None:
        from bertlite.data.cache import default_cache_dir

        out = default_cache_dir() / f"{files[0].name.split('.')[0]}-{key}"
    out = Path(out)
    if (out / MANIFEST).is_file():
        found = read_manifest(out)
        if found.get("key") == key:
            return out  # the cache key matches: prepared already
        raise DataError(f"{out} holds data prepared from other inputs or settings; choose "
                        "another folder (--out) or delete it")
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(out, key, files, fmt, settings, inputs)
    tasks = [{"index": i, "out": str(out), "settings": settings,
              "read": {"path": t["path"], "fmt": fmt, "start": t["start"], "end": t["end"],
                       "chunk_bytes": chunk_bytes, "field_name": jsonl_field,
                       "skip_bad_lines": bool(skip_bad_lines), "lowercase": lowercase}}
             for i, t in enumerate(plan["tasks"])]
    _ensure_vocab(out, key, tasks, settings, vocab, workers)
    set_others_shares(tasks)
    build_pool(out, key, tasks, workers)  # before any shard: random sentences span shards
    mine = [t for t in tasks if part_of is None or t["index"] % part_of[1] == part_of[0]]
    todo = [t for t in mine if not (out / f"task-{t['index']:05d}.json").is_file()]
    for record in _run(_shard_task, todo, workers):
        if verbose:
            print(f"task {record['index']}: {sum(s['examples'] for s in record['shards'])} "
                  "examples", flush=True)
    if part_of is not None:
        return out
    merge(out, seconds=time.perf_counter() - started)
    return out


def file_digest_of_tokens(vocab: Vocab) -> str:
    """A digest of a given vocabulary's tokens and, unless bertlite's lowercasing, its
    tokenizer's normalisation (part of the cache key)."""
    import hashlib
    import json

    text = "\n".join(vocab.idx_to_token)
    if vocab.tokenizer is not None and vocab.tokenizer.normalization != LOWERCASE:
        text += "\n" + json.dumps(vocab.tokenizer.normalization, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _plan(out: Path, key: str, files: list[Path], fmt: str, settings: dict[str, Any],
          inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The tasks of this preparation, kept in ``prepare.json`` (the same for every part and
    every resumed run: a folder begun with other settings is refused)."""
    path = out / PLAN
    if path.is_file():
        plan = read_json(path)
        if plan.get("key") != key:
            raise DataError(f"{out} holds a preparation begun from other inputs or settings; "
                            "choose another folder (--out) or delete it")
        return plan
    tasks = [{"path": str(p), "start": s, "end": e}
             for p in files for s, e in plan_ranges(p, fmt, settings["chunk_bytes"])]
    plan = {"key": key, "version": MANIFEST_VERSION, "settings": settings, "inputs": inputs,
            "tasks": tasks}
    write_json(path, plan)
    return plan


def merge(out: str | os.PathLike, seconds: float | None = None) -> Path:
    """Write the manifest of a folder whose parts are all prepared (``bertlite prepare
    --merge``); an error names the tasks still missing."""
    out = Path(out)
    plan = read_json(out / PLAN) if (out / PLAN).is_file() else None
    if plan is None:
        raise DataError(f"{out} has no {PLAN}: run `bertlite prepare CORPUS --out {out}` "
                        "(or its parts) first")
    records, missing = [], []
    for i in range(len(plan["tasks"])):
        path = out / f"task-{i:05d}.json"
        if path.is_file():
            records.append(read_json(path))
        else:
            missing.append(i)
    if missing:
        raise DataError(f"{out}: {len(missing)} of {len(plan['tasks'])} tasks are not prepared "
                        f"yet (first: {missing[:5]}); run the remaining parts, then --merge")
    stats = ReadStats()
    for record in records:
        stats.add(ReadStats(**record["stats"]))
    shards = [s for r in records for s in r["shards"]]
    if stats.sentences == 0:
        raise _no_document()
    if not shards:
        raise DataError(f"no sentence pair fits in max_len={plan['settings']['max_len']} "
                        "(pairs need their two sentences plus 3 special tokens); raise max_len")
    vocab_info = read_json(out / VOCAB_DONE)
    manifest = {
        "version": MANIFEST_VERSION, "key": plan["key"], "settings": plan["settings"],
        "inputs": plan["inputs"],
        "vocab": {"file": VOCAB_FILE, "size": vocab_info["size"], "sha1": vocab_info["sha1"],
                  "tokenizer": plan["settings"]["tokenizer"],
                  "tokenizer_file": TOKENIZER_FILE if (out / TOKENIZER_FILE).is_file() else None},
        "record_dtype": str(record_dtype(plan["settings"]["max_len"], vocab_info["size"])),
        "shards": shards, "examples": sum(s["examples"] for s in shards),
        "stats": asdict(stats), "seconds": seconds}
    write_json(out / MANIFEST, manifest)
    return out
