"""Framework-neutral checkpoints: a folder any backend can write and any backend can load.

    config.json          format version, bertlite version, backend, model config, training
    vocab.txt            one token a line
    tokenizer.json       the WordPiece tokenizer (Hugging Face format), when the vocabulary
                         is one (``tokenizer="wordpiece"``); absent for the book's words
    model.safetensors    weights under the canonical names of :mod:`bertlite.params`
    trainer.safetensors  optimizer moments (same names + ``.exp_avg``/``.exp_avg_sq``), step
    trainer.json         step, data cursor (pass, batch), optimizer settings, metrics so far;
                         dropout is seeded from (seed, step), so no RNG state is needed

A checkpoint is written into a temporary folder and renamed into place, so a process killed
while saving leaves the previous checkpoint whole. Training keeps the last K checkpoints as
``step-000100/`` folders of a checkpoint directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bertlite._version import __version__
from bertlite.config import BERTConfig
from bertlite.data.vocab import Vocab
from bertlite.errors import CheckpointError, DataError
from bertlite.io import fsync_dir
from bertlite.params import check_state_dict

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE, TRAINER_FILE, TRAINER_JSON, CONFIG_FILE, VOCAB_FILE = (
    "model.safetensors", "trainer.safetensors", "trainer.json", "config.json", "vocab.txt")
TOKENIZER_FILE = "tokenizer.json"


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    # asarray keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d)
    save_file({k: np.asarray(v, order="C") for k, v in arrays.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); the file "
                              "is truncated or not a safetensors file") from None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def write_checkpoint(path: str | os.PathLike, *, config: BERTConfig, vocab: Vocab,
                     weights: dict[str, np.ndarray], backend_name: str,
                     training: dict[str, Any] | None = None,
                     trainer_arrays: dict[str, np.ndarray] | None = None,
                     trainer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (an existing one at ``path`` is replaced whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_state_dict(weights, config, "the weights to save")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        _write_json(tmp / CONFIG_FILE, {
            "format": FORMAT_VERSION, "bertlite_version": __version__, "backend": backend_name,
            "model": config.to_dict(), "training": training or {}})
        (tmp / VOCAB_FILE).write_text("".join(t + "\n" for t in vocab.idx_to_token),
                                      encoding="utf-8")
        if vocab.tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_text(vocab.tokenizer.to_str(), encoding="utf-8")
        _save_arrays(tmp / MODEL_FILE, weights)
        if trainer_arrays is not None:
            _save_arrays(tmp / TRAINER_FILE, trainer_arrays)
            _write_json(tmp / TRAINER_JSON, trainer_state or {})
        fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint, checked for its format version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    meta = _read_json(path / CONFIG_FILE)
    fmt = meta.get("format")
    if not isinstance(fmt, int):
        raise CheckpointError(f"{path / CONFIG_FILE} has no format version; not a bertlite "
                              "checkpoint")
    if fmt > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {fmt}, newer than this bertlite "
                              f"({__version__}) reads ({FORMAT_VERSION}); upgrade bertlite")
    return meta


def read_checkpoint(path: str | os.PathLike, *, with_trainer: bool = False
                    ) -> dict[str, Any]:
    """Config, vocab, weights (and trainer state) of a checkpoint folder, all checked."""
    path = resolve_checkpoint(path)
    meta = read_config(path)
    try:
        config = BERTConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path / CONFIG_FILE} has an invalid model config: {err}") from None
    try:
        vocab = Vocab.load(path / VOCAB_FILE)
    except Exception as err:
        raise CheckpointError(f"{path / VOCAB_FILE}: {err}") from None
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
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{path / VOCAB_FILE} has {len(vocab)} tokens but the config says "
                              f"vocab_size {config.vocab_size}")
    weights = _load_arrays(path / MODEL_FILE)
    try:
        check_state_dict(weights, config, str(path / MODEL_FILE))
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    result = {"path": path, "meta": meta, "config": config, "vocab": vocab, "weights": weights}
    if with_trainer:
        result["trainer_arrays"] = _load_arrays(path / TRAINER_FILE)
        result["trainer_state"] = _read_json(path / TRAINER_JSON)
    return result


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete ``step-N`` checkpoints of a directory, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / CONFIG_FILE).is_file():
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


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Remove all but the newest ``keep`` step folders, and temporary folders that a killed
    process left half-written (only one process writes a checkpoint directory)."""
    for step, folder in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        # renamed first, so that a kill during the removal leaves no step folder half-gone
        doomed = folder.with_name(f".step-{step:06d}.tmp-removing")
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for leftover in Path(directory).glob(".step-*.tmp-*"):
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
