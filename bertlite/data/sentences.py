"""A rule-based sentence splitter and word tokenizer for plain text (the ``text``, ``lines`` and
``jsonl`` formats), so that any language's running text can become the book's sentences.

Sentences end at ``. ? !`` (runs of them, and the closing quotes and brackets that follow) before
whitespace, but not after a common abbreviation (``Dr.``, ``e.g.``), a single initial (``J.``)
or inside a number (``3.14``); CJK sentence punctuation (``。？！``) ends a sentence with or
without a space after it, and so does a ``.`` put straight after a Hangul word with no space
before the next one (``했다.그리고``). Words are BERT's basic tokens: lowercased,
punctuation split off, every CJK ideograph a word of its own.
"""

from __future__ import annotations

import re

#: common abbreviations that end with a period but rarely end a sentence (lowercase, no dot)
ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al fig figs eq eqs no nos vol vols pp
ch sec inc ltd co corp dept est approx jan feb mar apr jun jul aug sep sept oct nov dec
gen col lt sgt capt cmdr adm gov rep sen rev hon u.s u.k a.m p.m ph.d b.a m.a
""".split())

_CLOSERS = "\"'”’»)]}」』）】〕〉》"
_C = re.escape(_CLOSERS)
_HANGUL = "\uac00-\ud7a3"
# a candidate end: terminal punctuation and closers, then whitespace or the end of the text;
# CJK terminals (and a period after Hangul) end a sentence without a space
_END = re.compile(
    rf"[.?!]+[{_C}]*(?=\s|$)"
    rf"|[。？！｡]+[{_C}]*"
    rf"|(?<=[{_HANGUL}])\.+[{_C}]*(?=[^\s\d.])")
_WORD_BEFORE = re.compile(r"(\S+)$")
_CJK = (r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
        r"\U00020000-\U0002fa1f")  # kana and ideographs
# a word: letters/digits (with inner apostrophes, dots of numbers), or one punctuation mark,
# or one CJK character
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+(?:['’.,][^\W{_CJK}]+)*|[^\w\s]", re.UNICODE)


def _is_abbreviation(text: str, end: int) -> bool:
    """Whether the period at ``text[end]`` closes an abbreviation or an initial."""
    found = _WORD_BEFORE.search(text, 0, end)
    if not found:
        return False
    word = found.group(1).lstrip(_CLOSERS + "(\"'[")
    if word.lower() in ABBREVIATIONS:
        return True
    return len(word) == 1 and word.isupper()  # an initial: J. R. Tolkien


def split_sentences(text: str) -> list[str]:
    """The sentences of a paragraph of plain text, stripped, empty ones left out."""
    sentences = []
    start = 0
    for match in _END.finditer(text):
        punct = match.group(0)
        if punct[0] == "." and len(punct.rstrip(_CLOSERS)) == 1 \
                and _is_abbreviation(text, match.start()):
            continue
        sentence = text[start:match.end()].strip()
        if sentence:
            sentences.append(sentence)
        start = match.end()
    rest = text[start:].strip()
    if rest:
        sentences.append(rest)
    return sentences


def basic_words(sentence: str, lowercase: bool = True) -> list[str]:
    """BERT's basic tokens of a sentence: lowercased words (as they are for a cased tokenizer,
    ``lowercase=False``), each punctuation mark and each CJK character a token of its own;
    numbers keep their inner dots and commas (``3.14``)."""
    return _TOKEN.findall(sentence.lower() if lowercase else sentence)


def normalize_sentence(sentence: str, lowercase: bool = True) -> str:
    """A sentence as the space-separated basic tokens the pipeline splits on."""
    return " ".join(basic_words(sentence, lowercase))
