"""``bertlite prepare``: shards, manifest, workers, parts, resume, errors, and training from a
prepared folder on every backend."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

import bertlite
from bertlite.cli import main
from bertlite.data.loader import BatchIterator, prepare_data
from bertlite.data.manifest import read_manifest
from bertlite.data.prepare import merge, prepare
from bertlite.data.prepared import PreparedBatches, PreparedData
from bertlite.data.shards import open_shard, to_examples
from bertlite.errors import DataError

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "bertlite" / "data" / "sample"
SAMPLE = SAMPLE_DIR / "wiki.train.tokens"
HAS_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None

KOREAN = """서울은 한국의 수도이다. 인구가 많다. 한강이 도시를 가로지른다.
부산은 항구 도시이다.바다가 아름답다! 사람들이 친절하다?

제주도는 섬이다. 관광객이 많이 온다. 귤이 유명하다.
"""


def _korean_corpus(folder: Path, copies: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ko.txt"
    path.write_text("\n".join([KOREAN] * copies), encoding="utf-8")
    return path


def _shard_digests(folder: Path) -> list[tuple[str, int, str]]:
    return [(s["file"], s["examples"], s["sha1"]) for s in read_manifest(folder)["shards"]]


@pytest.mark.parametrize("tokenizer", ["word", "wordpiece"])
def test_one_wikitext_shard_equals_the_in_memory_pipeline(tmp_path, tokenizer):
    if tokenizer == "wordpiece" and not HAS_TOKENIZERS:
        pytest.skip("needs the tokenizers package")
    folder = prepare(SAMPLE, tmp_path / "p", max_len=48, seed=7, tokenizer=tokenizer,
                     wordpiece_vocab_size=600, workers=1)
    examples, vocab = prepare_data(SAMPLE, 48, seed=7, tokenizer=tokenizer,
                                   wordpiece_vocab_size=600, cache=False)
    data = PreparedData(folder)
    assert len(data.shards) == 1
    assert data.vocab == vocab
    assert data.shards[0].dtype["tokens"].base == np.uint16  # the smallest that holds 600+
    got = to_examples(open_shard(folder / read_manifest(folder)["shards"][0]["file"]))
    for name, array in examples.arrays().items():
        np.testing.assert_array_equal(getattr(got, name), array, err_msg=name)
    # and the batches of every pass, in the same order
    memory = BatchIterator(examples, 32, seed=7)
    mapped = PreparedBatches(data, 32, seed=7)
    for epoch in (0, 3):
        for a, b in zip(memory.iter_pass(epoch), mapped.iter_pass(epoch)):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
                assert x.dtype == y.dtype


FORMATS = ["wikitext", "lines", "text", "jsonl"]


def _corpus_in(fmt: str, src: Path) -> Path:
    """A small corpus in format ``fmt`` (text: Korean; jsonl: gzip-compressed)."""
    src.mkdir(parents=True, exist_ok=True)
    if fmt == "wikitext":
        return SAMPLE
    if fmt == "lines":
        path = src / "a.txt"
        path.write_text("".join(f"Sentence {i} of doc.\nAnother line {i}!\n\n"
                                for i in range(60)), encoding="utf-8")
        return path
    if fmt == "text":
        return _korean_corpus(src)
    import gzip

    path = src / "a.jsonl.gz"
    path.write_bytes(gzip.compress("".join(
        json.dumps({"text": f"Row {i} says hi. Then bye. 한국어 문장이다."}) + "\n"
        for i in range(50)).encode()))
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_prepares(tmp_path, fmt):
    path = _corpus_in(fmt, tmp_path / "src")
    folder = prepare(path, tmp_path / "p", format=fmt, max_len=32, min_freq=1, workers=1)
    manifest = read_manifest(folder)
    assert manifest["examples"] > 10 and manifest["settings"]["format"] == fmt
    assert manifest["inputs"][0]["size"] == path.stat().st_size
    data = PreparedData(folder)
    assert len(data) == manifest["examples"]
    batch = PreparedBatches(data, 8, seed=1).batch(0, 0)
    assert batch.tokens.shape == (8, 32) and batch.tokens.dtype == np.int32
    if fmt == "text":
        assert "서울은" in data.vocab and "." in data.vocab


def test_workers_parts_and_merge_agree(tmp_path):
    common = {"max_len": 40, "seed": 2, "shard_bytes": 30_000}
    one = prepare(SAMPLE, tmp_path / "one", workers=1, **common)
    assert len(read_manifest(one)["shards"]) > 3
    two = prepare(SAMPLE, tmp_path / "two", workers=2, **common)
    assert _shard_digests(two) == _shard_digests(one)
    parts = tmp_path / "parts"
    prepare(SAMPLE, parts, part="0/2", workers=1, **common)
    assert not (parts / "manifest.json").exists()
    with pytest.raises(DataError, match="tasks are not prepared yet"):
        merge(parts)
    prepare(SAMPLE, parts, part=(1, 2), workers=1, **common)
    merge(parts)
    assert _shard_digests(parts) == _shard_digests(one)
    with pytest.raises(DataError, match="i/N"):
        prepare(SAMPLE, parts, part="1of2", **common)


def _two_topic_corpus(folder: Path) -> list[Path]:
    """Two files (two tasks, a shard each) whose sentences share no word: a B sentence of the
    other file's words came from the other shard."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for topic in ("alpha", "beta"):
        rng = np.random.default_rng(len(topic))
        docs = ["\n".join(" ".join(f"{topic}{w}" for w in rng.integers(0, 30, 5))
                          for _ in range(3)) for _ in range(300)]
        path = folder / f"{topic}.txt"
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def test_random_next_sentences_come_from_other_shards(tmp_path):
    from bertlite.data.nsp_pool import POOL_FILE, POOL_SENTENCES

    paths = _two_topic_corpus(tmp_path / "src")
    common = {"format": "lines", "max_len": 32, "seed": 3, "min_freq": 1}
    one = prepare(paths, tmp_path / "one", workers=1, **common)
    two = prepare(paths, tmp_path / "two", workers=2, **common)
    assert len(_shard_digests(one)) == 2
    assert _shard_digests(two) == _shard_digests(one)  # the pool is the same for any workers
    with np.load(one / POOL_FILE) as pool:
        assert 0 < len(pool["lens"]) <= POOL_SENTENCES
    data = PreparedData(one)
    topic_of = np.array([t[:4] if t[:4] in ("alph", "beta") else "" for t in
                         data.vocab.idx_to_token])
    for shard, own in zip(data.shards, ("alph", "beta")):
        seg_b = (shard["segments"] == 1) & (topic_of[shard["tokens"]] != "")
        b_topic = topic_of[shard["tokens"]][np.arange(len(shard)), seg_b.argmax(axis=1)]
        a_topic = topic_of[shard["tokens"][:, 1]]
        assert (a_topic == own).all()
        follows = shard["nsp_label"] == 1
        assert (b_topic[follows] == own).all()
        crossed = (b_topic[~follows] != own).mean()  # expected 1/2: the other file's share
        assert 0.35 < crossed < 0.65, crossed


