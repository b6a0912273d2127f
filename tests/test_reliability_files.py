"""Files, checkpoints and shared folders (issue 14, classes 1, 4 and 5): bertlite never deletes
what it did not write, verifies checkpoints instead of trusting them, holds a lock on a run's
checkpoint directory, fails a full disk in one line, respects the umask, and names odd data
paths truthfully. Real files, a real second process, a real small tmpfs, a real RLIMIT_FSIZE
and a real second user, no mocks."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import bertlite
from bertlite import checkpoint as ckpt
from bertlite import lock
from bertlite.cli import main as cli_main
from bertlite.config import BERTConfig
from bertlite.data import cache as data_cache
from bertlite.data.corpus import SAMPLE_DIR, find_split_file, read_text
from bertlite.data.loader import prepare_data
from bertlite.data.vocab import Vocab
from bertlite.errors import CheckpointError, DataError
from bertlite.params import init_params

FORMAT1 = Path(__file__).resolve().parent / "data" / "checkpoint-format1"
#: the settings the format-1 fixture was trained with (see its README.md)
SMALL = dict(num_hiddens=8, ffn_num_hiddens=16, num_heads=2, num_layers=1, dropout=0.0,
             max_len=64)
RUN = dict(corpus="sample", config=SMALL, batch_size=8, max_len=64, plot=None, progress=False,
           verbose=False)
CONFIG = BERTConfig(vocab_size=9, num_hiddens=8, ffn_num_hiddens=16, num_heads=2, num_layers=1,
                    max_len=12)
VOCAB = Vocab.from_tokens(["<unk>", "<pad>", "<mask>", "<cls>", "<sep>", "a", "b", "c", "d"])
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def write(path, config=CONFIG, vocab=VOCAB, weights=None, **kwargs):
    return ckpt.write_checkpoint(path, config=config, vocab=vocab,
                                 weights=weights or init_params(config, 0),
                                 backend_name="torch", **kwargs)


def snapshot(path: Path) -> dict[str, bytes | str]:
    """Every entry under ``path`` (itself included) with its bytes or link target."""
    out = {}
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() and not path.is_symlink() \
            else [path]:
        key = str(p.relative_to(path.parent))
        out[key] = (f"-> {os.readlink(p)}" if p.is_symlink() else
                    "<dir>" if p.is_dir() else p.read_bytes())
    return out


# ------------------------------------------------ 1. never delete what bertlite did not write

def _regular_file(d: Path) -> None:
    d.write_text("my notes")


def _symlink(d: Path) -> None:
    (d.parent / "elsewhere").mkdir()
    (d.parent / "elsewhere" / "keep.txt").write_text("mine")
    d.symlink_to(d.parent / "elsewhere")


def _folder_of_mine(d: Path) -> None:
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "data").mkdir()


def _foreign_config(d: Path) -> None:
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"name": "another tool's config"}))


def _checkpoint_plus_mine(d: Path) -> None:
    write(d)
    (d / "notes.txt").write_text("mine")


REFUSED = [  # (what is there, how to make it, message)
    ("a regular file", _regular_file, "is a file, not a checkpoint folder"),
    ("a symbolic link", _symlink, "is a symbolic link"),
    ("a folder of the user's", _folder_of_mine, "not a bertlite checkpoint .*thesis.tex"),
    ("another tool's config.json", _foreign_config, "not a bertlite checkpoint"),
    ("a checkpoint holding a user's file", _checkpoint_plus_mine, "also holds notes.txt"),
]


@pytest.mark.parametrize("what, make, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_writing_a_checkpoint_never_replaces_what_bertlite_did_not_write(
        tmp_path, what, make, message):
    target = tmp_path / "out"
    make(target)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        write(target)
    assert snapshot(tmp_path) == before  # untouched, and no temporary folder left


@pytest.mark.parametrize("make", [lambda d: d.mkdir(), lambda d: write(d, training={"a": 1})],
                         ids=["empty folder", "a checkpoint"])
def test_an_empty_folder_or_a_checkpoint_is_replaced(tmp_path, make):
    make(tmp_path / "out")
    write(tmp_path / "out", training={"a": 2})
    assert ckpt.read_checkpoint(tmp_path / "out")["meta"]["training"] == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


_TRAINED: dict[str, object] = {}


def trained(backend_name: str):
    """A 2-step model of the backend (trained once per test session)."""
    if backend_name not in _TRAINED:
        _TRAINED[backend_name] = bertlite.train(backend_name, num_steps=2, **RUN)
    return _TRAINED[backend_name]


@pytest.mark.parametrize("what, make, message", REFUSED[:3], ids=[r[0] for r in REFUSED[:3]])
def test_model_save_refuses_foreign_targets(backend_name, tmp_path, what, make, message):
    model = trained(backend_name)
    make(tmp_path / "out")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        model.save(tmp_path / "out")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("save, relation", [("run", "is"), ("run/final", "is inside"),
                                            (".", "holds")])
def test_cli_save_and_checkpoint_dir_overlapping_is_refused_before_training(
        backend_name, tmp_path, capsys, monkeypatch, save, relation):
    monkeypatch.chdir(tmp_path)
    code = cli_main(["pretrain", "--backend", backend_name, "--corpus", "sample", "--steps", "2",
                     "--batch-size", "8", "--checkpoint-dir", "run", "--save", save,
                     "--no-plot", "--no-progress"])
    assert code == 2
    assert f"the save path {save} {relation} the checkpoint directory run" in \
        capsys.readouterr().err
    assert not Path("run").exists()  # refused before anything was written


@pytest.mark.parametrize("what, make, message", REFUSED[:3], ids=[r[0] for r in REFUSED[:3]])
def test_cli_save_to_a_foreign_target_is_refused_before_training(
        backend_name, tmp_path, capsys, what, make, message):
    make(tmp_path / "out")
    before = snapshot(tmp_path)
    code = cli_main(["pretrain", "--backend", backend_name, "--corpus", "sample", "--steps", "2",
                     "--batch-size", "8", "--checkpoint-dir", str(tmp_path / "run"), "--save",
                     str(tmp_path / "out"), "--no-plot", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and re.search(message, err)
    assert snapshot(tmp_path) == before  # nothing trained, nothing written


def test_pruning_touches_only_this_runs_checkpoints(backend_name, tmp_path):
    run = tmp_path / "run"
    write(run / "step-000001", training={"run": "someone-else"})  # copied in from another run
    write(run / "step-000003")                                     # from before run ids
    (run / "step-000007").mkdir()                                  # a folder of the user's
    (run / "step-000007" / "mine.txt").write_text("mine")
    foreign = snapshot(run)
    bertlite.train(backend_name, num_steps=5, checkpoint_dir=run, checkpoint_every=2,
                   keep_checkpoints=1, **RUN)
    assert all(snapshot(run).get(k) == v for k, v in foreign.items())  # all still there
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [1, 3, 5]
    # a resume keeps the run's id, so its new checkpoints replace its older ones
    run_id = ckpt.run_id(run / "step-000005")
    result = bertlite.train(backend_name, num_steps=6, checkpoint_dir=run, keep_checkpoints=1,
                            resume=True, **RUN)
    assert ckpt.run_id(run / "step-000006") == run_id
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [1, 3, 6]
    assert all(snapshot(run).get(k) == v for k, v in foreign.items())
    with pytest.raises(CheckpointError, match="not a bertlite checkpoint .*step-000001"):
        result.save(run)  # a run's checkpoint directory is not a checkpoint
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [1, 3, 6]


# ------------------------------------------------------- 4. checkpoints verified, not trusted

def _flip_tensor_byte(d: Path) -> None:
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-7] ^= 0x10  # in the last tensor's data
    (d / "model.safetensors").write_bytes(bytes(raw))


def _edit_json(name: str, change) -> object:
    def edit(d: Path) -> None:
        data = json.loads((d / name).read_text())
        (d / name).write_text(json.dumps(change(data)))
    return edit


def _rename_mask(d: Path) -> None:
    text = (d / "vocab.txt").read_text()
    (d / "vocab.txt").write_text(text.replace("<mask>\n", "<masked>\n"))


VERIFIED = [  # format 2: (damage, message)
    ("flipped tensor bytes", _flip_tensor_byte, r"tensor \S+ does not match its SHA-256"),
    ("num_heads 2 -> 4, same shapes",
     _edit_json("config.json", lambda m: {**m, "model": {**m["model"], "num_heads": 4}}),
     "num_heads: config.json says 4, the weights were written for 2"),
    ("training setting edited",
     _edit_json("config.json", lambda m: {**m, "training": {**m["training"], "seed": 7}}),
     "training.seed: config.json says 7, the weights were written for 0"),
    ("config.json a list", _edit_json("config.json", lambda m: [m]),
     "must be a JSON object, got a list"),
    ("<mask> renamed", _rename_mask, "vocab.txt does not match the SHA-256"),
    ("trainer.json edited", _edit_json("trainer.json", lambda t: {**t, "batch_index": 0}),
     "trainer.json does not match the SHA-256"),
    ("a stray tokenizer.json", lambda d: (d / "tokenizer.json").write_text("{}"),
     "tokenizer.json was not written with the weights"),
]

TRAINER_STATE = {"step": 2, "epoch": 0, "batch_index": 2, "optimizer": {},
                 "history": {"step": [1, 2], "mlm_loss": [7.0, 6.5], "nsp_loss": [0.7, 0.6],
                             "lr": [0.01, 0.01], "pairs": 16, "step_time": 0.1, "eval": [],
                             "skipped": []}}


@pytest.mark.parametrize("what, damage, message", VERIFIED, ids=[r[0] for r in VERIFIED])
def test_format2_checkpoints_are_verified(tmp_path, what, damage, message):
    folder = write(tmp_path / "c", training={"seed": 0, "num_steps": 4},
                   trainer_arrays={"m": np.ones(3, np.float32)}, trainer_state=TRAINER_STATE)
    ckpt.read_checkpoint(folder, with_trainer=True)  # whole, it loads
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        ckpt.read_checkpoint(folder, with_trainer=True)


def _history(change):
    return _edit_json("trainer.json", lambda t: {**t, "history": change(t["history"])})


SCHEMA = [  # format 1 (no digests): every field still validated
    ("config.json a list", _edit_json("config.json", lambda m: [m]),
     "must be a JSON object, got a list"),
    ("no model", _edit_json("config.json", lambda m: {k: v for k, v in m.items()
                                                      if k != "model"}), "has no 'model'"),
    ("a string batch_size",
     _edit_json("config.json", lambda m: {**m, "training": {**m["training"],
                                                            "batch_size": "8"}}),
     "'batch_size' must be a positive integer, got '8'"),
    ("<mask> renamed", _rename_mask, "lacks the reserved token.* <mask>"),
    ("trainer.json without epoch",
     _edit_json("trainer.json", lambda t: {k: v for k, v in t.items() if k != "epoch"}),
     "has no 'epoch'"),
    ("a string step", _edit_json("trainer.json", lambda t: {**t, "step": "2"}),
     "'step' must be a non-negative integer, got '2'"),
    ("step beyond num_steps", _edit_json("trainer.json", lambda t: {**t, "step": 10000}),
     "step 10000 is beyond the run's num_steps 2"),
    ("history lengths differ", _history(lambda h: {**h, "mlm_loss": h["mlm_loss"][:1]}),
     "'mlm_loss' has 1 entries, 'step' has 2"),
    ("a NaN loss in the history", _history(lambda h: {**h, "lr": [0.01, float("nan")]}),
     "'lr' must be a list of finite numbers"),
    ("an unknown history field", _history(lambda h: {**h, "surprise": 1}),
     r"unknown fields \['surprise'\]"),
]


@pytest.fixture
def format1(tmp_path) -> Path:
    shutil.copytree(FORMAT1, tmp_path / "f1")
    return tmp_path / "f1" / "step-000002"


@pytest.mark.parametrize("what, damage, message", SCHEMA, ids=[r[0] for r in SCHEMA])
def test_every_field_is_validated(format1, what, damage, message):
    ckpt.read_checkpoint(format1, with_trainer=True)
    damage(format1)
    with pytest.raises(CheckpointError, match=message):
        ckpt.read_checkpoint(format1, with_trainer=True)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_at_save_and_at_load(tmp_path, format1, value):
    weights = init_params(CONFIG, 0)
    name = sorted(weights)[0]
    weights[name].flat[3] = value
    with pytest.raises(CheckpointError, match=f"NaN or infinite values in {name}$"):
        write(tmp_path / "c", weights=weights)
    assert not (tmp_path / "c").exists()
    # at load: a format-1 checkpoint (no digests) whose weights were made non-finite
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(format1 / "model.safetensors"))
    name = sorted(arrays)[1]
    arrays[name].flat[0] = value
    save_file(arrays, str(format1 / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"NaN or infinite weights in {name}"):
        ckpt.read_checkpoint(format1)


#: the sample corpus's lines when the format-1 fixture was written (articles were appended
#: since; resuming needs the same data, which a resume checks)
FORMAT1_SAMPLE_LINES = 953


def test_format1_checkpoints_load_and_resume(backend_name, format1, tmp_path):
    model = bertlite.load(format1, backend=backend_name)
    assert model.config.num_hiddens == 8 and len(model.vocab) == model.config.vocab_size
    assert model.encode("the game").shape[-1] == 8
    sample = Path(bertlite.__file__).parent / "data" / "sample" / "wiki.train.tokens"
    then = tmp_path / "sample-then"
    then.mkdir()
    lines = sample.read_text(encoding="utf-8").splitlines(keepends=True)
    (then / "wiki.train.tokens").write_text("".join(lines[:FORMAT1_SAMPLE_LINES]),
                                            encoding="utf-8")
    run = {**RUN, "corpus": str(then)}  # a folder: the book's settings, as the fixture had
    result = bertlite.train(backend_name, num_steps=3, checkpoint_dir=format1.parent,
                            resume=True, **run)
    assert result.history.step == [1, 2, 3]
    new = ckpt.read_checkpoint(format1.parent / "step-000003", with_trainer=True)
    assert new["meta"]["format"] == ckpt.FORMAT_VERSION and new["trainer_state"]["step"] == 3
    assert (format1 / "config.json").is_file()  # no run id: never pruned


# ----------------------------------------------------------- 5. shared folders, concurrency

HOLD = """
import sys, time
from bertlite import lock
lock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_and_a_dead_holders_lock_taken_over(backend_name, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=f"in use by process {holder.pid} on "):
            bertlite.train(backend_name, num_steps=2, checkpoint_dir=run, **RUN)
        assert not ckpt.list_checkpoints(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without cleaning up: its lock file stays, the kernel dropped the flock
    assert json.loads((run / lock.LOCK_FILE).read_text())["pid"] == holder.pid
    bertlite.train(backend_name, num_steps=2, checkpoint_dir=run, **RUN)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert not (run / lock.LOCK_FILE).exists()  # released when train() returned


def test_the_lock_is_released_when_training_fails(backend_name, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DataError):
        bertlite.train(backend_name, num_steps=2, checkpoint_dir=run,
                       **{**RUN, "corpus": str(tmp_path / "nowhere")})
    assert not (run / lock.LOCK_FILE).exists()
    with lock.locked(run):
        assert json.loads((run / lock.LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.fixture
def small_tmpfs(tmp_path):
    def mount(options: str) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    mounted: list[Path] = []
    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


BIG = CONFIG.replace(vocab_size=9, num_hiddens=256, ffn_num_hiddens=512, num_heads=2,
                     max_len=64)


def test_a_full_disk_is_one_line_and_keeps_earlier_checkpoints(small_tmpfs):
    disk = small_tmpfs("size=1m")
    write(disk / "step-000001")
    before = snapshot(disk)
    with pytest.raises(CheckpointError, match=r"no room to write checkpoint .*step-000002 "
                       r"\(checked before writing\): it needs about [\d.]+ MiB, [\d.]+ MiB "
                       r"free in "):
        write(disk / "step-000002", config=BIG)
    assert snapshot(disk) == before  # the earlier one whole, no temporary folder


def test_no_room_while_writing_is_one_line_too(small_tmpfs):
    # room for the bytes, but only 4 inodes (the root, the temporary folder, two files): the
    # file system says ENOSPC in the middle of the write
    disk = small_tmpfs("size=1m,nr_inodes=4")
    with pytest.raises(CheckpointError, match=r"no room to write checkpoint .*c \(No space "
                                              r"left on device\): it needs about"):
        write(disk / "c")
    assert list(disk.iterdir()) == []


FSIZE = """
import resource, sys
sys.path.insert(0, sys.argv[2])
from test_reliability_files import BIG, write
write(sys.argv[1] + "/c")
resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
write(sys.argv[1] + "/c", config=BIG)
"""


def test_a_file_size_limit_is_one_line_and_keeps_the_checkpoint(tmp_path):
    done = subprocess.run([sys.executable, "-c", FSIZE, str(tmp_path),
                           str(Path(__file__).parent)], capture_output=True, text=True)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("bertlite.errors.CheckpointError: no room to write checkpoint")
    assert "(File too large)" in last and "MiB free in" in last
    assert ckpt.read_checkpoint(tmp_path / "c")["config"] == CONFIG  # the first one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.fixture
def shared_dir():
    """A folder outside pytest's private tmp (0700), that another user can enter."""
    folder = Path(tempfile.mkdtemp(prefix="bertlite-shared-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run as a second user")
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import bertlite"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"the second user cannot run this Python: {probe.stderr.strip()[-200:]}")
    return subprocess.run([*NOBODY, sys.executable, "-c", code, *args], capture_output=True,
                          text=True, env={**os.environ, "HOME": "/tmp"})


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644),
                                                        (0o002, 0o775, 0o664),
                                                        (0o077, 0o700, 0o600)])
def test_checkpoint_and_cache_files_get_the_umasks_modes(shared_dir, umask, dir_mode,
                                                         file_mode):
    old = os.umask(umask)
    try:
        folder = write(shared_dir / "c", trainer_arrays={"m": np.ones(2, np.float32)},
                       trainer_state=TRAINER_STATE, training={"num_steps": 2})
        prepare_data(SAMPLE_DIR / "wiki.valid.tokens", 64, cache_dir=shared_dir / "cache")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == dir_mode
    files = [*folder.iterdir(), *(shared_dir / "cache").iterdir()]
    assert len(files) == 6 and {p.stat().st_mode & 0o777 for p in files} == {file_mode}
    readable = as_nobody("import sys; from bertlite.checkpoint import read_checkpoint; "
                         "read_checkpoint(sys.argv[1], with_trainer=True)", str(folder))
    if umask == 0o077:
        last = readable.stderr.strip().splitlines()[-1]
        assert last.startswith(f"bertlite.errors.CheckpointError: cannot read checkpoint "
                               f"{folder}: Permission denied ({folder}")
    else:
        assert readable.returncode == 0, readable.stderr


def _dangling(folder: Path) -> Path:
    (folder / "wiki.train.tokens").symlink_to(folder / "gone.tokens")
    return folder


def _split_is_folder(folder: Path) -> Path:
    (folder / "wiki.train.tokens").mkdir()
    return folder


def _dangling_data_folder(folder: Path) -> Path:
    (folder / "data").symlink_to(folder / "moved-away")
    return folder / "data"


def _data_folder_is_file(folder: Path) -> Path:
    (folder / "data").write_text("x")
    return folder / "data"


ODD_PATHS = [
    ("split a dangling link", _dangling, r"wiki.train.tokens is a symbolic link to "
                                         r"\S*gone.tokens, which does not exist"),
    ("split a folder", _split_is_folder, r"wiki.train.tokens is a folder, not a file"),
    ("data folder a dangling link", _dangling_data_folder,
     r"data folder \S+ is a symbolic link to \S+moved-away, which does not exist"),
    ("data folder a file", _data_folder_is_file, r"is a file, not a folder"),
]


@pytest.mark.parametrize("what, make, message", ODD_PATHS, ids=[r[0] for r in ODD_PATHS])
def test_odd_data_paths_are_named_as_such(backend_name, tmp_path, what, make, message):
    data_dir = make(tmp_path)
    (tmp_path / "wiki.valid.tokens").write_text("x")
    with pytest.raises(DataError, match=message):
        find_split_file(data_dir, "train")
    with pytest.raises(DataError, match=message):
        bertlite.train(backend_name, data_dir=data_dir, num_steps=1,
                       **{k: v for k, v in RUN.items() if k != "corpus"})


def test_an_unreadable_corpus_file_is_named(shared_dir):
    corpus = shared_dir / "wiki.train.tokens"
    shutil.copy(SAMPLE_DIR / "wiki.train.tokens", corpus)
    corpus.chmod(0o600)
    code = ("import sys\nfrom bertlite.errors import DataError\n"
            "from bertlite.data.{mod} import {fn}\n"
            "try:\n    {fn}(sys.argv[1]{extra})\n"
            "except DataError as err:\n    print(err)\n")
    for mod, fn, extra in (("corpus", "read_text", ""), ("cache", "file_digest", ""),
                           ("loader", "prepare_data", ", 64, cache_dir='/tmp/x-nobody'")):
        done = as_nobody(code.format(mod=mod, fn=fn, extra=extra), str(corpus))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"cannot read corpus file {corpus}: Permission denied"
    assert read_text(corpus)  # its owner reads it


def test_a_cache_entry_copied_under_another_key_is_rebuilt(tmp_path):
    corpus, cache_dir = SAMPLE_DIR / "wiki.valid.tokens", tmp_path / "cache"
    short, _ = prepare_data(corpus, 32, cache_dir=cache_dir)
    entry32 = next(cache_dir.iterdir())
    long, _ = prepare_data(corpus, 64, cache_dir=cache_dir)
    entry64 = next(p for p in cache_dir.iterdir() if p != entry32)
    assert short.tokens.shape[1] == 32 and long.tokens.shape[1] == 64
    shutil.copy(entry64, entry32)  # a valid entry of other settings, under max_len 32's key
    again, _ = prepare_data(corpus, 32, cache_dir=cache_dir)
    assert again.tokens.shape[1] == 32 and np.array_equal(again.tokens, short.tokens)
    assert data_cache.load_cached(entry32, None)[0].tokens.shape[1] == 32  # rewritten
