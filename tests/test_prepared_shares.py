"""Data parallelism from a prepared folder: each DDP rank / kvstore worker gathers from the
memory maps only the rows of the global batch it trains on, and the run equals one process's
(same per-step losses and final weights, dropout on), on a folder of several shards.

Each run records the global example indices it asked the memory maps for (``records`` wrapped
to note its argument, then called as is), so the tests see which rows every process touched.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, gloo_rank_env, run_launch_job
from test_dropout_parallel import (
    LR,
    SEED,
    SMALL,
    STEPS,
    TESTS,
    assert_same_run,
)

from conftest import skip_unless_backend

SAMPLE = Path(__file__).resolve().parents[1] / "bertlite" / "data" / "sample" / "wiki.train.tokens"
BATCH = 15  # uneven shares for every split


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The sample corpus prepared into several shards (about 30 KB of text each)."""
    from bertlite.data.manifest import read_manifest
    from bertlite.data.prepare import prepare

    out = prepare(SAMPLE, tmp_path_factory.mktemp("shares") / "p", max_len=32, seed=0,
                  shard_bytes=30_000, workers=1)
    assert len(read_manifest(out)["shards"]) >= 4
    return out


def run_prepared(backend: str, folder: str | Path, accumulate: int = 1) -> dict[str, np.ndarray]:
    """``STEPS`` steps of ``train_bert`` on ``BATCH``-row batches of the prepared folder from
    ``init_params(config, 0)``: per-step losses, final weights and the indices read."""
    from bertlite.config import BERTConfig
    from bertlite.data.prepared import PreparedBatches, PreparedData
    from bertlite.optim import OptimizerSettings
    from bertlite.params import init_params
    from bertlite.registry import get_backend
    from bertlite.trainer import train_bert

    data = PreparedData(folder)
    reads: list[np.ndarray] = []
    records = data.records

    def recording(index: np.ndarray) -> np.ndarray:
        reads.append(np.array(index, dtype=np.int64))
        return records(index)

    data.records = recording
    batches = PreparedBatches(data, BATCH, seed=SEED)
    be = get_backend(backend)
    config = BERTConfig(vocab_size=len(data.vocab), **SMALL)
    model = be.build_model(config, be.parse_devices(None))
    be.load_state_dict(model, init_params(config, 0))
    settings = OptimizerSettings(lr=LR, eps=1.0)
    state = train_bert(batches, be, model, be.create_optimizer(model, settings), settings, STEPS,
                       seed=SEED, progress=False, accumulate=accumulate)
    return {"mlm": np.asarray(state.history.mlm_loss), "nsp": np.asarray(state.history.nsp_loss),
            "reads": np.concatenate(reads), "read_sizes": np.array([len(r) for r in reads]),
            **{f"w/{k}": v for k, v in be.state_dict(model).items()}}


def expected_rows(folder: Path, rank: int, accumulate: int) -> list[np.ndarray]:
    """The global indices of process ``rank``'s rows (of 2) in each step's batch."""
    from bertlite.data.prepared import PreparedBatches, PreparedData
    from bertlite.sharding import process_parts

    order = PreparedBatches(PreparedData(folder), BATCH, seed=SEED).order(0)
    parts = process_parts(BATCH, accumulate, rank, 2)
    return [order[s * BATCH:(s + 1) * BATCH][parts[0].start:parts[-1].stop]
            for s in range(STEPS)]


def assert_read_only_their_rows(runs: list[dict], folder: Path, accumulate: int,
                                reference: dict) -> None:
    """Each process read exactly its rows of every batch, once; together the whole batches
    one process reads."""
    for rank, run in enumerate(runs):
        want = expected_rows(folder, rank, accumulate)
        assert run["read_sizes"].tolist() == [len(w) for w in want]
        np.testing.assert_array_equal(run["reads"], np.concatenate(want))
        assert len(run["reads"]) < len(reference["reads"])
    together = np.sort(np.concatenate([r["reads"] for r in runs]))
    np.testing.assert_array_equal(together, np.sort(reference["reads"]))


def test_one_process_reads_whole_batches(folder):
    """Without sharing the loader reads every batch whole, and the dynamic masks (drawn over
    the whole batch) make even a shared loader read it whole."""
    from bertlite.data.prepared import PreparedBatches, PreparedData

    data = PreparedData(folder)
    batches = PreparedBatches(data, BATCH, seed=SEED, masking="dynamic")
    whole = batches.batch(0, 0)
    batches.read_share(1, 2, sum_over_processes=lambda value: value)
    shared = batches.batch(0, 0)
    for x, y in zip(whole, shared):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="rank 2 is not below"):
        batches.read_share(2, 2, sum_over_processes=lambda value: value)


# -- torch DDP ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_reference(folder):
    skip_unless_backend("torch")
    return run_prepared("torch", folder)


def _ddp_rank(rank: int, world_size: int, port: int, folder: str, out: str,
              accumulate: int) -> None:
    """One DDP rank (gloo on 127.0.0.1, the environment torchrun sets)."""
    import os

    os.environ.update(gloo_rank_env(rank, world_size, port))
    import torch

    torch.set_num_threads(1)
    np.savez(Path(out) / f"rank-{rank}.npz", **run_prepared("torch", folder, accumulate))


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [2])  # two micro-batches a process: its rows span both
def test_torch_ddp_ranks_read_their_share_and_train_like_one(folder, torch_reference,
                                                             tmp_path, accumulate):
    import torch.multiprocessing as tmp

    tmp.spawn(_ddp_rank, args=(2, free_port(), str(folder), str(tmp_path), accumulate),
              nprocs=2, join=True)
    runs = [dict(np.load(tmp_path / f"rank-{rank}.npz")) for rank in (0, 1)]
    for run in runs:
        assert_same_run(run, torch_reference)
    assert_read_only_their_rows(runs, folder, accumulate, torch_reference)


# -- MXNet kvstore workers ------------------------------------------------------------------------

MX_WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, sys.argv[1])
    from test_prepared_shares import run_prepared
    from bertlite.backends.mxnet import distributed

    out = run_prepared("mxnet", sys.argv[2], accumulate=int(sys.argv[4]))
    np.savez(Path(sys.argv[3]) / f"rank-{distributed.rank()}.npz", **out)
""")


@pytest.fixture(scope="module")
def mx_reference(folder):
    skip_unless_backend("mxnet")
    return run_prepared("mxnet", folder)


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [2])  # two micro-batches a process: its rows span both
def test_mxnet_kvstore_workers_read_their_share_and_train_like_one(folder, mx_reference,
                                                                   tmp_path, accumulate):
    script = tmp_path / "worker.py"
    script.write_text(MX_WORKER)
    job = run_launch_job(["--workers", "2", "--", sys.executable, str(script), str(TESTS),
                    str(folder), str(tmp_path), str(accumulate)], tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    runs = [dict(np.load(tmp_path / f"rank-{rank}.npz")) for rank in (0, 1)]
    for run in runs:
        assert_same_run(run, mx_reference)
    assert_read_only_their_rows(runs, folder, accumulate, mx_reference)
