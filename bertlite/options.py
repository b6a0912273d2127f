"""Every argument of :func:`bertlite.train` checked before any work: type and range, and the
outputs written after training (plot, ``save``) checked for format and writability, so that a
run never trains for an hour and then fails on an argument. Used by the API and the CLI alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bertlite.backend import PRECISIONS
from bertlite.data.loader import MASKING_MODES
from bertlite.errors import DataError
from bertlite.optim import OPTIMIZERS, SCHEDULES

#: settings that change a run's meaning: a resume with other values is refused unless each
#: is named in ``override_resume`` (the data settings can never change: the data cursor and
#: the masks depend on them)
OVERRIDABLE = ("lr", "optimizer", "betas", "eps", "weight_decay", "clip_norm", "schedule",
               "warmup_steps", "num_steps", "precision")
MAX_SEED = 2**63 - 1
#: what ``on_nan=`` accepts: stop with an error, or skip the step's update
ON_NAN = ("stop", "skip")


class OptionError(DataError, TypeError):
    """An argument of the wrong type or out of range; the message names it and the fix (a
    DataError, as these were before, and a TypeError)."""


def _fail(name: str, value: Any, wanted: str) -> OptionError:
    return OptionError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    """``value`` is an int >= 1 (or None when ``optional``)."""
    if optional and value is None:
        return
    if not _is_int(value) or value <= 0:
        raise _fail(name, value, "a positive integer" + (" or None" if optional else ""))


def nonnegative_int(name: str, value: Any, *, upper: int | None = None) -> None:
    if not _is_int(value) or value < 0 or (upper is not None and value > upper):
        raise _fail(name, value, "an integer >= 0" + (f" and <= {upper}" if upper else ""))


def number(name: str, value: Any, *, positive: bool = False, optional: bool = False) -> None:
    """``value`` is a finite int or float (> 0 when ``positive``, >= 0 otherwise)."""
    if optional and value is None:
        return
    ok = _is_number(value) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        wanted = "a positive number" if positive else "a number >= 0"
        raise _fail(name, value, wanted + (" or None" if optional else ""))


def choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise OptionError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(name, value, "True or False")


def path_like(name: str, value: Any, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise _fail(name, value, "a path (str or os.PathLike)" + (" or None" if optional else ""))


def _writable_target(name: str, path: Path, what: str) -> None:
    """``path`` can be created: no file on its way, the nearest existing folder writable."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink() or parent == parent.parent:  # a dangling link, or no root
            raise OptionError(f"{name}: the folder {parent} of {path} cannot be created")
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(f"{name}: {parent} is a file, so {what} {path} cannot be written "
                          "there; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"{name}: the folder {parent} is not writable, so {what} {path} "
                          "cannot be written; choose another path")


def plot_formats() -> tuple[str, ...]:
    """The file extensions matplotlib can write."""
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(sorted(FigureCanvasBase.get_supported_filetypes()))


def check_plot(plot: Any) -> None:
    """A plot path has an extension matplotlib writes and a place it can be written."""
    path_like("plot", plot)
    if plot is None:
        return
    try:
        _check_plot(plot)
    except OSError as err:  # a name too long, a loop of links, ...
        raise OptionError(f"plot {str(plot)!r} cannot be written: {err.strerror or err}; "
                          "choose another path") from None


def _check_plot(plot: str | os.PathLike) -> None:
    path = Path(plot)
    if path.is_dir():
        raise OptionError(f"plot {str(plot)!r} is a folder; give a file name such as "
                          f"{path / 'loss.png'}")
    suffix = path.suffix[1:].lower()
    formats = plot_formats()
    if suffix not in formats:
        raise OptionError(f"plot {str(plot)!r}: matplotlib cannot write {suffix or 'a file'} "
                          f"{'files' if suffix else 'without an extension'}; end the name in "
                          f"one of .{', .'.join(formats)} (e.g. loss.png)")
    _writable_target("plot", path, "the plot")


def check_save(save: Any, checkpoint_dir: Any = None) -> None:
    """``save`` can hold a checkpoint folder (see :func:`bertlite.checkpoint.check_save_path`:
    not a file or a folder of other files, not the checkpoint directory, inside it or holding
    it) and its folder is writable."""
    path_like("save", save)
    if save is None:
        return
    from bertlite.checkpoint import check_save_path

    try:
        check_save_path(save, checkpoint_dir)
        _writable_target("save", Path(save) / "config.json", "the model")
    except OSError as err:  # a name too long, a loop of links, ...
        raise OptionError(f"save {str(save)!r} cannot be written: {err.strerror or err}; "
                          "choose another path") from None


