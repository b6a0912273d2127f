"""Reading WikiText-format text, finding it on disk, and fetching WikiText-2 when absent."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertlite.data._bytewords import code_lines, index_words
from bertlite.errors import DataError

#: The reserved tokens of the book's vocabulary (``<unk>`` comes first, at index 0).
SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<sep>")

#: The book's WikiText-2 archive (d2l 0.17.6, ``DATA_HUB['wikitext-2']``).
WIKITEXT2_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"
WIKITEXT2_SHA1 = "3c914d17d80b1459be871a5039ac23e752a53cbe"

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
CORPORA = ("sample", "wikitext-2")


def get_tokens_and_segments(tokens_a: Sequence[str], tokens_b: Sequence[str] | None = None
                            ) -> tuple[list[str], list[int]]:
    """The BERT input of one text or a text pair: ``<cls> a <sep> [b <sep>]`` and segment ids."""
    tokens = ["<cls>", *tokens_a, "<sep>"]
    segments = [0] * (len(tokens_a) + 2)
    if tokens_b is not None:
        tokens += [*tokens_b, "<sep>"]
        segments += [1] * (len(tokens_b) + 1)
    return tokens, segments


def not_a_file(path: Path, what: str = "corpus file") -> DataError:
    """The error for a path that should be a file and is not: absent, a dangling symbolic
    link, or a folder, saying which."""
    if path.is_symlink() and not path.exists():
        return DataError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which does "
                         "not exist; fix the link or give the file itself")
    if path.is_dir():
        return DataError(f"{what} {path} is a folder, not a file")
    if path.exists():
        return DataError(f"{what} {path} is not a regular file")
    return DataError(f"{what} {path} does not exist")


def _read_checked(path: str | os.PathLike) -> bytes:
    """The bytes of a corpus file, checked to be UTF-8 text, with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise not_a_file(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read corpus file {path}: {err.strerror or err}") from None
    check_text(raw, path)
    return raw


def check_text(data: bytes, path: str | os.PathLike, offset: int = 0) -> None:
    """Refuse bytes of a corpus file (``data``, read at byte ``offset`` of ``path``) that are
    not UTF-8 text, saying where and what to do: the one check of whole files and of the
    streaming readers' blocks."""
    if b"\x00" in data:
        raise DataError(f"corpus file {path} looks binary (a NUL byte at byte "
                        f"{offset + data.index(0)}); give a text file")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"corpus file {path} is not UTF-8 text (byte {offset + err.start}: "
                        f"{data[err.start:err.start + 4]!r}); re-encode it as UTF-8") from None


def read_text(path: str | os.PathLike) -> str:
    """The text of a corpus file, with errors that say what is wrong with it."""
    return _read_checked(path).decode("utf-8")


def _no_paragraph(path: str | os.PathLike) -> DataError:
    return DataError(f"corpus file {path} has no paragraph of two or more sentences "
                     "(sentences are separated by ' . ', one paragraph per line, as in "
                     "WikiText); is it a WikiText-format file?")


def _paragraph_lines(text: str | bytes) -> list:
    """The book's paragraphs as stripped lines: those that hold ``' . '``. Lines end at \n,
    \r\n or \r, as in the book's text-mode readlines(); str.splitlines() would also break
    them at \x0b, \x0c, \x1c-\x1e, \x85, \u2028 and \u2029."""
    nl, cr, sep = ("\n", "\r", " . ") if isinstance(text, str) else (b"\n", b"\r", b" . ")
    if cr in text:
        text = text.replace(cr + nl, nl).replace(cr, nl)
    lines = text.split(nl)
    return [line.strip() for line in lines if sep in line]


def read_wiki(path: str | os.PathLike, lowercase: bool = True) -> list[list[str]]:
    """Paragraphs of a WikiText split, each a list of lowercased sentences (the book's rules;
    ``lowercase=False`` keeps the case, for a cased tokenizer).

    A line is a paragraph when it splits on ``' . '`` into at least two sentences. Unlike the
    book, the paragraphs are not shuffled here: the order is the file's, randomness comes later
    from an explicit seed.
    """
    text = read_text(path)
    paragraphs = [line.split(" . ") for line in _paragraph_lines(text.lower() if lowercase
                                                                  else text)]
    if not paragraphs:
        raise _no_paragraph(path)
    return paragraphs


#: marks the end of a sentence among the words (never a word: corpus files hold no NUL byte)
_BOUNDARY = "\x00"

#: the characters that str.split() and str.strip() take for whitespace and bytes.split() does
#: not (\x1c-\x1f and non-ASCII ones)
_STR_ONLY_SPACE = re.compile("[" + "".join(
    chr(c) for c in range(0x110000)
    if chr(c).isspace() and chr(c) not in " \t\n\r\x0b\x0c") + "]")


