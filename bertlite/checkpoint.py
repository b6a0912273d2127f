"""Framework-neutral checkpoints: a folder any backend can write and any backend can load.

    config.json          format version, bertlite version, backend, model config, training,
                         the WordPiece tokenizer's normalisation (lowercase, strip_accents)
    vocab.txt            one token a line
    tokenizer.json       the WordPiece tokenizer (Hugging Face format), when the vocabulary
                         is one (``tokenizer="wordpiece"``); absent for the book's words
    model.safetensors    weights under the canonical names of :mod:`bertlite.params`
    trainer.safetensors  optimizer moments (same names + ``.exp_avg``/``.exp_avg_sq``), step
    trainer.json         step, data cursor (pass, batch), optimizer settings, metrics so far;
                         dropout is seeded from (seed, step), so no RNG state is needed

A checkpoint is written into a temporary folder and renamed into place, so a process killed
while saving leaves the previous checkpoint whole; it replaces only a folder that is itself a
checkpoint (or empty), never files bertlite did not write. Format 2 records in the safetensors
headers the SHA-256 of every tensor, of the vocabulary, tokenizer and trainer state, and the
config the weights were written with; loading checks them all. Training keeps the last K
checkpoints of its run (an id in ``config.json``, kept by resume) as ``step-000100/`` folders
of a checkpoint directory.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bertlite._version import __version__
from bertlite.checkpoint_schema import (
    check_config_json,
    check_file_digests,
    check_tokenizer_agrees,
    check_trainer_json,
    check_vocab_tokens,
    config_difference,
    sha256,
    tokenizer_record,
    verify_digests,
)
from bertlite.config import BERTConfig
from bertlite.data.vocab import Vocab
from bertlite.errors import CheckpointError, DataError
from bertlite.io import current_umask, fsync_dir, make_temp_dir
from bertlite.params import check_state_dict

FORMAT_VERSION = 2
STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE, TRAINER_FILE, TRAINER_JSON, CONFIG_FILE, VOCAB_FILE = (
    "model.safetensors", "trainer.safetensors", "trainer.json", "config.json", "vocab.txt")
TOKENIZER_FILE = "tokenizer.json"
#: everything a checkpoint folder may hold; a folder with anything else is not replaced
CHECKPOINT_FILES = frozenset({MODEL_FILE, TRAINER_FILE, TRAINER_JSON, CONFIG_FILE, VOCAB_FILE,
                              TOKENIZER_FILE})
#: errors of a write that ran out of room: disk full, quota, file-size limit
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _save_arrays(path: Path, arrays: dict[str, np.ndarray], files: dict[str, str],
                 config: dict[str, Any] | None = None) -> None:
    """Arrays as safetensors, the header recording each one's SHA-256, those of ``files``
    and the ``config.json`` the arrays were written with."""
    from safetensors.numpy import save_file

    # asarray keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d)
    arrays = {k: np.asarray(v, order="C") for k, v in arrays.items()}
    metadata = {"bertlite.format": str(FORMAT_VERSION),
                "bertlite.tensors": json.dumps({k: sha256(v) for k, v in arrays.items()}),
                "bertlite.files": json.dumps(files)}
    if config is not None:
        metadata["bertlite.config"] = json.dumps(config)
    save_file(arrays, str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fchmod(f.fileno(), 0o666 & ~current_umask())  # safetensors makes it 0600
        os.fsync(f.fileno())


def _load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays of a safetensors file and its header's metadata."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); the file "
                              "is truncated or not a safetensors file") from None


def _json_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def _non_finite(arrays: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in arrays.items()
            if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]


def _is_checkpoint(folder: Path) -> bool:
    """Whether ``config.json`` says the folder is a bertlite checkpoint."""
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("format"), int) and "model" in meta


def _foreign_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in CHECKPOINT_FILES or p.is_symlink() or not p.is_file())


def check_target(path: str | os.PathLike) -> Path:
    """``path`` if a checkpoint may be written there: absent, an empty folder, or a bertlite
    checkpoint holding nothing but checkpoint files; anything else is a CheckpointError and is
    left untouched (bertlite never deletes what it did not write)."""
    path = Path(path)
    fix = "choose another path, or move it away yourself"
    if path.is_symlink():
        raise CheckpointError(f"{path} is a symbolic link; bertlite does not replace it: {fix}")
    if not path.exists():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder; bertlite does not "
                              f"replace it: {fix}")
    if not any(path.iterdir()):
        return path
    if not _is_checkpoint(path):
        shown = sorted(p.name for p in path.iterdir())
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        raise CheckpointError(f"{path} is a folder that is not a bertlite checkpoint (it holds "
                              f"{', '.join(shown[:5])}{more}); bertlite does not replace it: "
                              f"{fix}")
    foreign = _foreign_entries(path)
    if foreign:
        raise CheckpointError(f"{path} is a checkpoint that also holds {', '.join(foreign)}, "
                              f"which bertlite did not write; it is not replaced: {fix}")
    return path


def check_save_path(save: str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None
                    ) -> None:
    """Before training: ``save`` can be written, and is neither the checkpoint directory, nor
    inside it, nor holding it (saving there would replace or mix with the run's checkpoints)."""
    target = Path(save).resolve()
    if checkpoint_dir is not None:
        directory = Path(checkpoint_dir).resolve()
        if target == directory or directory in target.parents or target in directory.parents:
            relation = ("is" if target == directory else
                        "is inside" if directory in target.parents else "holds")
            raise CheckpointError(f"the save path {save} {relation} the checkpoint directory "
                                  f"{checkpoint_dir}; save the final model elsewhere (the last "
                                  f"checkpoint is already in {checkpoint_dir})")
    check_target(save)


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _no_room(path: Path, needed: int, reason: str) -> CheckpointError:
    try:
        free = _mb(shutil.disk_usage(path.parent).free)
    except OSError:
        free = "unknown"
    return CheckpointError(f"no room to write checkpoint {path} ({reason}): it needs about "
                           f"{_mb(needed)}, {free} free in {path.parent}; free some space or "
                           "choose another folder")


def _room_errno(err: Exception) -> int | None:
    """The errno of a write that ran out of room (an OSError, or one safetensors wraps)."""
    if isinstance(err, OSError):
        return err.errno if err.errno in NO_ROOM else None
    found = re.search(r"os error (\d+)", str(err))
    code = int(found.group(1)) if found else None
    return code if code in NO_ROOM else None


def write_checkpoint(path: str | os.PathLike, *, config: BERTConfig, vocab: Vocab,
                     weights: dict[str, np.ndarray], backend_name: str,
                     training: dict[str, Any] | None = None,
                     trainer_arrays: dict[str, np.ndarray] | None = None,
                     trainer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically. An existing checkpoint (or empty folder) at
    ``path`` is replaced whole; anything else there is a CheckpointError, untouched. Weights
    that are NaN or infinite are refused, and a write that runs out of room says so in one
    line, leaving earlier checkpoints whole and no temporary folder."""
    path = Path(path)
    check_state_dict(weights, config, "the weights to save")
    for arrays, what in ((weights, "weights"), (trainer_arrays or {}, "optimizer state")):
        bad = _non_finite(arrays)
        if bad:
            raise CheckpointError(f"not saving {path}: the {what} hold NaN or infinite values "
                                  f"in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create the folder of {path}: {err.strerror or err}"
                              ) from None
    meta = {"format": FORMAT_VERSION, "bertlite_version": __version__, "backend": backend_name,
            "model": config.to_dict(), "training": training or {}}
    if vocab.tokenizer is not None:  # its normalisation (cased or not), checked at load
        meta["tokenizer"] = tokenizer_record(vocab.tokenizer)
    texts = {CONFIG_FILE: _json_text(meta),
             VOCAB_FILE: "".join(t + "\n" for t in vocab.idx_to_token)}
    if vocab.tokenizer is not None:
        texts[TOKENIZER_FILE] = vocab.tokenizer.to_str()
    trainer_text = _json_text(trainer_state or {}) if trainer_arrays is not None else None
    needed = (sum(np.asarray(a).nbytes for a in [*weights.values(),
                                                 *(trainer_arrays or {}).values()])
              + sum(len(t.encode()) for t in [*texts.values(), trainer_text or ""]) + 65536)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < needed:
        raise _no_room(path, needed, "checked before writing")
    files = {name: sha256(text.encode()) for name, text in texts.items()
             if name != CONFIG_FILE}
    tmp = make_temp_dir(path.parent, f".{path.name}.tmp-")
    try:
        for name, text in texts.items():
            _write_text(tmp / name, text)
        _save_arrays(tmp / MODEL_FILE, weights, files, meta)
        if trainer_arrays is not None:
            _write_text(tmp / TRAINER_JSON, trainer_text)
            _save_arrays(tmp / TRAINER_FILE, trainer_arrays,
                         {TRAINER_JSON: sha256(trainer_text.encode())})
        fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as err:
        code = _room_errno(err)
        if code is None:
            raise
        raise _no_room(path, needed, os.strerror(code)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint, checked for its format version and every field."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    meta = _read_json(path / CONFIG_FILE)
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {fmt}, newer than this bertlite "
                              f"({__version__}) reads ({FORMAT_VERSION}); upgrade bertlite")
    if isinstance(meta, dict) and not isinstance(fmt, int):
        raise CheckpointError(f"{path / CONFIG_FILE} has no format version; not a bertlite "
                              "checkpoint")
    return check_config_json(meta, path / CONFIG_FILE)


def read_checkpoint(path: str | os.PathLike, *, with_trainer: bool = False
                    ) -> dict[str, Any]:
    """Config, vocab, weights (and trainer state) of a checkpoint folder, all checked: the
    fields, the reserved tokens, the digests (format 2 on) and that the weights are finite."""
    try:
        return _read_checkpoint(path, with_trainer)
    except OSError as err:  # say, a teammate's checkpoint that the umask made private
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}"
                              f"{f' ({err.filename})' if err.filename else ''}") from None


def _read_checkpoint(path: str | os.PathLike, with_trainer: bool) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    meta = read_config(path)
    config = BERTConfig.from_dict(meta["model"])
    weights, metadata = _load_arrays(path / MODEL_FILE)
    files = verify_digests(path, MODEL_FILE, weights, metadata, meta["format"])
    if meta["format"] >= 2:
        try:
            saved = json.loads(metadata["bertlite.config"])
        except (KeyError, ValueError):
            saved = None
        found = config_difference(saved, meta) if saved is not None else \
            f"{MODEL_FILE} has no record of its config"
        if found:
            raise CheckpointError(f"{path}: {found}; the checkpoint was edited or damaged")
        check_file_digests(path, files, (VOCAB_FILE, TOKENIZER_FILE))
    try:
        vocab = Vocab.load(path / VOCAB_FILE)
    except Exception as err:
        raise CheckpointError(f"{path / VOCAB_FILE}: {err}") from None
    check_vocab_tokens(vocab.idx_to_token, path / VOCAB_FILE)
    if (path / TOKENIZER_FILE).is_file():
        from bertlite.data.tokenizer import WordPieceTokenizer

        try:
            tokenized = WordPieceTokenizer.load(path / TOKENIZER_FILE).to_vocab()
        except DataError as err:
            raise CheckpointError(str(err)) from None
        if tokenized != vocab:
            raise CheckpointError(f"{path / TOKENIZER_FILE} does not match {path / VOCAB_FILE} "
                                  "(other tokens or another order); the checkpoint is damaged")
        vocab = tokenized
    check_tokenizer_agrees(meta.get("tokenizer"), vocab.tokenizer, str(path))
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{path / VOCAB_FILE} has {len(vocab)} tokens but the config says "
                              f"vocab_size {config.vocab_size}")
    try:
        check_state_dict(weights, config, str(path / MODEL_FILE))
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    bad = _non_finite(weights)
    if bad:
        raise CheckpointError(f"{path / MODEL_FILE} holds NaN or infinite weights in "
                              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; use an "
                              "earlier checkpoint")
    result = {"path": path, "meta": meta, "config": config, "vocab": vocab, "weights": weights}
    if with_trainer:
        arrays, metadata = _load_arrays(path / TRAINER_FILE)
        files = verify_digests(path, TRAINER_FILE, arrays, metadata, meta["format"])
        if meta["format"] >= 2:
            check_file_digests(path, files, (TRAINER_JSON,))
        state = check_trainer_json(_read_json(path / TRAINER_JSON), path / TRAINER_JSON,
                                   meta.get("training", {}).get("num_steps"))
        result["trainer_arrays"], result["trainer_state"] = arrays, state
    return result


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete ``step-N`` checkpoints of a directory, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = STEP_DIR.match(child.name)
        if match and not child.is_symlink() and (child / CONFIG_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or the latest ``step-N`` folder of a checkpoint directory."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1][1]
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raise CheckpointError(f"{path} holds no checkpoint ({CONFIG_FILE} is missing)")


def new_run_id() -> str:
    """An id for a new training run; its checkpoints record it, and resuming keeps it."""
    return uuid.uuid4().hex[:16]


def run_id(folder: str | os.PathLike) -> str | None:
    """The run id a checkpoint folder records (None: none, or not a checkpoint)."""
    try:
        meta = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
        run = meta["training"]["run"]
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None
    return run if isinstance(run, str) else None


def latest_run_id(directory: str | os.PathLike) -> str | None:
    """The run id of the newest checkpoint of a checkpoint directory."""
    found = list_checkpoints(directory)
    return run_id(found[-1][1]) if found else None


def prune_checkpoints(directory: str | os.PathLike, keep: int, run: str | None = None) -> None:
    """Keep the newest ``keep`` checkpoints of run ``run`` (default: the run of the newest
    checkpoint); remove its older ones, and temporary folders a killed write of bertlite left.
    Checkpoints of other runs, without a run id, or holding files bertlite did not write are
    never touched (a lock on the directory keeps other runs of bertlite out)."""
    directory = Path(directory)
    run = run or latest_run_id(directory)
    family = [(step, folder) for step, folder in list_checkpoints(directory)
              if run is not None and run_id(folder) == run and not _foreign_entries(folder)]
    for step, folder in family[:-keep] if keep > 0 else []:
        # renamed first, so that a kill during the removal leaves no step folder half-gone
        doomed = folder.with_name(f".step-{step:06d}.tmp-removing")
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for leftover in directory.glob(".step-*.tmp-*"):
        if leftover.is_dir() and not leftover.is_symlink() and not _foreign_entries(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def save(model: Any, path: str | os.PathLike, **training: Any) -> Path:
    """Save a trained model (what :func:`bertlite.train` or :func:`bertlite.load` returns) as a
    checkpoint folder that either backend can load."""
    if model.vocab is None:
        raise CheckpointError("this model has no vocabulary (imported without one): pass "
                              "vocab= to from_d2l, or set model.vocab, before saving")
    return write_checkpoint(path, config=model.config, vocab=model.vocab,
                            weights=model.state_dict(), backend_name=model.backend.name,
                            training={**model.metadata.get("training", {}), **training})


def load(path: str | os.PathLike, backend: str | None = None, *, devices: Any = None):
    """A checkpoint (folder, or the latest of a checkpoint directory) as a model of ``backend``
    (default: the backend it was trained with)."""
    from bertlite.model import Pretrained
    from bertlite.registry import get_backend

    ckpt = read_checkpoint(path)
    be = get_backend(backend or ckpt["meta"].get("backend"))
    devs = be.parse_devices(devices)
    net = be.build_model(ckpt["config"], devs)
    be.load_state_dict(net, ckpt["weights"])
    return Pretrained(net, be, ckpt["vocab"], ckpt["config"], devs,
                      metadata={"checkpoint": str(ckpt["path"]),
                                "training": ckpt["meta"].get("training", {}),
                                "trained_with": ckpt["meta"].get("backend")})
