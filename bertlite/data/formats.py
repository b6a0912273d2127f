"""Corpus input formats, read as streams: which files, which format, and their paragraphs.

A paragraph is a list of sentences, each a string of space-separated words (what the book's
``sentence.split()`` splits), and gives the NSP pairs. Formats:

* ``wikitext`` - the book's: one paragraph a line, sentences separated by ``' . '``, lowercased;
* ``lines`` - the original BERT format: one sentence a line, a blank line between documents;
* ``text`` - running text, paragraphs separated by blank lines (the lines of one joined; a
  file without blank lines is read in paragraphs of up to 1 MB), split into sentences by
  :func:`bertlite.data.sentences.split_sentences`;
* ``jsonl`` - one JSON object a line, the text of a document in a field (``text``).

Inputs are one file, a folder (its files, recursively) or a glob; ``.gz`` files (and ``.zst``
with the ``zstandard`` package) are decompressed as streams. Plain files can be read in byte
ranges that start and end at a paragraph boundary, so that workers can share one big file.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from bertlite.data._bytewords import code_lines, index_words
from bertlite.data.corpus import (
    _BOUNDARY,
    _STR_ONLY_SPACE,
    TokenizedCorpus,
    _paragraph_lines,
    _type_codes,
    check_text,
    tokenize_corpus,
)
from bertlite.data.sentences import normalize_sentence, split_sentences
from bertlite.errors import DataError

FORMATS = ("wikitext", "lines", "text", "jsonl")
COMPRESSED = (".gz", ".zst")
#: extensions that name a format without doubt (``.txt`` does not: lines or text?)
EXTENSION_FORMATS = {".tokens": "wikitext", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_BLOCK = 1 << 20
#: a ``text`` paragraph longer than this many characters is cut at a line end
MAX_PARAGRAPH_CHARS = 1 << 20
#: a longer line is an error (a file without line breaks cannot be read in bounded memory)
MAX_LINE_BYTES = 64 << 20


@dataclass
class ReadStats:
    """What reading found: counted per worker and summed."""

    bytes: int = 0
    documents: int = 0
    sentences: int = 0
    bad_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def add(self, other: ReadStats) -> None:
        self.bytes += other.bytes
        self.documents += other.documents
        self.sentences += other.sentences
        self.bad_lines += other.bad_lines
        self.bad_examples = (self.bad_examples + other.bad_examples)[:5]


def expand_inputs(source: str | os.PathLike | list) -> list[Path]:
    """The files of a corpus: a file, a folder (its files, recursively, hidden ones left out),
    a glob pattern, or a list of these; sorted, so the order never depends on the disk."""
    if isinstance(source, (list, tuple)):
        return [p for s in source for p in expand_inputs(s)]
    text = os.fspath(source)
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"corpus folder {path} holds no files")
        return files
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no file matches the corpus pattern {text!r}")
        return files
    raise DataError(f"corpus {text!r} does not exist (give a file, a folder or a glob pattern)")


def _stem_suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in COMPRESSED:
        if name.endswith(ext):
            name = name[:-len(ext)]
    return Path(name).suffix


def detect_format(files: list[Path], format: str | None = None) -> str:
    """The format named (checked), else the one every file's extension names."""
    if format is not None:
        if format not in FORMATS:
            raise DataError(f"unknown corpus format {format!r}: use one of {list(FORMATS)}")
        return format
    found = {EXTENSION_FORMATS.get(_stem_suffix(p)) for p in files}
    if len(found) == 1 and None not in found:
        return found.pop()
    names = ", ".join(sorted({p.name for p in files})[:3])
    raise DataError(f"cannot tell the format of {names} from the extension; give format= / "
                    f"--format, one of {list(FORMATS)}")