@dataclass
class TokenizedCorpus:
    """The words of all sentences (the book's lowercased ``sentence.split()``) as codes into
    ``types``, its distinct words, each sentence followed by the code -1: the corpus is
    counted and encoded through its few distinct words, not word by word."""

    types: list[str]
    codes: np.ndarray            # (words + sentences,) int32; -1 ends a sentence
    paragraph_sizes: np.ndarray  # (num paragraphs,) int64, sentences per paragraph

    @property
    def words(self) -> list[str]:
        """Every word, each sentence followed by a boundary marker (for inspection)."""
        types = [*self.types, _BOUNDARY]
        return [types[c] for c in self.codes.tolist()]

    def counts(self) -> np.ndarray:
        """How often each of ``types`` occurs."""
        return np.bincount(self.codes + 1, minlength=len(self.types) + 1)[1:]  # -1: ends

    def word_counts(self) -> Counter[str]:
        return Counter(dict(zip(self.types, self.counts().tolist())))


def _type_codes(distinct_text: list[str]) -> tuple[list[str], np.ndarray]:
    """``types, codes``: the distinct words of text that may repeat (different bytes may
    lowercase alike) and the code of each entry among them; ``_BOUNDARY`` becomes -1."""
    types = dict.fromkeys(distinct_text)
    types.pop(_BOUNDARY, None)
    code_of_type = dict(zip(types, range(len(types))))
    code_of_type[_BOUNDARY] = -1
    codes = np.fromiter(map(code_of_type.__getitem__, distinct_text), dtype=np.int32,
                        count=len(distinct_text))
    return list(types), codes


def tokenize_corpus(paragraphs: Sequence[Sequence[str]]) -> TokenizedCorpus:
    """Word tokens of paragraphs of sentence strings, as the book's ``sentence.split()``."""
    sentences = [s for p in paragraphs for s in p]
    words = f" {_BOUNDARY} ".join(sentences).split()
    words.append(_BOUNDARY)
    distinct, index = index_words(words)
    types, codes = _type_codes(distinct)
    return TokenizedCorpus(types, codes[index], np.asarray([len(p) for p in paragraphs],
                                                           dtype=np.int64))


def read_corpus(path: str | os.PathLike, lowercase: bool = True) -> TokenizedCorpus:
    """The words of a WikiText-format file: ``tokenize_corpus(read_wiki(path, lowercase))``,
    faster (``lowercase=False``: the words as they are, for a cased tokenizer).

    The text is split as bytes, and only its distinct words are decoded and lowercased (the
    same words: lowercasing neither makes nor breaks a space or a ``' . '``), unless they hold
    whitespace that only str.split() knows, where it goes through read_wiki. Where words are
    separated by single spaces, as in WikiText, they are coded with numpy (``_bytewords``)."""
    lines = _paragraph_lines(_read_checked(path))
    if not lines:
        raise _no_paragraph(path)
    # sentences end at ' . ' within a line (never across two: lines are joined by \n) and at
    # the end of each line
    text = b"\n".join(lines).replace(b" . ", f" {_BOUNDARY} ".encode())
    del lines  # a copy of the text: freed before the coder's arrays are made
    coded = code_lines(text)
    if coded is not None:
        distinct, index, line_ends = coded
    else:
        line_words = [line.split() for line in text.split(b"\n")]
        distinct, index = index_words([w for words in line_words for w in words])
        line_ends = np.cumsum([len(words) for words in line_words])
    distinct.append(_BOUNDARY.encode())
    # a boundary after each line's last word, with the index of the appended distinct word
    index = np.insert(index, line_ends, len(distinct) - 1)
    decoded = b"\n".join(distinct).decode("utf-8")  # \n: in no word, and uncased
    if _STR_ONLY_SPACE.search(decoded):
        return tokenize_corpus(read_wiki(path, lowercase))
    types, codes = _type_codes((decoded.lower() if lowercase else decoded).split("\n"))
    codes = codes[index]
    # sentences per line: the sentence ends up to each line's end, minus those up to the last
    sentence_ends = np.flatnonzero(codes < 0)
    line_end_at = line_ends + np.arange(len(line_ends))  # shifted by the boundaries before
    sizes = np.diff(np.searchsorted(sentence_ends, line_end_at, side="right"), prepend=0)
    return TokenizedCorpus(types, codes, sizes)


