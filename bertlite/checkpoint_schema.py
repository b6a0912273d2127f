"""What a checkpoint's JSON files and vocabulary must hold, checked field by field, so that a
damaged or hand-edited checkpoint fails at load with a message naming the field, not later with
a KeyError or AttributeError deep in training."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bertlite.errors import CheckpointError

#: tokens the model's code looks up by name; a vocabulary without one cannot train or evaluate
REQUIRED_TOKENS = ("<unk>", "<pad>", "<mask>", "<cls>", "<sep>")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {_kind(value)}; the "
                              "checkpoint is damaged")
    return value


def _field(data: dict[str, Any], key: str, where: str, check: Any, expected: str,
           required: bool = True) -> Any:
    if key not in data:
        if required:
            raise CheckpointError(f"{where} has no {key!r}; the checkpoint is damaged")
        return None
    value = data[key]
    if not check(value):
        raise CheckpointError(f"{where}: {key!r} must be {expected}, got {value!r}; the "
                              "checkpoint is damaged")
    return value


def _non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def check_config_json(meta: Any, path: Path) -> dict[str, Any]:
    """``config.json``: an object with an integer format, the backend, a valid model config and
    an object of training settings."""
    from bertlite.config import BERTConfig

    where = str(path)
    meta = _object(meta, where)
    _field(meta, "format", where, _positive_int, "a positive integer")
    _field(meta, "backend", where, lambda v: isinstance(v, str), "a string", required=False)
    _field(meta, "bertlite_version", where, lambda v: isinstance(v, str), "a string",
           required=False)
    model = _object(_field(meta, "model", where, lambda v: True, ""), f"{where}: 'model'")
    try:
        BERTConfig.from_dict(model)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where} has an invalid model config: {err}") from None
    if "tokenizer" in meta:
        check_tokenizer_record(meta["tokenizer"], f"{where}: 'tokenizer'")
    training = _object(meta.get("training", {}), f"{where}: 'training'")
    tw = f"{where}: 'training'"
    for key in ("batch_size", "max_len", "num_steps", "accumulate"):
        _field(training, key, tw, _positive_int, "a positive integer", required=False)
    _field(training, "seed", tw, _non_negative_int, "a non-negative integer", required=False)
    for key in ("corpus", "split", "masking", "tokenizer", "precision", "corpus_digest", "run"):
        _field(training, key, tw, lambda v: isinstance(v, str), "a string", required=False)
    _field(training, "whole_word_mask", tw, lambda v: isinstance(v, bool), "true or false",
           required=False)
    _field(training, "optimizer", tw, lambda v: isinstance(v, dict), "an object",
           required=False)
    return meta


#: the kinds of tokenizer whose normalisation a checkpoint records
TOKENIZER_RECORD_KINDS = ("wordpiece",)


def check_tokenizer_record(record: Any, where: str) -> dict[str, Any]:
    """``config.json``'s ``tokenizer``: the WordPiece tokenizer's kind and normalisation
    (``lowercase``: bertlite's own and uncased BERTs'; false for a cased BERT's, whose corpus
    is read as it is; ``strip_accents``), which ``tokenizer.json`` must agree with, and for an
    imported one the names of its special tokens (``special_names``, written back on
    export)."""
    record = _object(record, where)
    _field(record, "kind", where, lambda v: v in TOKENIZER_RECORD_KINDS,
           f"one of {list(TOKENIZER_RECORD_KINDS)}")
    for key in ("lowercase", "strip_accents"):
        _field(record, key, where, lambda v: isinstance(v, bool), "true or false")
    _field(record, "special_names", where, lambda v: isinstance(v, dict) and set(v) <=
           set(REQUIRED_TOKENS) and all(isinstance(n, str) and n for n in v.values()),
           f"an object from some of {list(REQUIRED_TOKENS)} to the names an imported "
           "tokenizer gave them", required=False)
    unknown = set(record) - {"kind", "lowercase", "strip_accents", "special_names"}
    if unknown:
        raise CheckpointError(f"{where} has unknown fields {sorted(unknown)}; the checkpoint is "
                              "damaged or from a newer bertlite")
    return record


def tokenizer_record(tokenizer: Any) -> dict[str, Any]:
    """What ``config.json`` records of a WordPiece tokenizer (see
    :func:`check_tokenizer_record`)."""
    names = {"special_names": dict(tokenizer.special_names)} if tokenizer.special_names else {}
    return {"kind": tokenizer.kind, **tokenizer.normalization, **names}


def check_tokenizer_agrees(record: dict[str, Any] | None, tokenizer: Any, where: str) -> None:
    """The normalisation ``config.json`` records is the one ``tokenizer.json`` applies (no
    record: a checkpoint written before bertlite recorded it, read as its tokenizer.json); the
    tokenizer takes the recorded special-token names."""
    if record is None:
        return
    if tokenizer is None:
        raise CheckpointError(f"{where}: config.json records a {record['kind']} tokenizer but "
                              "there is no tokenizer.json; the checkpoint is incomplete")
    recorded = {k: record[k] for k in ("lowercase", "strip_accents")}
    if recorded != tokenizer.normalization:
        raise CheckpointError(f"{where}: config.json records the tokenizer normalisation "
                              f"{recorded}, but tokenizer.json applies "
                              f"{tokenizer.normalization}; the checkpoint was edited or damaged")
    tokenizer.special_names = dict(record.get("special_names", {}))


def _history_fields() -> set[str]:
    from bertlite.trainer import History

    return {f.name for f in dataclasses.fields(History)}


def check_trainer_json(state: Any, path: Path, num_steps: int | None = None
                       ) -> dict[str, Any]:
    """``trainer.json``: the step (within ``num_steps``, the run's length), the data cursor, the
    optimizer settings and a history whose lists agree in length."""
    where = str(path)
    state = _object(state, where)
    step = _field(state, "step", where, _non_negative_int, "a non-negative integer")
    _field(state, "epoch", where, _non_negative_int, "a non-negative integer")
    _field(state, "batch_index", where, _non_negative_int, "a non-negative integer")
    _object(_field(state, "optimizer", where, lambda v: True, "", required=False) or {},
            f"{where}: 'optimizer'")
    if num_steps is not None and step > num_steps:
        raise CheckpointError(f"{where}: step {step} is beyond the run's num_steps "
                              f"{num_steps} (config.json); the checkpoint is damaged")
    hw = f"{where}: 'history'"
    history = _object(_field(state, "history", where, lambda v: True, ""), hw)
    unknown = set(history) - _history_fields()
    if unknown:
        raise CheckpointError(f"{hw} has unknown fields {sorted(unknown)}; the checkpoint is "
                              "damaged or from a newer bertlite")
    steps = _field(history, "step", hw, lambda v: isinstance(v, list)
                   and all(_positive_int(s) and s <= step for s in v),
                   f"a list of steps from 1 to {step}")
    for key in ("mlm_loss", "nsp_loss", "lr"):
        values = _field(history, key, hw, lambda v: isinstance(v, list)
                        and all(_is_number(x) for x in v), "a list of finite numbers")
        if len(values) != len(steps):
            raise CheckpointError(f"{hw}: {key!r} has {len(values)} entries, 'step' has "
                                  f"{len(steps)}; the checkpoint is damaged")
    _field(history, "pairs", hw, _non_negative_int, "a non-negative integer", required=False)
    _field(history, "step_time", hw, lambda v: _is_number(v) and v >= 0,
           "a non-negative number", required=False)
    _field(history, "eval", hw, lambda v: isinstance(v, list)
           and all(isinstance(e, dict) for e in v), "a list of objects", required=False)
    _field(history, "skipped", hw, lambda v: isinstance(v, list)
           and all(_positive_int(s) and s <= step for s in v),
           f"a list of steps from 1 to {step}", required=False)
    return state


def check_vocab_tokens(tokens: list[str], path: Path) -> None:
    """The vocabulary holds every token the model looks up by name."""
    missing = [t for t in REQUIRED_TOKENS if t not in set(tokens)]
    if missing:
        raise CheckpointError(f"{path} lacks the reserved token(s) {' '.join(missing)}; a "
                              f"bertlite vocabulary holds {' '.join(REQUIRED_TOKENS)}")


def sha256(data: bytes | np.ndarray) -> str:
    """The hex SHA-256 of bytes, or of an array's bytes in C order (without copying them)."""
    if isinstance(data, np.ndarray):
        data = memoryview(np.ascontiguousarray(data)).cast("B")
    return hashlib.sha256(data).hexdigest()


def config_difference(saved: Any, now: Any, where: str = "") -> str | None:
    """The first field (dotted path) where two JSON values differ, with both values."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in [*saved, *(k for k in now if k not in saved)]:
            found = config_difference(saved.get(key), now.get(key), f"{where}{key}.")
            if found:
                return found
        return None
    if saved != now:
        return f"{where.rstrip('.')}: config.json says {now!r}, the weights were written " \
               f"for {saved!r}"
    return None


def verify_digests(path: Path, name: str, arrays: dict[str, np.ndarray],
                   metadata: dict[str, str], fmt: int) -> dict[str, str]:
    """Check each array against the SHA-256 in its file's header (format 2 on); the digests
    the header records for other files."""
    if fmt < 2:
        return {}
    try:
        tensors = json.loads(metadata["bertlite.tensors"])
        files = json.loads(metadata["bertlite.files"])
    except (KeyError, ValueError):
        raise CheckpointError(f"{path / name} has no bertlite digests in its header, but "
                              f"config.json says format {fmt}; the checkpoint is damaged"
                              ) from None
    if set(tensors) != set(arrays):
        odd = sorted(set(tensors) ^ set(arrays))
        raise CheckpointError(f"{path / name}: tensors {', '.join(odd[:5])} differ from those "
                              "its header recorded; the checkpoint is damaged")
    bad = [k for k, v in arrays.items() if sha256(v) != tensors[k]]
    if bad:
        raise CheckpointError(f"{path / name}: tensor {', '.join(bad[:5])} does not match its "
                              "SHA-256 (flipped or edited bytes); the checkpoint is damaged")
    return files


def check_file_digests(path: Path, files: dict[str, str], names: tuple[str, ...]) -> None:
    """Each of ``names`` in ``path`` matches the digest the weights' header recorded for it; a
    file the header does not list must not be there."""
    for name in names:
        file = path / name
        if name not in files:
            if file.exists():
                raise CheckpointError(f"{file} was not written with the weights (their header "
                                      "has no digest of it); remove it or use the original")
            continue
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
        if sha256(file.read_bytes()) != files[name]:
            raise CheckpointError(f"{file} does not match the SHA-256 recorded with the "
                                  "weights: it was edited or damaged after saving")
