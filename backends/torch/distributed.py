"""DistributedDataParallel for the torch backend: one process per device, started by ``torchrun``
(or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``).

The core never sees any of it. Every process reads the same data in the same order (same seed)
and hands the backend the same global batch; :func:`bertlite.sharding.process_parts` gives each
process its own disjoint rows, its loss uses the global batch's normalizers and is scaled by the
world size against DDP's gradient averaging, so the update equals the single-process update of
the global batch. Launch::

    torchrun --standalone --nproc_per_node=4 -m bertlite pretrain --backend torch ...
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29400 --rdzv-id=run1 -m bertlite pretrain --backend torch ...
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bertlite.errors import DeviceError

__all__ = ["WorldInfo", "all_reduce_sum", "any_process", "env_world", "is_distributed",
           "is_initialized", "local_device", "rank", "setup", "world", "world_size", "wrap"]


@dataclass(frozen=True)
class WorldInfo:
    """Where this process stands among the processes training together."""

    rank: int
    world_size: int
    local_rank: int


def env_world() -> WorldInfo | None:
    """The launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; None unless ``WORLD_SIZE`` is
    more than one (a single process trains without DDP)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise DeviceError(f"cannot read the distributed environment (RANK, WORLD_SIZE, "
                          f"LOCAL_RANK): {err}") from None
    if world_size <= 1:
        return None
    if not 0 <= rank < world_size:
        raise DeviceError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    return WorldInfo(rank, world_size, local_rank)


def is_distributed() -> bool:
    """Whether the environment makes this process one of several training together."""
    return env_world() is not None


def is_initialized() -> bool:
    """Whether this process has joined a process group of several."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> WorldInfo | None:
    """This process's place once the process group is up (or as the environment says)."""
    if is_initialized():
        info = env_world()
        local = info.local_rank if info else dist.get_rank()
        return WorldInfo(dist.get_rank(), dist.get_world_size(), local)
    return env_world()


def rank() -> int:
    """This process's rank (0 in one process)."""
    info = world()
    return info.rank if info else 0


def world_size() -> int:
    """How many processes train together (1 in one process)."""
    info = world()
    return info.world_size if info else 1


def local_device(spec_was_given: bool, devices: list[torch.device]) -> list[torch.device]:
    """The one device of this process under DDP: ``cuda:LOCAL_RANK`` by default (or the CPU
    without GPUs); an explicit device must be a single one."""
    info = env_world()
    if info is None:
        return devices
    if not spec_was_given:
        if torch.cuda.is_available():
            return [torch.device(f"cuda:{info.local_rank % torch.cuda.device_count()}")]
        return [torch.device("cpu")]
    if len(devices) != 1:
        raise DeviceError(f"under torchrun every process trains on one device, got {devices}; "
                          "leave devices unset (process LOCAL_RANK uses cuda:LOCAL_RANK) or use "
                          "nn.DataParallel in a single process")
    if devices[0].type == "cuda" and devices[0].index == 0 and info.local_rank > 0 \
            and torch.cuda.device_count() > 1:
        # "cuda" (or "cuda:0") given to every process: one GPU each, not all on GPU 0
        return [torch.device(f"cuda:{info.local_rank % torch.cuda.device_count()}")]
    return devices


def _loopback_store(info: WorldInfo) -> dist.Store | None:
    """When ``MASTER_ADDR`` is a loopback address and no torchrun agent provides the store, a
    TCPStore that listens on that address only (``env://`` would listen on every interface);
    None otherwise."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port or not port.isdigit():
        return None  # env:// says what is missing
    try:
        address = socket.gethostbyname(host)
        if not ipaddress.ip_address(address).is_loopback:
            return None
    except (OSError, ValueError):
        return None
    timeout = timedelta(minutes=30)
    if info.rank != 0:
        return dist.TCPStore(address, int(port), info.world_size, False, timeout)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((address, int(port)))
    except OSError as err:
        listener.close()
        raise DeviceError(f"cannot listen on MASTER_ADDR:MASTER_PORT {host}:{port} "
                          f"({err.strerror or err}); choose a free MASTER_PORT") from None
    listener.listen(128)
    fd = listener.detach()  # the store owns the socket from here on, and closes it
    try:
        return dist.TCPStore(address, int(port), info.world_size, True, timeout,
                             wait_for_workers=False, master_listen_fd=fd)
    except Exception:
        os.close(fd)
        raise


def setup(device: torch.device) -> WorldInfo | None:
    """Join the process group when the environment asks for several processes: NCCL for CUDA,
    Gloo for the CPU, rendezvous through ``env://`` (``MASTER_ADDR``/``MASTER_PORT``, or
    torchrun's store; a loopback ``MASTER_ADDR`` is listened on alone). Idempotent; a process
    group the caller already made is used as is."""
    info = env_world()
    if info is None or is_initialized():
        return world()
    if not dist.is_available():
        raise DeviceError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
    store = _loopback_store(info)
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = "env://"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                            **kwargs)
    atexit.register(_teardown)
    return world()


def _teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # shutting down anyway
            pass


def wrap(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` (already on ``device``) in DistributedDataParallel. Every parameter gets a
    gradient in every step, so unused-parameter search stays off; the model has no buffers,
    so no forward ever waits for the other processes."""
    return DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=False)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the processes (in place), or as it is in one process."""
    if is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any process."""
    if not is_initialized():
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
