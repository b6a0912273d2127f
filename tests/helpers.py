"""Test helpers shared by the backend test files: batches like the data pipeline's, tiny model
configurations and model builds through the Backend interface (no framework imported here)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bertlite.config import BERTConfig
from bertlite.data.loader import Batch
from bertlite.params import init_params

#: token ids of the reserved tokens in bertlite's vocabularies (``<unk>`` is 0)
PAD, CLS, SEP = 1, 3, 4
#: the first id of an ordinary word
FIRST_WORD = 5


def make_batch(vocab_size: int = 500, batch: int = 8, length: int = 16, seed: int = 0, *,
               preds: int = 3, fill: float = 0.7) -> Batch:
    """A batch of numpy arrays like the data pipeline's: uneven ``valid_lens`` (the first
    example full length) with ``<pad>`` after them, ``<cls>`` first and ``<sep>`` last, both
    segments, ``preds`` prediction slots per example of which about ``fill`` are used (the
    first always; unused ones have position 0, label 0 and weight 0), random NSP labels."""
    if length < preds + 3:
        raise ValueError(f"length ({length}) must be at least preds + 3 ({preds + 3})")
    rng = np.random.default_rng(seed)
    valid = rng.integers(preds + 3, length + 1, batch)
    valid[0] = length
    tokens = rng.integers(FIRST_WORD, vocab_size, (batch, length)).astype(np.int32)
    segments = np.zeros((batch, length), np.int32)
    for i, v in enumerate(valid):
        tokens[i, 0], tokens[i, v - 1], tokens[i, v:] = CLS, SEP, PAD
        segments[i, v // 2:v] = 1
    positions = np.stack([np.sort(rng.choice(np.arange(1, v - 1), preds, replace=False))
                          for v in valid]).astype(np.int32).reshape(batch, preds)
    weights = (rng.random((batch, preds)) < fill).astype(np.float32)
    weights[:, 0] = 1.0
    positions[weights == 0] = 0
    labels = (rng.integers(FIRST_WORD, vocab_size, (batch, preds)) * weights).astype(np.int32)
    nsp = rng.integers(0, 2, batch).astype(np.int32)
    return Batch(tokens, segments, valid.astype(np.float32), positions, weights, labels, nsp)


def tiny_config(vocab_size: int = 500, dropout: float = 0.0, **changes: Any) -> BERTConfig:
    """A two-layer model small enough for any test (hidden 32, FFN 64, two heads)."""
    settings = dict(vocab_size=vocab_size, num_hiddens=32, ffn_num_hiddens=64, num_heads=2,
                    num_layers=2, dropout=dropout, max_len=64)
    settings.update(changes)
    return BERTConfig(**settings)


def build(backend: Any, config: BERTConfig | None = None, devices: Any = None, seed: int = 0
          ) -> Any:
    """``backend``'s model of ``config`` (default :func:`tiny_config`) on ``devices`` (a spec
    for ``parse_devices`` or its result; None: the default), weights ``init_params(seed)``."""
    config = config or tiny_config()
    if devices is None or isinstance(devices, str):
        devices = backend.parse_devices(devices)
    model = backend.build_model(config, devices)
    backend.load_state_dict(model, init_params(config, seed))
    return model


def run_launch_job(args: list[str], cwd: Path, timeout: int = 240
                   ) -> subprocess.CompletedProcess:
    """``python -m bertlite.launch ARGS`` (an MXNet dist_sync job on 127.0.0.1) in its own
    process group, killed whole (scheduler, server, workers) if it outlives ``timeout``
    seconds; the launcher's own timeout is 30 s shorter so that it reports first."""
    import pytest

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg"}
    env.pop("MXNET_OMP_MAX_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen([sys.executable, "-m", "bertlite.launch", "--timeout",
                             str(timeout - 30), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the job did not end in {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a DDP rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gloo_rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment torchrun gives rank ``rank`` of a one-machine gloo job on 127.0.0.1,
    one thread per process, no display."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
            "MPLBACKEND": "Agg"}