def open_binary(path: Path) -> IO[bytes]:
    """A binary stream of a file's content, decompressed for ``.gz`` and ``.zst``."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path} is zstd-compressed: reading it needs the zstandard "
                            "package (pip install zstandard), or decompress it first") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def is_compressed(path: Path) -> bool:
    return path.name.lower().endswith(COMPRESSED)


def _boundary(f: IO[bytes], offset: int, size: int, blank: bool) -> int:
    """The first paragraph boundary at or after ``offset``: the start of a line (after a blank
    line where paragraphs span lines)."""
    if offset <= 0:
        return 0
    f.seek(offset - 1)
    pos = offset - 1
    previous = b""
    while pos < size:
        block = f.read(_BLOCK)
        if not block:
            break
        data = previous + block
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if not blank:
                return pos - len(previous) + nl + 1
            rest = data[nl + 1:nl + 3]
            if rest[:1] == b"\n" or rest == b"\r\n":
                return pos - len(previous) + nl + 1
            start = nl + 1
        previous = data[-2:]
        pos += len(block)
    return size


def plan_ranges(path: Path, format: str, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about ``chunk_bytes`` that start and end at paragraph boundaries;
    one range ``(0, -1)`` (the whole stream) for a compressed file."""
    if is_compressed(path):
        return [(0, -1)]
    size = path.stat().st_size
    if size <= chunk_bytes:
        return [(0, size)]
    blank = format in ("lines", "text")
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, -(-size // chunk_bytes)):
            cut = _boundary(f, max(k * chunk_bytes, cuts[-1] + 1), size, blank)
            if cut >= size:
                break
            if cut > cuts[-1]:
                cuts.append(cut)
    cuts.append(size)
    return list(zip(cuts[:-1], cuts[1:]))


def _raw_blocks(path: Path, start: int, end: int, stats: ReadStats
                ) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, bytes)`` blocks of whole lines of ``path[start:end]`` (``end`` -1: to
    the end of the stream), checked to be UTF-8 text with no NUL byte."""
    try:
        with open_binary(path) as f:
            if start:
                f.seek(start)
            pos, carry = start, b""
            while True:
                want = _BLOCK if end < 0 else min(_BLOCK, end - pos)
                block = f.read(want) if want > 0 else b""
                data = carry + block
                if not block:
                    if data:
                        stats.bytes += len(data)
                        check_text(data, path, pos - len(data))
                        yield pos - len(data), data
                    return
                pos += len(block)
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    if len(data) > MAX_LINE_BYTES:  # memory stays bounded
                        raise DataError(f"{path} has a line longer than "
                                        f"{MAX_LINE_BYTES >> 20} MB near byte {pos}; is it a "
                                        "text file with line breaks?")
                    carry = data
                    continue
                stats.bytes += cut
                check_text(data[:cut], path, pos - len(data))
                yield pos - len(data), data[:cut]
                carry = data[cut:]
    except (OSError, EOFError) as err:  # a damaged .gz, say
        raise DataError(f"cannot read {path}: {err}; is it a valid (compressed) text file?"
                        ) from None


def _text_blocks(path: Path, start: int, end: int, stats: ReadStats
                 ) -> Iterator[tuple[int, str]]:
    """As :func:`_raw_blocks`, decoded, with every line end made ``\\n``."""
    for offset, data in _raw_blocks(path, start, end, stats):
        text = data.decode("utf-8")
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        yield offset, text


def wiki_lines(path: Path, start: int = 0, end: int = -1, stats: ReadStats | None = None
               ) -> Iterator[bytes]:
    """The paragraph lines of a WikiText file as bytes (stripped, holding ``' . '``), the lines
    :func:`bertlite.data.corpus.read_corpus` codes (the fast path of ``wikitext``)."""
    stats = stats if stats is not None else ReadStats()
    for _, data in _raw_blocks(path, start, end, stats):
        lines = _paragraph_lines(data)
        stats.documents += len(lines)
        stats.sentences += sum(line.count(b" . ") for line in lines) + len(lines)
        yield from lines


def _lines(path: Path, start: int, end: int, stats: ReadStats) -> Iterator[str]:
    for _, text in _text_blocks(path, start, end, stats):
        lines = text.split("\n")
        if text.endswith("\n"):
            lines.pop()
        yield from lines


def _line_number(path: Path, start: int, index: int) -> int:
    """The 1-based line number in the file of line ``index`` of a range starting at
    ``start`` (counted only when an error needs it)."""
    before = 0
    if start > 0:
        with open_binary(path) as f:
            remaining = start
            while remaining > 0:
                block = f.read(min(_BLOCK, remaining))
                if not block:
                    break
                before += block.count(b"\n")
                remaining -= len(block)
    return before + index + 1


def read_paragraphs(path: Path, format: str, start: int = 0, end: int = -1, *,
                    field_name: str = "text", skip_bad_lines: bool = False,
                    stats: ReadStats | None = None, lowercase: bool = True
                    ) -> Iterator[list[str]]:
    """The paragraphs of ``path[start:end]`` in a format (see the module's docstring); only
    those of two or more sentences, which NSP can use. ``lowercase=False`` keeps the case (for
    a cased tokenizer)."""
    stats = stats if stats is not None else ReadStats()
    reader = {"wikitext": _wikitext, "lines": _sentence_lines, "text": _running_text,
              "jsonl": _jsonl}[format]
    kwargs = {"field_name": field_name, "skip_bad_lines": skip_bad_lines} \
        if format == "jsonl" else {}
    kwargs["lowercase"] = lowercase
    for paragraph in reader(path, start, end, stats, **kwargs):
        stats.documents += 1
        if len(paragraph) >= 2 or format == "wikitext":  # the book keeps every ' . ' line
            stats.sentences += len(paragraph)
            yield paragraph


def _wikitext(path: Path, start: int, end: int, stats: ReadStats, lowercase: bool = True
              ) -> Iterator[list[str]]:
    # the book's rules, as read_wiki: lowercase, strip, lines holding ' . ' split on it
    for _, text in _text_blocks(path, start, end, stats):
        for line in (text.lower() if lowercase else text).split("\n"):
            if " . " in line:
                yield line.strip().split(" . ")


def _sentence_lines(path: Path, start: int, end: int, stats: ReadStats,
                    lowercase: bool = True) -> Iterator[list[str]]:
    paragraph: list[str] = []
    for line in _lines(path, start, end, stats):
        sentence = normalize_sentence(line, lowercase)
        if sentence:
            paragraph.append(sentence)
        elif not line.strip() and paragraph:
            yield paragraph
            paragraph = []
    if paragraph:
        yield paragraph


def _sentences_of(text: str, lowercase: bool = True) -> list[str]:
    return [s for s in (normalize_sentence(x, lowercase)
                        for x in split_sentences(" ".join(text.split()))) if s]


def _running_text(path: Path, start: int, end: int, stats: ReadStats, lowercase: bool = True
                  ) -> Iterator[list[str]]:
    block: list[str] = []
    size = 0
    for line in _lines(path, start, end, stats):
        if line.strip():
            block.append(line)
            size += len(line)
            if size < MAX_PARAGRAPH_CHARS:
                continue
        if block:
            yield _sentences_of(" ".join(block), lowercase)
            block, size = [], 0
    if block:
        yield _sentences_of(" ".join(block), lowercase)


def _jsonl(path: Path, start: int, end: int, stats: ReadStats, *, field_name: str,
           skip_bad_lines: bool, lowercase: bool = True) -> Iterator[list[str]]:
    for index, line in enumerate(_lines(path, start, end, stats)):
        if not line.strip():
            continue
        problem = None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problem = f"is not JSON ({err.msg})"
        else:
            if not isinstance(record, dict) or field_name not in record:
                problem = f"has no field {field_name!r}"
            elif not isinstance(record[field_name], str):
                problem = f"has a {type(record[field_name]).__name__} in {field_name!r}, " \
                          "not a string"
        if problem is None:
            yield _sentences_of(record[field_name], lowercase)
            continue
        where = f"{path} line {_line_number(path, start, index)}"
        if not skip_bad_lines:
            raise DataError(f"{where} {problem}; fix it, choose the field with --jsonl-field, "
                            "or pass --skip-bad-lines (skip_bad_lines=True) to skip such lines")
        stats.bad_lines += 1
        if len(stats.bad_examples) < 5:
            stats.bad_examples.append(f"{where} {problem}")


def chunks(path: str, fmt: str, start: int, end: int, chunk_bytes: int, field_name: str,
           skip_bad_lines: bool, stats: ReadStats, lowercase: bool = True) -> Iterator[list]:
    """The paragraphs of a task, in chunks of about ``chunk_bytes`` characters: lists of
    sentence lists, or for ``wikitext`` the paragraph lines as bytes (see
    :func:`tokenize_chunk`, which lowercases them unless ``lowercase`` is False)."""
    chunk: list = []
    size = 0
    if fmt == "wikitext":
        for line in wiki_lines(Path(path), start, end, stats):
            chunk.append(line)
            size += len(line) + 1
            if size >= chunk_bytes:
                yield chunk
                chunk, size = [], 0
    else:
        for paragraph in read_paragraphs(Path(path), fmt, start, end, field_name=field_name,
                                         skip_bad_lines=skip_bad_lines, stats=stats,
                                         lowercase=lowercase):
            chunk.append(paragraph)
            size += sum(map(len, paragraph)) + 3 * len(paragraph)
            if size >= chunk_bytes:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def tokenize_chunk(chunk: list, lowercase: bool = True) -> TokenizedCorpus:
    """The words of a chunk. WikiText lines (bytes) are coded as
    :func:`bertlite.data.corpus.read_corpus` codes a file: split as bytes, only the distinct
    words decoded and lowercased (unless ``lowercase`` is False: a cased tokenizer's), the
    same words as the book's rules give."""
    if not chunk or not isinstance(chunk[0], bytes):
        return tokenize_corpus(chunk)
    text = b"\n".join(chunk).replace(b" . ", f" {_BOUNDARY} ".encode())
    coded = code_lines(text)
    if coded is not None:
        distinct, index, line_ends = coded
    else:
        line_words = [line.split() for line in text.split(b"\n")]
        distinct, index = index_words([w for words in line_words for w in words])
        line_ends = np.cumsum([len(words) for words in line_words])
    del text
    distinct.append(_BOUNDARY.encode())
    index = np.insert(index, line_ends, len(distinct) - 1)
    decoded = b"\n".join(distinct).decode("utf-8")
    if _STR_ONLY_SPACE.search(decoded):  # whitespace only str.split() knows: the book's way
        lines = (line.decode("utf-8") for line in chunk)
        return tokenize_corpus([(line.lower() if lowercase else line).strip().split(" . ")
                                for line in lines])
    types, codes = _type_codes((decoded.lower() if lowercase else decoded).split("\n"))
    codes = codes[index]
    sentence_ends = np.flatnonzero(codes < 0)
    line_end_at = line_ends + np.arange(len(line_ends))
    sizes = np.diff(np.searchsorted(sentence_ends, line_end_at, side="right"), prepend=0)
    return TokenizedCorpus(types, codes, sizes)
