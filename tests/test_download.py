"""Fetching WikiText-2: ``download_wikitext2`` and ``resolve_corpus_file(corpus="wikitext-2")``
against a local HTTP server on 127.0.0.1 that serves a small archive built here.

Every failure must raise DataError with a way out, and leave nothing behind: no half-filled
folder (which a later run would take for the data) and no temporary files beside it.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

from bertlite.data import corpus
from bertlite.data.corpus import download_wikitext2, resolve_corpus_file
from bertlite.errors import DataError

TIMEOUT = 5.0

SPLITS = {
    "train": (" = Lighthouses = \n\n"
              " A lighthouse marks a coast . Its light turns at night . Ships steer by it . \n"
              " The keeper lived in the tower . He wound the clock each evening . \n"),
    "valid": " = Rivers = \n\n A river runs to the sea . Its delta is wide . \n",
    "test": " = Bridges = \n\n A bridge spans a gap . Some bridges open for ships . \n",
}


def make_zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buffer.getvalue()


ARCHIVE = make_zip({f"wikitext-2/wiki.{split}.tokens": text for split, text in SPLITS.items()})
ARCHIVE_SHA1 = hashlib.sha1(ARCHIVE).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[str, bytes]] = {}
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - the http.server API
        self.hits.append(self.path)
        kind, body = self.routes.get(self.path, ("404", b""))
        self.close_connection = True
        if kind == "ok":
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif kind == "short":  # promises more than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 10_000))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        elif kind == "chunked-short":  # a chunked body cut off in the middle of a chunk
            self.protocol_version = "HTTP/1.1"
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n" % (len(body) + 500) + body)
            self.wfile.flush()
        elif kind == "stall":  # sends part of the body, then nothing for a while
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) * 2))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            time.sleep(2.0)
        elif kind == "500":
            self.send_error(500, "Internal Server Error")
        else:
            self.send_error(404, "Not Found")

    def log_message(self, format, *args):  # keep the test output clean
        pass


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server: ``(base_url, routes, hits)``; set ``routes[path] = (kind, body)``."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    routes: dict[str, tuple[str, bytes]] = {}
    hits: list[str] = []
    handler = type("TestHandler", (Handler,), {"routes": routes, "hits": hits})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", routes, hits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=TIMEOUT)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_extracted(folder: Path) -> None:
    assert folder.is_dir()
    for split, text in SPLITS.items():
        assert (folder / f"wiki.{split}.tokens").read_text(encoding="utf-8") == text


def assert_nothing_left(folder: Path) -> None:
    assert not folder.exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == []


# ----------------------------------------------------------------------------- success


def test_download_checks_sha1_and_extracts_in_place(server, tmp_path):
    base, routes, hits = server
    routes["/wikitext-2-v1.zip"] = ("ok", ARCHIVE)
    folder = tmp_path / "data" / "wikitext-2"
    got = download_wikitext2(folder, url=f"{base}/wikitext-2-v1.zip", sha1=ARCHIVE_SHA1,
                             timeout=TIMEOUT)
    assert got == folder
    assert_extracted(folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["wikitext-2"]  # no temp left
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"wiki.{s}.tokens" for s in SPLITS)
    assert hits == ["/wikitext-2-v1.zip"]
    # a folder that is already there is kept (another process finished first)
    again = download_wikitext2(folder, url=f"{base}/wikitext-2-v1.zip", sha1=ARCHIVE_SHA1,
                               timeout=TIMEOUT)
    assert again == folder
    assert_extracted(folder)


def test_resolve_corpus_file_downloads_once_from_the_env_url(server, tmp_path, monkeypatch):
    base, routes, hits = server
    routes["/mirror/wikitext-2-v1.zip"] = ("ok", ARCHIVE)
    monkeypatch.setenv("BERTLITE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BERTLITE_WIKITEXT2_URL", f"{base}/mirror/wikitext-2-v1.zip")
    monkeypatch.setattr(corpus, "WIKITEXT2_SHA1", ARCHIVE_SHA1)
    path = resolve_corpus_file(corpus="wikitext-2")
    folder = tmp_path / "data" / "wikitext-2"
    assert path == folder / "wiki.train.tokens"
    assert_extracted(folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["wikitext-2"]
    assert resolve_corpus_file(corpus="wikitext-2", split="valid") == folder / "wiki.valid.tokens"
    assert hits == ["/mirror/wikitext-2-v1.zip"]  # found on disk the second time
    # and the downloaded text is a usable corpus
    paragraphs = corpus.read_wiki(path)
    assert paragraphs[0] == ["a lighthouse marks a coast", "its light turns at night",
                             "ships steer by it ."]


def test_no_download_when_disallowed(server, tmp_path, monkeypatch):
    base, routes, hits = server
    monkeypatch.setenv("BERTLITE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BERTLITE_WIKITEXT2_URL", f"{base}/wikitext-2-v1.zip")
    with pytest.raises(DataError, match="wikitext-2"):
        resolve_corpus_file(corpus="wikitext-2", download=False)
    assert hits == []


# ----------------------------------------------------------------------------- failures


def test_wrong_checksum_keeps_nothing(server, tmp_path):
    base, routes, _ = server
    routes["/wikitext-2-v1.zip"] = ("ok", ARCHIVE)
    folder = tmp_path / "data" / "wikitext-2"
    with pytest.raises(DataError) as err:
        download_wikitext2(folder, url=f"{base}/wikitext-2-v1.zip", sha1="0" * 40,
                           timeout=TIMEOUT)
    message = str(err.value)
    assert "SHA-1" in message and ARCHIVE_SHA1 in message and "0" * 40 in message
    assert str(folder) in message  # where to put the files by hand
    assert_nothing_left(folder)


def test_wrong_checksum_through_resolve_corpus_file(server, tmp_path, monkeypatch):
    base, routes, _ = server
    routes["/wikitext-2-v1.zip"] = ("ok", ARCHIVE)
    monkeypatch.setenv("BERTLITE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BERTLITE_WIKITEXT2_URL", f"{base}/wikitext-2-v1.zip")
    # the real WikiText-2 checksum: the made-up archive does not match it
    with pytest.raises(DataError, match=corpus.WIKITEXT2_SHA1) as err:
        resolve_corpus_file(corpus="wikitext-2")
    assert str(tmp_path / "data" / "wikitext-2") in str(err.value)
    assert_nothing_left(tmp_path / "data" / "wikitext-2")


def test_http_500_is_a_clear_error(server, tmp_path):
    base, routes, _ = server
    routes["/wikitext-2-v1.zip"] = ("500", b"")
    folder = tmp_path / "data" / "wikitext-2"
    with pytest.raises(DataError, match=r"HTTP 500") as err:
        download_wikitext2(folder, url=f"{base}/wikitext-2-v1.zip", sha1=ARCHIVE_SHA1,
                           timeout=TIMEOUT)
    assert f"{base}/wikitext-2-v1.zip" in str(err.value)
    assert "corpus='sample'" in str(err.value) and str(folder) in str(err.value)
    assert_nothing_left(folder)


def test_http_404_is_a_clear_error(server, tmp_path):
    base, _, _ = server
    folder = tmp_path / "data" / "wikitext-2"
    with pytest.raises(DataError, match=r"HTTP 404"):
        download_wikitext2(folder, url=f"{base}/gone.zip", sha1=ARCHIVE_SHA1, timeout=TIMEOUT)
    assert_nothing_left(folder)


@pytest.mark.parametrize("kind", ["short", "chunked-short"])
def test_interrupted_transfer_keeps_nothing(server, tmp_path, kind):
    base, routes, _ = server
    routes["/wikitext-2-v1.zip"] = (kind, ARCHIVE[:len(ARCHIVE) // 2])
    folder = tmp_path / "data" / "wikitext-2"
    with pytest.raises(DataError) as err:
        download_wikitext2(folder, url=f"{base}/wikitext-2-v1.zip", sha1=ARCHIVE_SHA1,
                           timeout=TIMEOUT)
    assert "corpus='sample'" in str(err.value)
    if kind == "short":
        assert "interrupted" in str(err.value)
    assert_nothing_left(folder)


def test_a_stalled_transfer_times_out(server, tmp_path):
    base, routes, _ = server
    routes["/wikitext-2-v1.zip"] = ("stall", ARCHIVE[:100])
    folder = tmp_path / "data" / "wikitext-2"
    start = time.monotonic()
    with pytest.raises(DataError, match="timed out|corpus='sample'"):
        download_wikitext2(folder, url=f"{base}/wikitext-2-v1.zip", sha1=ARCHIVE_SHA1,
                           timeout=0.3)
    assert time.monotonic() - start < 1.5
    assert_nothing_left(folder)


def test_unreachable_server_suggests_the_sample_corpus(tmp_path, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    url = f"http://127.0.0.1:{closed_port()}/wikitext-2-v1.zip"
    folder = tmp_path / "data" / "wikitext-2"
    with pytest.raises(DataError) as err:
        download_wikitext2(folder, url=url, sha1=ARCHIVE_SHA1, timeout=TIMEOUT)
    message = str(err.value)
    assert "corpus='sample'" in message and url in message and str(folder) in message
    assert_nothing_left(folder)
    # the same through resolve_corpus_file and the env URL
    monkeypatch.setenv("BERTLITE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BERTLITE_WIKITEXT2_URL", url)
    with pytest.raises(DataError, match="corpus='sample'"):
        resolve_corpus_file(corpus="wikitext-2")
    assert_nothing_left(folder)


@pytest.mark.parametrize("case", ["not-a-zip", "no-train-split"])
def test_archive_with_the_right_checksum_but_wrong_content(server, tmp_path, case):
    base, routes, _ = server
    body = (b"this is not a zip archive" if case == "not-a-zip"
            else make_zip({"other/readme.txt": "no corpus here"}))
    routes["/wikitext-2-v1.zip"] = ("ok", body)
    folder = tmp_path / "data" / "wikitext-2"
    with pytest.raises(DataError, match="zip|wiki.train.tokens"):
        download_wikitext2(folder, url=f"{base}/wikitext-2-v1.zip",
                           sha1=hashlib.sha1(body).hexdigest(), timeout=TIMEOUT)
    assert_nothing_left(folder)
