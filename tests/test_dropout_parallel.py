"""One run, whatever the parallelism, with dropout on: the dropout masks are keyed by (run seed,
step, site, global example, position) (:mod:`bertlite.dropout`), so accumulation micro-batches,
the devices of one process, DDP ranks, kvstore workers and their combinations train like one
process with the whole batch; torch and MXNet draw the same masks; and a resumed run is the
uninterrupted one.

Tiny configs, dropout 0.2 (the book's), float32, 10 steps through the core's ``train_bert``.
Adam with ``eps=1``: with a tiny eps its update is ``lr * sign(g)`` for gradients near zero (the
attention key bias has a zero gradient in exact arithmetic), which turns float32 round-off
into steps of ``lr``; with ``eps=1`` the update is a smooth function of the gradient, so the
weights can be compared element by element.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, gloo_rank_env, run_launch_job

from conftest import skip_unless_backend

SMALL = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=2, dropout=0.2,
             max_len=32)
STEPS, BATCH, SEED, LR = 10, 15, 7, 0.1
TESTS = Path(__file__).resolve().parent


def run_steps(backend: str, devices: str | None = None, accumulate: int = 1,
              steps: int = STEPS, fast: bool = True, stop_at: int | None = None,
              resume_from: dict | None = None, dropout: float = SMALL["dropout"]
              ) -> dict[str, np.ndarray]:
    """``steps`` steps of ``train_bert`` on 15-row batches of the sample corpus (uneven shares
    for every split) from ``init_params(config, 0)``: per-step losses and the final weights.
    ``stop_at``: stop after that many steps and also return the optimizer state (for a resume);
    ``resume_from``: continue from such a result."""
    from bertlite.config import BERTConfig
    from bertlite.data.loader import load_data_wiki
    from bertlite.optim import OptimizerSettings
    from bertlite.params import init_params
    from bertlite.registry import get_backend
    from bertlite.trainer import TrainState, train_bert

    be = get_backend(backend) if fast else type(get_backend(backend))(fast=False)
    devs = be.parse_devices(devices)
    batches, vocab = load_data_wiki(BATCH, 32, corpus="sample", seed=0)
    config = BERTConfig(vocab_size=len(vocab), **{**SMALL, "dropout": dropout})
    model = be.build_model(config, devs)
    settings = OptimizerSettings(lr=LR, eps=1.0)
    opt = be.create_optimizer(model, settings)
    state = None
    if resume_from is None:
        be.load_state_dict(model, init_params(config, 0))
    else:
        be.load_state_dict(model, {k[2:]: v for k, v in resume_from.items()
                                   if k.startswith("w/")})
        be.load_optimizer_state(opt, {k[2:]: v for k, v in resume_from.items()
                                      if k.startswith("o/")})
        state = TrainState(step=int(resume_from["state"][0]), epoch=int(resume_from["state"][1]),
                           batch_index=int(resume_from["state"][2]))
    state = train_bert(batches, be, model, opt, settings, stop_at or steps, seed=SEED,
                       state=state, progress=False, accumulate=accumulate)
    out = {"mlm": np.asarray(state.history.mlm_loss), "nsp": np.asarray(state.history.nsp_loss),
           **{f"w/{k}": v for k, v in be.state_dict(model).items()}}
    if stop_at is not None:
        out.update({f"o/{k}": v for k, v in be.optimizer_state(opt).items()})
        out["state"] = np.array([state.step, state.epoch, state.batch_index])
    return out


def assert_same_run(run: dict, reference: dict, weights_atol: float = 1e-4) -> None:
    """Per-step losses within 1e-5 relative, every final weight within ``weights_atol``."""
    assert len(run["mlm"]) == len(reference["mlm"]) == STEPS
    assert np.isfinite(run["mlm"]).all()
    np.testing.assert_allclose(run["mlm"], reference["mlm"], rtol=1e-5)
    np.testing.assert_allclose(run["nsp"], reference["nsp"], rtol=1e-5)
    for name, value in reference.items():
        if name.startswith("w/"):
            np.testing.assert_allclose(run[name], value, rtol=0, atol=weights_atol, err_msg=name)


def assert_dropout_acts(run: dict, backend: str) -> None:
    """The masks are applied: without dropout the same run's first loss differs."""
    plain = run_steps(backend, steps=1, dropout=0.0)
    assert abs(plain["mlm"][0] - run["mlm"][0]) > 1e-3


# -- MXNet ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mx_reference():
    skip_unless_backend("mxnet")
    return run_steps("mxnet")