def test_reuse_resume_and_settings_guard(tmp_path):
    folder = prepare(SAMPLE, tmp_path / "p", max_len=40, shard_bytes=30_000, workers=1)
    before = _shard_digests(folder)
    assert not list(folder.glob("words-*"))  # pass 1's coded words, deleted once used
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert prepare(SAMPLE, folder, max_len=40, shard_bytes=30_000) == folder  # the cache key
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    # an interrupted run: no manifest, a task unfinished, a temporary half shard beside it
    (folder / "manifest.json").unlink()
    (folder / "task-00001.json").unlink()
    (folder / "shard-00001-000.npy").unlink()
    (folder / ".shard-00001-000.npy.x.tmp").write_bytes(b"half")
    kept = (folder / "shard-00000-000.npy").stat().st_mtime_ns
    prepare(SAMPLE, folder, max_len=40, shard_bytes=30_000, workers=1)
    assert _shard_digests(folder) == before
    assert (folder / "shard-00000-000.npy").stat().st_mtime_ns == kept  # not redone
    assert all(".tmp" not in s[0] for s in _shard_digests(folder))
    with pytest.raises(DataError, match="other inputs or settings"):
        prepare(SAMPLE, folder, max_len=32, shard_bytes=30_000)


def test_manifest_and_shard_checks(tmp_path):
    folder = prepare(SAMPLE, tmp_path / "p", max_len=40, workers=1)
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = folder / manifest["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="does not match its digest"):
        PreparedData(folder)
    manifest["version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="newer than this bertlite reads"):
        PreparedData(folder)
    with pytest.raises(DataError, match="not a prepared data folder"):
        PreparedData(tmp_path)


@pytest.mark.skipif(not hasattr(os, "preadv"), reason="positional reads need os.preadv (POSIX)")
def test_positional_reads_equal_the_memory_maps(tmp_path, monkeypatch):
    """Records read with os.preadv (runs of consecutive rows, across shards, in any order, with
    read-ahead advice and at most MAX_OPEN_SHARDS files open) are those of the memory maps; a
    shard cut short after opening is a clear error."""
    import bertlite.data.prepared as prepared_module

    monkeypatch.setattr(prepared_module, "MAX_OPEN_SHARDS", 2)
    data = PreparedData(prepare(SAMPLE, tmp_path / "p", max_len=40, shard_bytes=30_000,
                                workers=1))
    assert len(data.shards) >= 3
    n = len(data)
    first_shard_end = int(data.offsets[1])
    index = np.concatenate([np.random.default_rng(0).permutation(n)[:300],  # scattered
                            np.arange(first_shard_end - 5, first_shard_end + 5),  # a boundary
                            [n - 1, 0, 0]])  # the last, the first twice
    which = np.searchsorted(data.offsets, index, side="right") - 1
    data.will_need(index)
    read = data.records(index)
    assert len(data._files) <= 2  # the least recently used shard files were closed
    mapped = data.mapped_records(index, which)
    assert read.dtype == mapped.dtype and read.tobytes() == mapped.tobytes()
    assert data.records(np.array([], dtype=np.int64)).shape == (0,)
    with pytest.raises(IndexError, match="example indices"):
        data.records(np.array([n]))
    batches = PreparedBatches(data, 16, seed=3)
    assert [b.tokens.tolist() for b in list(batches)[:3]]  # reads through the batches too
    last = data.shards[-1].filename
    data.close()
    os.truncate(last, os.path.getsize(last) - 7)
    with pytest.raises(DataError, match="shorter than its manifest"):
        data.records(np.array([n - 1]))
    data.close()


def test_open_file_budget():
    resource = pytest.importorskip("resource", reason="POSIX file limits")

    from bertlite.data.prepared import open_file_budget

    assert open_file_budget(resource.RLIM_INFINITY) == 1024  # unlimited is not "none at all"
    assert open_file_budget(1024) == 256 and open_file_budget(20) == 16
    assert open_file_budget(10**6) == 1024 and open_file_budget(None) == 256


def test_bad_corpora(tmp_path):
    single = tmp_path / "single.txt"
    single.write_text("Only one sentence here.\n\nAnother lone one.\n", encoding="utf-8")
    with pytest.raises(DataError, match="no paragraph or document of two or more sentences"):
        prepare(single, tmp_path / "a", format="lines", workers=1)
    binary = tmp_path / "b.tokens"
    binary.write_bytes(b"\x00\x01 . \x02\n" * 10)
    with pytest.raises(DataError, match="looks binary"):
        prepare(binary, tmp_path / "b", workers=1)
    with pytest.raises(DataError, match="unknown corpus format"):
        prepare(SAMPLE, tmp_path / "c", format="csv")
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "A b. C d."}\n{oops\n' * 3, encoding="utf-8")
    with pytest.raises(DataError, match="d.jsonl line 2 is not JSON"):
        prepare(bad, tmp_path / "d", min_freq=1, workers=1)
    folder = prepare(bad, tmp_path / "e", min_freq=1, skip_bad_lines=True, workers=1)
    assert read_manifest(folder)["stats"]["bad_lines"] == 3
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_dynamic_masks_are_redrawn_per_pass(tmp_path):
    data = PreparedData(prepare(SAMPLE, tmp_path / "p", max_len=40, workers=1))
    batches = PreparedBatches(data, 16, seed=0, masking="dynamic")
    a, b = batches.batch(0, 0), batches.batch(1, 0)
    again = batches.batch(0, 0)
    for x, y in zip(a, again):
        np.testing.assert_array_equal(x, y)  # a function of (seed, pass, batch)
    assert not np.array_equal(a.pred_positions, b.pred_positions)
    stream = batches.stream(2, 5)
    assert next(stream)[:2] == (2, 5)


def test_training_from_a_prepared_folder_equals_in_memory(backend, tmp_path):
    folder = prepare(SAMPLE, tmp_path / "p", max_len=32, seed=1, workers=1)
    options = {"batch_size": 16, "max_len": 32, "num_steps": 3, "seed": 1, "plot": None,
               "progress": False, "verbose": False, "config": "tiny",
               "lr": 0.01, "warmup_steps": 0}  # corpus="sample" alone gets the demo's
    memory = bertlite.train(backend.name, corpus="sample", **options)
    mapped = bertlite.train(backend.name, data=str(folder), **options)
    assert mapped.history.mlm_loss == memory.history.mlm_loss
    assert mapped.history.nsp_loss == memory.history.nsp_loss


def test_cli_korean_text_prepare_and_pretrain(backend, tmp_path, capsys):
    path = _korean_corpus(tmp_path / "src")
    out = tmp_path / "ko"
    assert main(["prepare", str(path), "--format", "text", "--out", str(out), "--max-len", "24",
                 "--min-freq", "1", "--workers", "1"]) == 0
    assert "examples in 1 shard(s)" in capsys.readouterr().out
    held = tmp_path / "held"
    assert main(["prepare", str(path), "--format", "text", "--out", str(held), "--max-len", "24",
                 "--vocab-from", str(out), "--seed", "5", "--workers", "1"]) == 0
    code = main(["pretrain", "--backend", backend.name, "--data", str(out), "--eval-data",
                 str(held), "--eval-every", "2", "--steps", "2", "--batch-size", "8",
                 "--max-len", "24", "--no-plot", "--no-progress"])
    assert code == 0
    assert "MLM loss" in capsys.readouterr().out
    code = main(["pretrain", "--backend", backend.name, "--data", str(out), "--steps", "1",
                 "--max-len", "32", "--no-plot", "--no-progress"])
    assert code == 2 and "max_len=24" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_prepare_then_pretrain_every_format(backend, fmt, tmp_path, capsys):
    """`bertlite prepare` then `bertlite pretrain --data` on each format, on each backend."""
    path = _corpus_in(fmt, tmp_path / "src")
    out = tmp_path / "prepared"
    assert main(["prepare", str(path), "--format", fmt, "--out", str(out), "--max-len", "32",
                 "--min-freq", "1", "--workers", "1"]) == 0
    capsys.readouterr()
    code = main(["pretrain", "--backend", backend.name, "--data", str(out), "--steps", "2",
                 "--batch-size", "8", "--max-len", "32", "--no-plot", "--no-progress",
                 "--save", str(tmp_path / "model")])
    assert code == 0, capsys.readouterr().err
    assert "MLM loss" in capsys.readouterr().out
    assert (tmp_path / "model" / "config.json").is_file()


def test_corpus_prepared_into_the_cache(tmp_path, backend):
    src = tmp_path / "src"
    path = _korean_corpus(src)
    options = {"data": str(path), "format": "text", "batch_size": 8, "max_len": 24,
               "num_steps": 1, "plot": None, "progress": False, "verbose": False}
    first = bertlite.train(backend.name, **options)
    cache = Path(os.environ["BERTLITE_CACHE"])
    made = sorted(cache.glob("ko-*/manifest.json"))
    assert made and first.metadata["training"]["corpus"] == str(made[0].parent)
    bertlite.train(backend.name, **options)
    assert sorted(cache.glob("ko-*/manifest.json")) == made  # reused, not prepared again


def test_a_full_disk_leaves_no_half_shard(tmp_path):
    """A real write limit (RLIMIT_FSIZE, as a full disk) in a child process: a clear error, no
    shard or temporary file left under a listed name, no manifest; then the run resumes."""
    pytest.importorskip("resource")  # POSIX only
    out = tmp_path / "p"
    script = (
        "import resource, signal, sys\n"
        "from bertlite.data.prepare import prepare\n"
        "from bertlite.errors import DataError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    prepare({str(SAMPLE)!r}, {str(out)!r}, max_len=64, workers=1)\n"
        "except DataError as err:\n"
        "    print(err); sys.exit(3)\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr
    assert "cannot write" in done.stdout and "run the same command again" in done.stdout
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("shard-*")) and not list(out.glob(".*.tmp"))
    folder = prepare(SAMPLE, out, max_len=64, workers=1)
    assert read_manifest(folder)["examples"] > 0


def test_cli_parts_then_merge(tmp_path, capsys):
    out = tmp_path / "p"
    base = ["prepare", str(SAMPLE), "--out", str(out), "--max-len", "40", "--workers", "1"]
    assert main([*base, "--shard-mb", "0.03", "--part", "0/2"]) == 0
    assert "--merge" in capsys.readouterr().out
    assert main(["prepare", "--merge", "--out", str(out)]) == 2
    assert "not prepared yet" in capsys.readouterr().err
    assert main([*base, "--shard-mb", "0.03", "--part", "1/2"]) == 0
    assert main(["prepare", "--merge", "--out", str(out)]) == 0
    assert read_manifest(out)["examples"] > 0
    assert main(["prepare", "--out", str(out)]) == 2  # no corpus given
    assert "give the corpus" in capsys.readouterr().err


def test_exact_resume_from_a_prepared_folder(backend, tmp_path):
    folder = prepare(SAMPLE, tmp_path / "p", max_len=32, seed=4, shard_bytes=40_000, workers=1)
    options = {"data": str(folder), "batch_size": 16, "max_len": 32, "seed": 4, "plot": None,
               "progress": False, "verbose": False, "masking": "dynamic"}
    whole = bertlite.train(backend.name, num_steps=4, **options)
    bertlite.train(backend.name, num_steps=2, checkpoint_dir=tmp_path / "ck", **options)
    resumed = bertlite.train(backend.name, num_steps=4, checkpoint_dir=tmp_path / "ck",
                             resume=True, **options)
    np.testing.assert_allclose(resumed.history.mlm_loss, whole.history.mlm_loss, rtol=1e-6)
    np.testing.assert_allclose(resumed.history.nsp_loss, whole.history.nsp_loss, rtol=1e-6)


@pytest.mark.skipif(not HAS_TOKENIZERS, reason="needs the tokenizers package")
def test_korean_wordpiece_whole_word_masks(tmp_path):
    path = _korean_corpus(tmp_path / "src")
    folder = prepare(path, tmp_path / "p", format="text", tokenizer="wordpiece",
                     wordpiece_vocab_size=120, min_freq=1, max_len=24, whole_word_mask=True,
                     workers=1)
    data = PreparedData(folder)
    continues = np.array([t.startswith("##") for t in data.vocab.idx_to_token])
    assert continues.any() and "##다" in data.vocab
    records = data.records(np.arange(len(data)))
    split_words = 0
    for tokens, positions, weights in zip(records["tokens"], records["pred_positions"],
                                          records["mlm_weights"]):
        predicted = set(positions[weights > 0].tolist())
        for p in predicted:
            if continues[tokens[p]]:  # a piece inside a word: the piece before it goes too
                split_words += 1
                assert p - 1 in predicted
    assert split_words > 0
