"""MXNet contexts from user specifications, and the book's ``try_gpu`` / ``try_all_gpus``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mxnet as mx

from bertlite.errors import DeviceError

__all__ = ["num_gpus", "parse_devices", "try_all_gpus", "try_gpu"]

#: accepted device kinds; ``cuda`` is PyTorch's word for ``gpu``
_KINDS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}


def num_gpus() -> int:
    """The number of GPUs MXNet sees (0 with a CPU-only build)."""
    try:
        return mx.context.num_gpus()
    except mx.base.MXNetError:
        return 0


def try_gpu(i: int = 0) -> mx.Context:
    """``gpu(i)`` if it exists, else ``cpu()``."""
    return mx.gpu(i) if num_gpus() >= i + 1 else mx.cpu()


def try_all_gpus() -> list[mx.Context]:
    """All GPUs, or ``[cpu()]`` if there is none."""
    return [mx.gpu(i) for i in range(num_gpus())] or [mx.cpu()]


def _what_exists() -> str:
    n = num_gpus()
    gpus = f"{n} GPU(s): gpu(0)..gpu({n - 1})" if n else "no GPU"
    features = ""
    try:
        if not mx.runtime.Features().is_enabled("CUDA"):
            features = " (this MXNet build has no CUDA)"
    except Exception:  # pragma: no cover - very old builds have no runtime features
        pass
    return f"this machine has the CPU (cpu, cpu:0, cpu:1, ...) and {gpus}{features}"


def _check(ctx: mx.Context) -> mx.Context:
    if ctx.device_type == "gpu" and ctx.device_id >= num_gpus():
        raise DeviceError(f"device {ctx} does not exist: {_what_exists()}")
    if ctx.device_type not in ("cpu", "gpu"):
        raise DeviceError(f"device {ctx} is not supported: use cpu or gpu contexts")
    return ctx


def _parse_string(spec: str) -> list[mx.Context]:
    text = spec.strip().lower()
    if not text:
        raise DeviceError(f"empty device specification: {_what_exists()}")
    if text in ("gpu", "cuda", "gpus", "all"):
        gpus = [mx.gpu(i) for i in range(num_gpus())]
        if not gpus:
            raise DeviceError(f"device {spec!r} asks for GPUs: {_what_exists()}")
        return gpus
    contexts, kind = [], None
    for part in text.split(","):
        part = part.strip()
        name, sep, index = part.partition(":")
        if name in _KINDS:
            kind = _KINDS[name]
            if not sep:
                index = "0"
        elif name.isdigit() and not sep and kind is not None:
            index = name  # "gpu:0,1": a bare number continues the previous kind
        else:
            raise DeviceError(f"cannot parse device {part!r} in {spec!r}: write e.g. 'cpu', "
                              f"'cpu:0,cpu:1' or 'gpu:0,1'; {_what_exists()}")
        if not index.isdigit():
            raise DeviceError(f"cannot parse device index {index!r} in {spec!r}: "
                              f"{_what_exists()}")
        contexts.append(_check(mx.Context(kind, int(index))))
    return contexts


def parse_devices(spec: str | Sequence[Any] | mx.Context | None = None) -> list[mx.Context]:
    """MXNet contexts from ``None`` (all GPUs, else ``[cpu()]``), a string (``"cpu"``,
    ``"cpu:0,cpu:1"``, ``"gpu:0,1"``, ``"cuda:0"``, ``"gpu"`` for all GPUs), a context or a
    list of contexts / strings. Raises :class:`~bertlite.errors.DeviceError` for devices that
    do not exist or cannot be parsed, naming what exists."""
    if spec is None:
        return try_all_gpus()
    if isinstance(spec, mx.Context):
        contexts = [_check(spec)]
    elif isinstance(spec, str):
        contexts = _parse_string(spec)
    elif isinstance(spec, Sequence):
        contexts = []
        for item in spec:
            if isinstance(item, mx.Context):
                contexts.append(_check(item))
            elif isinstance(item, str):
                contexts.extend(_parse_string(item))
            else:
                raise DeviceError(f"cannot use {item!r} as an MXNet device: give mx.Context "
                                  f"objects or strings; {_what_exists()}")
    else:
        raise DeviceError(f"cannot use {spec!r} as MXNet devices: give None, a string such "
                          f"as 'cpu' or 'gpu:0,1', or a list of mx.Context")
    if not contexts:
        raise DeviceError(f"no device given in {spec!r}: {_what_exists()}")
    if len(set(contexts)) != len(contexts):
        raise DeviceError(f"device specification {spec!r} names a device twice: {contexts}")
    return contexts
