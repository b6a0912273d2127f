"""Corpus formats read as streams, the sentence splitter, and their errors (no framework)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from bertlite.data.corpus import read_wiki
from bertlite.data.formats import (
    ReadStats,
    detect_format,
    expand_inputs,
    plan_ranges,
    read_paragraphs,
)
from bertlite.data.sentences import basic_words, split_sentences
from bertlite.errors import DataError

SAMPLE = Path(__file__).resolve().parents[1] / "bertlite" / "data" / "sample" / "wiki.train.tokens"


def test_splitter_english_rules():
    text = ('Dr. Smith paid $3.14 for it. Then he left! Did he? "Yes." (He did.) '
            "J. R. Tolkien wrote e.g. books. The U.S. is big")
    assert split_sentences(text) == [
        "Dr. Smith paid $3.14 for it.", "Then he left!", "Did he?", '"Yes."', "(He did.)",
        "J. R. Tolkien wrote e.g. books.", "The U.S. is big"]


def test_splitter_cjk_and_korean():
    assert split_sentences("我爱北京。天安门很大！你呢？好") == [
        "我爱北京。", "天安门很大！", "你呢？", "好"]
    # Korean: '.' after a word, with or without a space after it; decimals stay whole
    assert split_sentences("나는 밥을 먹었다. 그리고 잤다.그리고 일어났다. 3.5점이다.") == [
        "나는 밥을 먹었다.", "그리고 잤다.", "그리고 일어났다.", "3.5점이다."]


def test_basic_words():
    assert basic_words("Hello, World! It's 3.14.") == ["hello", ",", "world", "!", "it's",
                                                        "3.14", "."]
    assert basic_words("東京は大きい") == ["東", "京", "は", "大", "き", "い"]
    assert basic_words("한국어 문장입니다.") == ["한국어", "문장입니다", "."]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_inputs_file_folder_glob(tmp_path):
    (tmp_path / "b").mkdir()
    a = _write(tmp_path / "b" / "a.jsonl", "")
    c = _write(tmp_path / "b" / "c.jsonl", "")
    _write(tmp_path / "b" / ".hidden.jsonl", "")
    assert expand_inputs(a) == [a]
    assert expand_inputs(tmp_path / "b") == [a, c]
    assert expand_inputs(str(tmp_path / "b" / "*.jsonl")) == [a, c]
    with pytest.raises(DataError, match="does not exist"):
        expand_inputs(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="no file matches"):
        expand_inputs(str(tmp_path / "*.zzz"))


def test_detect_format(tmp_path):
    assert detect_format([Path("x/wiki.train.tokens")]) == "wikitext"
    assert detect_format([Path("a.jsonl.gz"), Path("b.ndjson")]) == "jsonl"
    with pytest.raises(DataError, match="cannot tell the format of a.txt"):
        detect_format([Path("a.txt")])
    with pytest.raises(DataError, match="unknown corpus format 'csv'"):
        detect_format([Path("a.txt")], "csv")


def _paragraphs(path: Path, fmt: str, **kwargs) -> list[list[str]]:
    return list(read_paragraphs(path, fmt, **kwargs))


def test_wikitext_reader_is_the_books(tmp_path):
    assert _paragraphs(SAMPLE, "wikitext") == read_wiki(SAMPLE)


def test_lines_and_text_formats(tmp_path):
    lines = _write(tmp_path / "a.txt", "First sentence here.\nSecond one!\n\n\nOnly one.\n\n"
                                       "Doc three, line one.\r\nLine two.\n")
    assert _paragraphs(lines, "lines") == [
        ["first sentence here .", "second one !"], ["doc three , line one .", "line two ."]]
    text = _write(tmp_path / "b.txt", "A wrapped para-\ngraph. Its second sentence.\n\n"
                                      "One line paragraph. With two sentences?\n")
    assert _paragraphs(text, "text") == [
        ["a wrapped para - graph .", "its second sentence ."],
        ["one line paragraph .", "with two sentences ?"]]


def test_jsonl_field_errors_and_skips(tmp_path):
    rows = [{"text": "One. Two."}, {"body": "Three. Four."}, "not json", {"text": 5}]
    path = _write(tmp_path / "d.jsonl", "\n".join(
        r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl line 2 has no field 'text'.*skip-bad-lines"):
        _paragraphs(path, "jsonl")
    stats = ReadStats()
    assert _paragraphs(path, "jsonl", skip_bad_lines=True, stats=stats) == [["one .", "two ."]]
    assert stats.bad_lines == 3
    assert "line 3 is not JSON" in stats.bad_examples[1]
    assert _paragraphs(path, "jsonl", field_name="body", skip_bad_lines=True) == [
        ["three .", "four ."]]


def test_gz_streams_like_plain(tmp_path):
    plain = _write(tmp_path / "w.tokens", SAMPLE.read_text(encoding="utf-8"))
    packed = tmp_path / "w.tokens.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert _paragraphs(packed, "wikitext") == _paragraphs(plain, "wikitext")
    assert plan_ranges(packed, "wikitext", 1000) == [(0, -1)]


def test_zst(tmp_path):
    path = tmp_path / "a.jsonl.zst"
    if importlib.util.find_spec("zstandard") is None:
        path.write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(DataError, match="pip install zstandard"):
            _paragraphs(path, "jsonl")
        return
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "A b. C d."}\n'))
    assert _paragraphs(path, "jsonl") == [["a b .", "c d ."]]


@pytest.mark.parametrize("fmt", ["wikitext", "lines"])
def test_byte_ranges_cover_the_file_at_boundaries(tmp_path, fmt):
    if fmt == "wikitext":
        path = SAMPLE
    else:
        docs = [f"Doc {i} sentence one.\nDoc {i} sentence two.\n" for i in range(300)]
        path = _write(tmp_path / "l.txt", "\n".join(docs))
    ranges = plan_ranges(path, fmt, 4000)
    assert len(ranges) > 3
    assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    pieces = [p for s, e in ranges for p in read_paragraphs(path, fmt, s, e)]
    assert pieces == _paragraphs(path, fmt)


def test_not_text(tmp_path):
    binary = tmp_path / "x.tokens"
    binary.write_bytes(b"abc . def\x00 . ghi\n")
    with pytest.raises(DataError, match="looks binary"):
        _paragraphs(binary, "wikitext")
    latin = tmp_path / "y.txt"
    latin.write_bytes("caf\xe9 . ol\xe9 .\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text.*re-encode"):
        _paragraphs(latin, "lines")
    broken = tmp_path / "z.tokens.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        _paragraphs(broken, "wikitext")