@pytest.mark.parametrize("devices, accumulate", [("cpu:0,cpu:1", 1), ("cpu", 2),
                                                 ("cpu:0,cpu:1", 2)])
def test_mxnet_devices_and_accumulation_train_like_one_device(mx_reference, devices,
                                                              accumulate):
    assert_same_run(run_steps("mxnet", devices, accumulate), mx_reference)


def test_mxnet_dropout_is_on(mx_reference):
    assert_dropout_acts(mx_reference, "mxnet")


def test_mxnet_plain_model_draws_the_same_masks(mx_reference):
    """MXNetBackend(fast=False): the model's own forward pass with the same masks (no sparse
    last block, no compiled graph) trains the same run."""
    assert_same_run(run_steps("mxnet", fast=False), mx_reference)


def assert_exact_resume(backend: str, reference: dict) -> None:
    """4 steps, then a new model and optimizer from their state: the remaining 6 steps are
    the uninterrupted run's, bit for bit (the masks are a function of the step)."""
    first = run_steps(backend, stop_at=4)
    resumed = run_steps(backend, resume_from=first)
    np.testing.assert_array_equal(first["mlm"], reference["mlm"][:4])
    np.testing.assert_array_equal(resumed["mlm"], reference["mlm"][4:])
    np.testing.assert_array_equal(resumed["nsp"], reference["nsp"][4:])
    for name, value in reference.items():
        if name.startswith("w/"):
            np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_mxnet_resume_is_exact(mx_reference):
    assert_exact_resume("mxnet", mx_reference)


MX_WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, sys.argv[1])
    from test_dropout_parallel import run_steps
    from bertlite.backends.mxnet import distributed

    out = run_steps("mxnet", accumulate=int(sys.argv[3]))
    np.savez(Path(sys.argv[2]) / f"rank-{distributed.rank()}.npz", **out)
""")




@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_mxnet_two_kvstore_workers_train_like_one_process(mx_reference, tmp_path, accumulate):
    script = tmp_path / "worker.py"
    script.write_text(MX_WORKER)
    job = run_launch_job(["--workers", "2", "--", sys.executable, str(script), str(TESTS),
                    str(tmp_path), str(accumulate)], tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    for rank in (0, 1):
        assert_same_run(dict(np.load(tmp_path / f"rank-{rank}.npz")), mx_reference)


# -- torch ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_reference():
    skip_unless_backend("torch")
    return run_steps("torch")


def test_torch_accumulation_trains_like_one_step(torch_reference):
    assert_same_run(run_steps("torch", accumulate=2), torch_reference)


def test_torch_dropout_is_on(torch_reference):
    assert_dropout_acts(torch_reference, "torch")


def test_torch_plain_model_draws_the_same_masks(torch_reference):
    """TorchBackend(fast=False): the book's padded computation with the same full-shape masks
    trains the same run as the packed fast path, which takes its elements from them."""
    assert_same_run(run_steps("torch", fast=False), torch_reference)


def test_torch_resume_is_exact(torch_reference):
    assert_exact_resume("torch", torch_reference)


def _ddp_rank(rank: int, world_size: int, port: int, out: str, accumulate: int) -> None:
    """One DDP rank (gloo on 127.0.0.1, the environment torchrun sets): :func:`run_steps`."""
    os.environ.update(gloo_rank_env(rank, world_size, port))
    import torch

    torch.set_num_threads(1)
    np.savez(Path(out) / f"rank-{rank}.npz", **run_steps("torch", accumulate=accumulate))


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_torch_two_ddp_processes_train_like_one(torch_reference, tmp_path, accumulate):
    import torch.multiprocessing as tmp

    tmp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path), accumulate), nprocs=2,
              join=True)
    for rank in (0, 1):
        assert_same_run(dict(np.load(tmp_path / f"rank-{rank}.npz")), torch_reference)


# -- torch and MXNet --------------------------------------------------------------------------

def test_torch_and_mxnet_train_the_same_run(torch_reference, mx_reference):
    """Same initial weights, data and masks (the core's generator): the same per-step losses
    within 1e-4 relative and the same final weights within 1e-4 (float32 round-off through
    two frameworks' kernels, over 10 steps; here about 3e-7, 2e-6 and 5e-7)."""
    np.testing.assert_allclose(torch_reference["mlm"], mx_reference["mlm"], rtol=1e-4)
    np.testing.assert_allclose(torch_reference["nsp"], mx_reference["nsp"], rtol=1e-4)
    for name, value in mx_reference.items():
        if name.startswith("w/"):
            np.testing.assert_allclose(torch_reference[name], value, rtol=0, atol=1e-4,
                                       err_msg=name)