def default_data_root() -> Path:
    """Where corpora live: ``$BERTLITE_DATA``, else ``~/.cache/bertlite``."""
    env = os.environ.get("BERTLITE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "bertlite"


def find_split_file(data_dir: str | os.PathLike, split: str = "train") -> Path:
    """``data_dir/wiki.<split>.tokens``, or an error that says what the folder holds."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        if data_dir.is_symlink() and not data_dir.exists():
            raise DataError(f"data folder {data_dir} is a symbolic link to "
                            f"{os.readlink(data_dir)}, which does not exist")
        if data_dir.exists():
            raise DataError(f"data folder {data_dir} is a file, not a folder")
        raise DataError(f"data folder {data_dir} does not exist")
    path = data_dir / f"wiki.{split}.tokens"
    if path.is_symlink() or path.exists():
        if not path.is_file():
            raise not_a_file(path, "split file")
    else:
        have = sorted(p.name for p in data_dir.glob("wiki.*.tokens"))
        raise DataError(f"{path} is missing (the folder has {have or 'no wiki.*.tokens files'}); "
                        f"choose another split or put wiki.{split}.tokens there")
    return path


def resolve_corpus_file(corpus: str = "wikitext-2", split: str = "train", *,
                        data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The file of a corpus split: the sample shipped with bertlite, or WikiText-2.

    WikiText-2 is looked for in ``data_dir``, else ``$BERTLITE_DATA/wikitext-2``, else
    ``~/.cache/bertlite/wikitext-2``, and downloaded there (SHA-1 checked) when absent.
    ``corpus`` may also be the path of a folder that holds ``wiki.<split>.tokens``.
    """
    if corpus == "sample":
        return find_split_file(SAMPLE_DIR, split)
    if data_dir is not None:
        return find_split_file(data_dir, split)
    if corpus == "wikitext-2":
        folder = default_data_root() / "wikitext-2"
        if not folder.is_dir():
            if not download:
                raise DataError(f"WikiText-2 is not in {folder}; put wiki.{split}.tokens there")
            download_wikitext2(folder)
        return find_split_file(folder, split)
    if Path(corpus).is_dir():
        return find_split_file(corpus, split)
    raise DataError(f"unknown corpus {corpus!r}: use one of {list(CORPORA)}, or a folder "
                    "with wiki.<split>.tokens files (data_dir=...)")


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wikitext2(folder: str | os.PathLike, url: str | None = None,
                       sha1: str | None = None, timeout: float = 30.0) -> Path:
    """Download the book's WikiText-2 archive, check its SHA-1 and extract it to ``folder``.

    Everything happens in a temporary folder beside ``folder`` and is renamed into place at the
    end, so a failure (offline, server error, interrupted transfer, wrong checksum) leaves
    nothing behind.
    """
    from tqdm.auto import tqdm

    url = url or os.environ.get("BERTLITE_WIKITEXT2_URL", WIKITEXT2_URL)
    sha1 = sha1 or WIKITEXT2_SHA1  # read at call time, not bound at import
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    hint = (f"Put wiki.train.tokens (and wiki.valid.tokens, wiki.test.tokens) in {folder} "
            "yourself, set BERTLITE_DATA or data_dir=..., or use corpus='sample' "
            "(the small corpus shipped with bertlite).")
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".wikitext-2-") as tmp:
        archive = Path(tmp) / "wikitext-2-v1.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, \
                    open(archive, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc="WikiText-2",
                          leave=False, delay=0.5) as bar:
                    received = 0
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        out.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                if total is not None and received != total:
                    raise DataError(f"the download of {url} was interrupted ({received} of "
                                    f"{total} bytes). {hint}")
        except urllib.error.HTTPError as err:
            raise DataError(f"could not download WikiText-2 from {url}: HTTP {err.code} "
                            f"{err.reason}. {hint}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            # HTTPException: e.g. IncompleteRead when a chunked transfer is cut off
            if isinstance(err, DataError):
                raise
            reason = getattr(err, "reason", err)
            raise DataError(f"could not download WikiText-2 from {url} ({reason}). "
                            f"{hint}") from None
        got = _sha1(archive)
        if got != sha1:
            raise DataError(f"the archive from {url} has SHA-1 {got}, expected {sha1}; "
                            f"it was not kept. {hint}")
        extracted = Path(tmp) / "extracted"
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(extracted)
        except zipfile.BadZipFile:
            raise DataError(f"the archive from {url} is not a valid zip file. {hint}") from None
        found = sorted(extracted.rglob("wiki.train.tokens"))
        if not found:
            raise DataError(f"the archive from {url} has no wiki.train.tokens. {hint}")
        if folder.exists():  # another process finished first
            return folder
        shutil.move(str(found[0].parent), str(folder))
    return folder
