"""One run at a time in a checkpoint directory: ``.bertlite.lock``, an ``flock`` that the kernel
drops when the holding process ends (so the lock of a process that died is simply taken over),
with the holder's pid and host written in the file for the message a second run gets."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bertlite.errors import CheckpointError

LOCK_FILE = ".bertlite.lock"

#: directories this process holds, by resolved path: (open lock file, holds taken)
_held: dict[Path, list[Any]] = {}

F = TypeVar("F", bound=Callable[..., Any])


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"process {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _lock_file(path: Path, directory: Path) -> Any:
    """``path`` opened and flock-ed, or a CheckpointError naming its holder."""
    try:
        f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
    except OSError as err:
        raise CheckpointError(f"cannot create the lock file {path}: {err.strerror or err}; "
                              "choose another checkpoint_dir") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise CheckpointError(
            f"checkpoint directory {directory} is in use by {_holder(path)} (lock {path}); "
            "wait for that run to end, or use another checkpoint_dir") from None
    except OSError as err:  # a file system without flock
        f.close()
        raise CheckpointError(f"cannot lock {path}: {err.strerror or err}") from None
    return f


def acquire(directory: str | os.PathLike) -> Path:
    """Lock ``directory`` for this process (again, if it holds it already), or raise a
    CheckpointError naming the process that holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = directory.resolve()
    if key in _held:
        _held[key][1] += 1
        return key / LOCK_FILE
    path = key / LOCK_FILE
    while True:
        f = _lock_file(path, directory)
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except OSError:
            pass
        f.close()  # locked a file its holder removed as it ended: lock the new one
    # ours now: whatever pid a dead holder left in the file is replaced
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    f.flush()
    _held[key] = [f, 1]
    return path


def release(directory: str | os.PathLike) -> None:
    """Undo one :func:`acquire`; the last one removes the lock file and drops the lock."""
    key = Path(directory).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    f = entry[0]
    with contextlib.suppress(OSError):
        os.unlink(key / LOCK_FILE)  # still ours: nobody else can lock it before the unlock
    f.close()  # drops the flock


@contextlib.contextmanager
def locked(directory: str | os.PathLike):
    """Hold the lock of ``directory`` for the block."""
    acquire(directory)
    try:
        yield
    finally:
        release(directory)


def releases_locks(func: F) -> F:
    """Decorate a function that may :func:`acquire` locks: those it took and still holds are
    released when it returns or raises."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = {k: v[1] for k, v in _held.items()}
        try:
            return func(*args, **kwargs)
        finally:
            for key in list(_held):
                for _ in range(_held[key][1] - before.get(key, 0)):
                    release(key)

    return wrapper  # type: ignore[return-value]
