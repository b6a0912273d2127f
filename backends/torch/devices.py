"""Torch devices from user specs, and the book's ``try_gpu`` / ``try_all_gpus``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bertlite.errors import DeviceError

_GPU_NAMES = ("cuda", "gpu")


def try_gpu(i: int = 0) -> torch.device:
    """GPU ``i`` if it exists, else the CPU (the book's helper)."""
    if torch.cuda.device_count() >= i + 1:
        return torch.device(f"cuda:{i}")
    return torch.device("cpu")


def try_all_gpus() -> list[torch.device]:
    """All CUDA GPUs, or ``[cpu]`` when there are none (the book's helper)."""
    return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())] or [
        torch.device("cpu")]


def _existing() -> str:
    n = torch.cuda.device_count()
    if n == 0:
        build = (f"CUDA {torch.version.cuda} build, but no GPU is visible" if torch.version.cuda
                 else "a CPU-only build of torch")
        return f"this machine has no CUDA GPU (torch {torch.__version__}: {build}); use 'cpu'"
    names = ", ".join(f"cuda:{i}" for i in range(n))
    return f"this machine has {n} CUDA GPU{'s' if n > 1 else ''} ({names}) and 'cpu'"


def _gpu(index: int, spec: Any) -> torch.device:
    if index < 0 or index >= torch.cuda.device_count():
        raise DeviceError(f"device {spec!r}: cuda:{index} does not exist; {_existing()}")
    return torch.device(f"cuda:{index}")


def _one(item: Any, spec: Any, last_kind: str | None) -> torch.device:
    """One device from a torch.device, an int (a GPU index) or a string."""
    if isinstance(item, torch.device):
        kind, index = item.type, item.index
    elif isinstance(item, int) and not isinstance(item, bool):
        kind, index = "cuda", item
    elif isinstance(item, str):
        text = item.strip().lower()
        kind, _, number = text.partition(":")
        if kind.isdigit() and not number:  # an index: "cuda:0,1", "0,1"
            kind, number = last_kind or "cuda", kind
        if kind in _GPU_NAMES:
            kind = "cuda"
        if kind not in ("cpu", "cuda") or (number and not number.isdigit()):
            raise DeviceError(f"cannot parse device {item!r} in {spec!r}: use 'cpu', 'cuda', "
                              f"'cuda:0,1' or 'gpu:0'; {_existing()}")
        index = int(number) if number else None
    else:
        raise DeviceError(f"cannot use {item!r} as a torch device (in {spec!r}); "
                          f"give a string like 'cuda:0', an int or a torch.device")
    if kind == "cpu":
        if index not in (None, 0):
            raise DeviceError(f"device {item!r}: torch has one CPU device, 'cpu' (several "
                              "CPU devices are an MXNet notion)")
        return torch.device("cpu")
    if kind != "cuda":
        raise DeviceError(f"device {item!r}: the torch backend supports 'cpu' and 'cuda' "
                          f"devices; {_existing()}")
    return _gpu(0 if index is None else index, spec)


def parse_devices(spec: str | torch.device | Sequence[Any] | None = None) -> list[torch.device]:
    """Devices from ``None`` (all GPUs, else the CPU), ``"cpu"``, ``"cuda"`` (GPU 0),
    ``"cuda:0,1"``, ``"gpu:0"``, or a list of torch devices, ints or strings.

    Raises :class:`bertlite.errors.DeviceError` naming the devices that exist when a device
    does not exist or cannot be parsed, mixes the CPU with GPUs, or repeats.
    """
    if spec is None:
        return try_all_gpus()
    if isinstance(spec, (str, torch.device, int)):
        items: list[Any] = (spec.split(",") if isinstance(spec, str) else [spec])
    else:
        items = list(spec)
    devices: list[torch.device] = []
    last_kind = None
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        device = _one(item, spec, last_kind)
        last_kind = device.type
        devices.append(device)
    if not devices:
        raise DeviceError(f"no device in {spec!r}; {_existing()}")
    if len(set(devices)) != len(devices):
        raise DeviceError(f"device spec {spec!r} names a device twice")
    if len({d.type for d in devices}) > 1:
        raise DeviceError(f"device spec {spec!r} mixes the CPU with GPUs; train on one kind")
    return devices
