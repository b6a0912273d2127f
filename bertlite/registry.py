"""Finding backends: built-in and third-party ones alike, through the entry-point group
``bertlite.backends``; frameworks are imported only when a backend is asked for."""

from __future__ import annotations

import importlib
import importlib.util
import os
from importlib import metadata
from typing import TYPE_CHECKING

from bertlite.errors import BackendError
from bertlite.install import install_command

if TYPE_CHECKING:
    from bertlite.backend import Backend

ENTRY_POINT_GROUP = "bertlite.backends"
ENV_VAR = "BERTLITE_BACKEND"

#: name -> (module, class, framework module, pip extra); used when the package metadata that
#: lists the entry points is unavailable (a source tree on sys.path)
BUILTIN = {
    "torch": ("bertlite.backends.torch", "TorchBackend", "torch"),
    "mxnet": ("bertlite.backends.mxnet", "MXNetBackend", "mxnet"),
}

_instances: dict[str, Backend] = {}


class FrameworkMissingError(ImportError, BackendError):
    """The framework of a built-in backend is not installed."""


class NoBackendError(BackendError):
    """No backend was named and ``$BERTLITE_BACKEND`` is not set."""


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> list[str]:
    """Names of every known backend, installed framework or not (imports nothing)."""
    return sorted(set(BUILTIN) | set(_entry_points()))


def installed_backends() -> list[str]:
    """Built-in backends whose framework is importable, plus all third-party ones."""
    return [name for name in available_backends()
            if name not in BUILTIN or importlib.util.find_spec(BUILTIN[name][2]) is not None]


def require_framework(name: str) -> None:
    """Raise an ImportError that says what to pip install when ``name``'s framework is absent."""
    framework = BUILTIN[name][2]
    if importlib.util.find_spec(framework) is None:
        raise FrameworkMissingError(
            f"the {name!r} backend needs {framework}, which is not installed: "
            f"{install_command(name)}")


def resolve_backend_name(name: str | None) -> str:
    """The argument, else ``$BERTLITE_BACKEND``, else an error that says how to choose."""
    name = name or os.environ.get(ENV_VAR)
    if not name:
        raise NoBackendError(f"no backend chosen: pass backend= (one of "
                             f"{available_backends()}) or set {ENV_VAR}")
    return name


def get_backend(name: str | Backend | None = None) -> Backend:
    """The backend called ``name`` (or ``$BERTLITE_BACKEND``), imported on first use."""
    from bertlite.backend import Backend

    if isinstance(name, Backend):
        return name
    name = resolve_backend_name(name)
    if name in _instances:
        return _instances[name]
    known = available_backends()
    if name not in known:
        raise BackendError(f"unknown backend {name!r}; known backends: {known}")
    if name in BUILTIN:
        require_framework(name)
    ep = _entry_points().get(name)
    try:
        if ep is not None:
            cls = ep.load()
        else:
            module, attr, _ = BUILTIN[name]
            cls = getattr(importlib.import_module(module), attr)
    except FrameworkMissingError:
        raise
    except Exception as err:
        where = ep.value if ep is not None else BUILTIN[name][0]
        raise BackendError(f"backend {name!r} ({where}) failed to load: "
                           f"{type(err).__name__}: {err}") from err
    backend = cls()
    if not isinstance(backend, Backend):
        raise BackendError(f"backend {name!r} is not a bertlite.backend.Backend: {cls!r}")
    _instances[name] = backend
    return backend