def check_overrides(override_resume: Any) -> frozenset[str]:
    """The names in ``override_resume`` (an iterable of setting names, or a mapping whose keys
    are the names), each one of :data:`OVERRIDABLE`."""
    if override_resume is None:
        return frozenset()
    if isinstance(override_resume, str):
        override_resume = [n for n in override_resume.split(",") if n.strip()]
    if isinstance(override_resume, Mapping):
        override_resume = list(override_resume)
    if not isinstance(override_resume, Iterable):
        raise _fail("override_resume", override_resume, f"names among {OVERRIDABLE}")
    names = []
    for name in override_resume:
        name = name.strip() if isinstance(name, str) else name
        if name not in OVERRIDABLE:
            raise OptionError(f"override_resume: {name!r} cannot be overridden; the settings "
                              f"that can: {', '.join(OVERRIDABLE)}")
        names.append(name)
    return frozenset(names)


def check_step_options(*, accumulate: Any = 1, precision: Any = "float32",
                       on_nan: Any = "stop") -> None:
    """The options of every training step (:meth:`bertlite.backend.Backend.train_step`), in
    the one place that checks them: :func:`bertlite.train`, :func:`bertlite.trainer.train_bert`
    and :meth:`bertlite.backend.Backend.check_train_options` call it; the backends check only
    what they alone know (a precision the device cannot run)."""
    positive_int("accumulate", accumulate)
    choice("precision", precision, PRECISIONS)
    choice("on_nan", on_nan, ON_NAN)


def check_train_arguments(args: Mapping[str, Any]) -> None:
    """Check every argument of :func:`bertlite.train` (by name) before any data is read."""
    for name in ("num_steps", "batch_size", "max_len", "wordpiece_vocab_size"):
        positive_int(name, args[name])
    for name in ("checkpoint_every", "eval_every", "eval_batches"):
        positive_int(name, args[name], optional=True)
    nonnegative_int("warmup_steps", args["warmup_steps"])
    nonnegative_int("keep_checkpoints (0 keeps all)", args["keep_checkpoints"])
    if args["seed"] is not None:
        nonnegative_int("seed", args["seed"], upper=MAX_SEED)
    number("lr", args["lr"], positive=True)
    number("weight_decay", args["weight_decay"])
    number("clip_norm", args["clip_norm"], positive=True, optional=True)
    number("max_time", args["max_time"], positive=True, optional=True)
    if args["dropout"] is not None and not (_is_number(args["dropout"])
                                            and 0 <= args["dropout"] < 1):
        raise OptionError("dropout must be a probability in [0, 1) (0 turns dropout off), "
                          f"got {args['dropout']!r}")
    choice("optimizer", args["optimizer"], OPTIMIZERS)
    choice("schedule", args["schedule"], SCHEDULES)
    choice("masking", args["masking"], MASKING_MODES)
    check_step_options(accumulate=args["accumulate"], precision=args["precision"],
                       on_nan=args["on_nan"])
    for name in ("progress", "verbose", "resume", "whole_word_mask"):
        flag(name, args[name])
    path_like("corpus", args["corpus"], optional=False)
    for name in ("data_dir", "checkpoint_dir", "data", "eval_data"):
        path_like(name, args[name])
    if args["format"] is not None and not isinstance(args["format"], str):
        raise _fail("format", args["format"], "a format name (str) or None")
    if args["eval_data"] is not None and args["data"] is None:
        raise OptionError("eval_data needs data= (a prepared folder or a corpus to prepare)")
    if args["eval_every"] is not None and args["data"] is not None \
            and args["eval_data"] is None:
        raise OptionError("eval_every with data= needs eval_data= (a held-out prepared "
                          "folder or corpus)")
    for name in ("split", "eval_split"):
        if not isinstance(args[name], str) or not args[name]:
            raise _fail(name, args[name], "a split name such as 'train' or 'valid'")
    if args["resume"] and args["checkpoint_dir"] is None:
        raise OptionError("resume=True needs checkpoint_dir (the folder to resume from); "
                          "pass checkpoint_dir=... (--checkpoint-dir) or leave resume off")
    check_overrides(args["override_resume"])
    if args["override_resume"] and not args["resume"]:
        raise OptionError("override_resume only applies to a resumed run; pass resume=True "
                          "(--resume) or leave it out")
    check_plot(args["plot"])
    check_save(args["save"], args["checkpoint_dir"])
