"""What only the MXNet backend has: per-device shards, hybridization, PyTorch's Adam as an MXNet
optimizer, devices, and the book's MXNet tab running unchanged on ``bertlite.backends.mxnet``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import build, make_batch, tiny_config

from bertlite.backend import INFO_KEYS
from bertlite.config import BERTConfig
from bertlite.data.loader import Batch
from bertlite.errors import BackendError, DeviceError
from bertlite.loss import bert_loss, bert_loss_numpy
from bertlite.optim import OptimizerSettings
from bertlite.options import OptionError
from bertlite.params import init_params, is_no_decay, parameter_shapes
from conftest import framework_installed

if not framework_installed("mxnet"):  # before importing mxnet: a skip with the pip hint
    pytest.skip('backend "mxnet" skipped: mxnet is not installed (pip install "bertlite[mxnet]")',
                allow_module_level=True)

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

from bertlite.backends import mxnet as bmx  # noqa: E402
from bertlite.backends.mxnet import distributed, fast  # noqa: E402
from bertlite.backends.mxnet import step as mx_step  # noqa: E402
from bertlite.backends.mxnet.loss import _get_batch_loss_bert, output_row_losses  # noqa: E402
from bertlite.backends.mxnet.model import BERTModel  # noqa: E402
from bertlite.backends.mxnet.step import TorchAdam, clip_grad_norm, split_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO.parent / "shared" / "seed" / "bert-pretraining.ko.md"
#: modules conftest.import_d2l may replace by stubs
STUBBED = ("IPython", "matplotlib_inline", "pandas")
VOCAB, LENGTH, PREDS, HIDDEN = 500, 16, 4, 32
TWO_CPUS = [mx.cpu(0), mx.cpu(1)]


def batch_of(n: int = 9, seed: int = 0) -> Batch:
    """:func:`helpers.make_batch` in this file's sizes (uneven lengths, empty slots)."""
    return make_batch(VOCAB, n, LENGTH, seed, preds=PREDS)


@pytest.fixture
def no_stubs(monkeypatch):
    """Take out (for one test) the stub modules, without ``__spec__``, that another test's
    ``conftest.import_d2l`` left in ``sys.modules``: they fool bertlite.book and matplotlib
    (which ask IPython whether they run in a notebook) and torch (find_spec on pandas)."""
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in STUBBED and getattr(module, "__spec__", None) is None:
            monkeypatch.delitem(sys.modules, name)


@pytest.fixture(scope="module")
def mxb():
    """The MXNet backend (named apart from conftest's ``backend``, which follows
    BERTLITE_TEST_BACKENDS: this file is MXNet's whatever the matrix)."""
    return bmx.MXNetBackend()


def to_mx(batch: Batch, ctx=None) -> list:
    return [bmx.to_mxnet(a, ctx) for a in batch]


# -- (1) shards over several devices give the one-device loss and gradients --------------------

def test_two_uneven_shards_give_the_one_device_loss_and_gradients(mxb):
    batch = batch_of(n=9)  # 5 + 4 examples: the shards differ in size
    one = build(mxb, devices=[mx.cpu()])
    two = build(mxb, devices=TWO_CPUS)
    assert [s.shape[0] for s in split_batch(batch, TWO_CPUS)[0]] == [5, 4]
    mlm1, nsp1, grads1 = mxb.loss_and_grads(one, batch)
    mlm2, nsp2, grads2 = mxb.loss_and_grads(two, batch)
    assert mlm2 == pytest.approx(mlm1, rel=1e-5)
    assert nsp2 == pytest.approx(nsp1, rel=1e-5)
    assert set(grads1) == set(grads2) == set(parameter_shapes(tiny_config()))
    for name, g in grads1.items():
        scale = max(1e-3, float(np.abs(g).max()))
        np.testing.assert_allclose(grads2[name], g, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("hybridize", [True, False], ids=["hybridized", "imperative"])
def test_shard_losses_add_up_to_the_batch_loss(mxb, hybridize):
    """The book's helper: the per-shard losses are shares of the batch loss (sum, not mean)."""
    batch = batch_of(n=9)
    net = build(mxb, devices=TWO_CPUS)
    if not hybridize:
        net.hybridize(False)
    with autograd.record(train_mode=False):
        mlm_ls, nsp_ls, ls = _get_batch_loss_bert(
            net, gluon.loss.SoftmaxCELoss(), VOCAB, *split_batch(batch, TWO_CPUS))
    assert len(ls) == 2 and [l.ctx for l in ls] == TWO_CPUS
    _, mlm_logits, nsp_logits = mxb.forward(net, batch)
    expected = bert_loss_numpy(mlm_logits, batch.mlm_labels, batch.mlm_weights, nsp_logits,
                               batch.nsp_labels)
    assert sum(float(l) for l in mlm_ls) == pytest.approx(expected[0], rel=1e-5)
    assert sum(float(l) for l in nsp_ls) == pytest.approx(expected[1], rel=1e-5)
    assert sum(float(l) for l in ls) == pytest.approx(expected[2], rel=1e-5)


@pytest.mark.parametrize("settings", [
    OptimizerSettings(lr=1e-3),
    OptimizerSettings(lr=1e-3, optimizer="adamw", weight_decay=0.1, clip_norm=0.5),
], ids=["adam", "adamw-clip"])
def test_training_on_two_devices_follows_one_device(mxb, settings):
    """Three steps (dropout off): the kvstore sums the shards' gradients, the replicas stay
    equal, and the weights follow the one-device run. (The key bias has a zero gradient in
    exact arithmetic -- a constant added to every key of a row cancels in the softmax -- so
    Adam turns its rounding noise into steps of up to lr: it is only bounded.)"""
    batches = [batch_of(n=9, seed=s) for s in range(3)]
    one, two = build(mxb, devices=[mx.cpu()]), build(mxb, devices=TWO_CPUS)
    opt1, opt2 = mxb.create_optimizer(one, settings), mxb.create_optimizer(two, settings)
    for b in batches:
        l1 = [float(x) for x in mxb.train_step(one, opt1, b, settings.lr)]
        l2 = [float(x) for x in mxb.train_step(two, opt2, b, settings.lr)]
        np.testing.assert_allclose(l2, l1, rtol=1e-4)
    w1, w2 = mxb.state_dict(one), mxb.state_dict(two)
    for name, param in two.canonical_parameters().items():
        replicas = [d.asnumpy() for d in param.list_data()]
        np.testing.assert_array_equal(replicas[0], replicas[1], err_msg=name)
        if name.endswith("attention.W_k.bias"):
            assert np.abs(w2[name] - w1[name]).max() <= 2 * len(batches) * settings.lr
            continue
        np.testing.assert_allclose(w2[name], w1[name], rtol=1e-4, atol=2e-5, err_msg=name)
    assert int(mxb.optimizer_state(opt2)["step"]) == 3


def test_train_step_returns_unsynchronized_arrays(mxb):
    net = build(mxb, devices=TWO_CPUS)
    opt = mxb.create_optimizer(net, OptimizerSettings(lr=0.01))
    mlm, nsp = mxb.train_step(net, opt, batch_of(), 0.01)
    assert isinstance(mlm, mx.np.ndarray) and mlm.shape == () and mlm.ctx == mx.cpu(0)
    assert np.isfinite(float(mlm)) and np.isfinite(float(nsp))


# -- (2) hybridized graphs compute what the imperative blocks compute ---------------------------

def test_hybridized_outputs_equal_imperative_outputs():
    config = tiny_config(dropout=0.2)
    params = init_params(config, 1)
    batch = batch_of(n=6)
    args = to_mx(batch)
    nets = {}
    for mode in ("imperative", "hybridized"):
        net = BERTModel.from_config(config)
        net.initialize(mx.init.Xavier(), ctx=mx.cpu())
        for name, p in net.canonical_parameters().items():
            p.set_data(mx.np.array(params[name]))
        if mode == "hybridized":
            net.hybridize(static_alloc=True, static_shape=True)
        nets[mode] = net
    calls = {  # every input signature; the hybridized graph must serve them all
        "full": (args[0], args[1], args[2], args[3]),
        "no preds": (args[0], args[1], args[2]),
        "no lens": (args[0], args[1], None, args[3]),
        "tokens only": (args[0], args[1]),
        "full again": (args[0], args[1], args[2], args[3]),
    }
    for label, call in calls.items():
        imperative, hybridized = nets["imperative"](*call), nets["hybridized"](*call)
        for a, b in zip(imperative, hybridized):
            if a is None:
                assert b is None, label
                continue
            np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-5, atol=1e-5,
                                       err_msg=label)
    encoded, mlm, nsp = nets["hybridized"](*calls["full"])
    assert encoded.shape == (6, LENGTH, HIDDEN)
    assert mlm.shape == (6, PREDS, VOCAB) and nsp.shape == (6, 2)
    # valid_lens=None means no masking: the same as the full length
    full = mx.np.full((6,), LENGTH, dtype="float32")
    np.testing.assert_allclose(nets["hybridized"](args[0], args[1], full)[0].asnumpy(),
                               nets["hybridized"](args[0], args[1])[0].asnumpy(), rtol=1e-6)


@pytest.mark.parametrize("hybridize", [False, True])
def test_attention_masks_keys_beyond_valid_len(hybridize):
    att = bmx.MultiHeadAttention(HIDDEN, 2, dropout=0.0)
    att.initialize(mx.init.Xavier())
    if hybridize:
        att.hybridize(static_alloc=True, static_shape=True)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 6, HIDDEN)).astype(np.float32)
    changed = x.copy()
    changed[:, 4:] = rng.normal(size=(3, 2, HIDDEN))  # only keys at positions 4, 5 differ
    lens = mx.np.array([4.0, 4.0, 4.0])
    a = att(*[mx.np.array(x)] * 3, lens).asnumpy()
    b = att(*[mx.np.array(changed)] * 3, lens).asnumpy()
    np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-5, atol=1e-6)
    if hybridize:  # MXNet 1.9 keeps one graph per block: a hybridized block is called one way
        return
    unmasked = att(*[mx.np.array(x)] * 3, None).asnumpy()
    full = att(*[mx.np.array(x)] * 3, mx.np.array([6.0, 6.0, 6.0])).asnumpy()
    np.testing.assert_allclose(unmasked, full, rtol=1e-5, atol=1e-6)
    assert not np.allclose(unmasked, a)


def test_hybridized_loss_graph_gives_the_imperative_gradients(mxb):
    batch = batch_of(n=7)
    hybrid = build(mxb, devices=[mx.cpu()])
    imperative = build(mxb, devices=[mx.cpu()])
    imperative.hybridize(False)
    mlm_h, nsp_h, grads_h = mxb.loss_and_grads(hybrid, batch)
    mlm_i, nsp_i, grads_i = mxb.loss_and_grads(imperative, batch)
    assert (mlm_h, nsp_h) == pytest.approx((mlm_i, nsp_i), rel=1e-6)
    for name, g in grads_i.items():
        np.testing.assert_allclose(grads_h[name], g, rtol=1e-5, atol=1e-7, err_msg=name)


def _loss_and_grads(net, loss_fn, args, totals):
    """Loss of ``loss_fn(*args)`` (dropout off) and every canonical parameter's gradient."""
    with autograd.record(train_mode=False):
        mlm, nsp, loss = loss_fn(*args, *totals)
    loss.backward()
    grads = {name: p.grad().asnumpy().copy() for name, p in net.canonical_parameters().items()}
    net.collect_params().zero_grad()
    return float(mlm), float(nsp), grads


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_sparse_last_layer_gives_the_full_loss_and_gradients(num_layers, hybridize):
    """The loss graph's sparse last layer (queries, attention output, add & norm and FFN only
    at <cls> and the predicted positions) gives the loss and gradients of the full model's
    outputs: padding slots at position 0 (the <cls> row again) and a position predicted twice
    included, with the examples' valid lengths."""
    config = BERTConfig(vocab_size=VOCAB, num_hiddens=HIDDEN, ffn_num_hiddens=64, num_heads=2,
                        num_layers=num_layers, dropout=0.0, max_len=32)
    batch = batch_of(n=7, seed=3)
    positions = batch.pred_positions.copy()
    positions[1, 1] = positions[1, 0]  # a duplicate row: its gradients add up
    batch = batch._replace(pred_positions=positions)
    net = BERTModel.from_config(config)
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    for name, p in net.canonical_parameters().items():
        p.set_data(mx.np.array(init_params(config, 5)[name]))
    args = to_mx(batch)
    totals = (mx.np.array(float(batch.mlm_weights.sum())), mx.np.array(float(len(batch.tokens))))
    (tokens, segments, valid_lens, pred_positions, weights, labels, nsp_labels) = args

    def full(*inputs):
        _, mlm_Y_hat, nsp_Y_hat = net(*inputs[:4])
        return bert_loss(*output_row_losses(mx.ndarray, mlm_Y_hat, nsp_Y_hat, inputs[4],
                                            inputs[5], inputs[6], VOCAB),
                         mlm_weight_total=inputs[7], num_examples=inputs[8])

    expected = _loss_and_grads(net, full, args, totals)
    sparse = fast.PretrainingLoss(net)
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
        sparse.hybridize(static_alloc=True, static_shape=True)
    mlm, nsp, grads = _loss_and_grads(net, sparse, args, totals)
    assert (mlm, nsp) == pytest.approx(expected[:2], rel=1e-6)
    for name, g in expected[2].items():  # (the key bias's gradient is 0 up to round-off)
        atol = max(1e-7, 1e-6 * float(np.abs(g).max()))
        np.testing.assert_allclose(grads[name], g, rtol=1e-5, atol=atol, err_msg=name)
    # the outputs themselves: the MLM logits and the NSP logits of the full forward pass
    with autograd.predict_mode():
        mlm_full, nsp_full = net(tokens, segments, valid_lens, pred_positions)[1:]
    net.hybridize(False)
    mlm_sparse, nsp_sparse = fast.sparse_forward(net, mx.ndarray, tokens, segments, valid_lens,
                                                 pred_positions)
    np.testing.assert_allclose(mlm_sparse.asnumpy(), mlm_full.asnumpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nsp_sparse.asnumpy(), nsp_full.asnumpy(), rtol=1e-5, atol=1e-5)


def test_dropout_is_on_in_training_and_off_in_forward(mxb):
    net = build(mxb, tiny_config(dropout=0.5), [mx.cpu()])
    batch = batch_of()
    first, second = mxb.forward(net, batch), mxb.forward(net, batch)
    np.testing.assert_array_equal(first[0], second[0])
    args = to_mx(batch)
    with autograd.train_mode():
        a = net(*args[:4])[0].asnumpy()
        b = net(*args[:4])[0].asnumpy()
    assert not np.allclose(a, b)


# -- (3) the optimizer is torch.optim.Adam / AdamW ------------------------------------------------

SHAPES = {"dense.weight": (6, 5), "dense.bias": (6,), "ln.weight": (5,), "emb": (1, 4, 5)}


@pytest.mark.parametrize("kind, weight_decay", [("adam", 0.0), ("adam", 0.05), ("adamw", 0.1)])
@pytest.mark.parametrize("devices", [[mx.cpu()], TWO_CPUS], ids=["1dev", "2dev"])
def test_optimizer_equals_torch(kind, weight_decay, devices, no_stubs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    init = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    grads = [{n: (rng.normal(size=s) * 10.0 ** rng.integers(-4, 1)).astype(np.float32)
              for n, s in SHAPES.items()} for _ in range(6)]
    grads[2]["dense.bias"][:] = 0.0  # a zero gradient keeps its own state
    lrs = [0.01, 0.02, 0.005, 0.01, 0.03, 0.001]

    params = {}
    for name, value in init.items():
        p = gluon.Parameter(name.replace(".", "_"), shape=value.shape)
        p.initialize(ctx=devices)
        p.set_data(mx.np.array(value))
        p.wd_mult = 0.0 if is_no_decay(name) else 1.0
        params[name] = p
    optimizer = TorchAdam(learning_rate=lrs[0], beta1=0.9, beta2=0.999, epsilon=1e-8,
                          wd=weight_decay, decoupled=kind == "adamw")
    trainer = gluon.Trainer(list(params.values()), optimizer, kvstore="device",
                            update_on_kvstore=False)

    tensors = {n: torch.tensor(v, requires_grad=True) for n, v in init.items()}
    groups = [{"params": [t for n, t in tensors.items() if not is_no_decay(n)]},
              {"params": [t for n, t in tensors.items() if is_no_decay(n)], "weight_decay": 0.0}]
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    reference = cls(groups, lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)

    for step_grads, lr in zip(grads, lrs):
        for ctx in devices:  # each device's gradient is its share; the kvstore sums them
            with autograd.record():
                total = sum((params[n].data(ctx) * mx.np.array(g / len(devices), ctx=ctx)).sum()
                            for n, g in step_grads.items())
            total.backward()
        for name, g in step_grads.items():
            tensors[name].grad = torch.tensor(g)
        trainer.set_learning_rate(lr)
        trainer.step(1)
        for group in reference.param_groups:
            group["lr"] = lr
        reference.step()
    for name, p in params.items():
        expected = tensors[name].detach().numpy()
        for replica in p.list_data():
            np.testing.assert_allclose(replica.asnumpy(), expected, rtol=1e-6, atol=1e-6,
                                       err_msg=name)


def test_clip_grad_norm_equals_torch(no_stubs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    values = [rng.normal(size=s).astype(np.float32) for s in ((4, 3), (3,), (2, 2, 2))]
    params = []
    for i, v in enumerate(values):
        p = gluon.Parameter(f"p{i}", shape=v.shape)
        p.initialize(ctx=TWO_CPUS)
        for g in p.list_grad():
            g[:] = mx.np.array(v)
        params.append(p)
    tensors = [torch.zeros(v.shape, requires_grad=True) for v in values]
    for t, v in zip(tensors, values):
        t.grad = torch.tensor(v)
    for max_norm in (1.0, 100.0):
        clip_grad_norm(params, max_norm)
        torch.nn.utils.clip_grad_norm_(tensors, max_norm)
        for p, t in zip(params, tensors):
            for g in p.list_grad():
                np.testing.assert_allclose(g.asnumpy(), t.grad.numpy(), rtol=1e-6)


def test_optimizer_excludes_biases_and_layer_norm_from_decay(mxb):
    net = build(mxb, devices=[mx.cpu()])
    mxb.create_optimizer(net, OptimizerSettings(optimizer="adamw", weight_decay=0.1))
    for name, param in net.canonical_parameters().items():
        assert param.wd_mult == (0.0 if is_no_decay(name) else 1.0), name


def test_optimizer_state_before_the_first_step(mxb):
    net = build(mxb, devices=TWO_CPUS)
    opt = mxb.create_optimizer(net, OptimizerSettings())
    state = mxb.optimizer_state(opt)
    assert int(state["step"]) == 0
    assert np.abs(state["mlm.decoder.weight.exp_avg"]).sum() == 0
    with pytest.raises(ValueError, match="step"):
        mxb.load_optimizer_state(opt, {k: v for k, v in state.items() if k != "step"})


# -- model layout, devices, the book's API --------------------------------------------------------

def test_parameters_follow_the_canonical_layout():
    config = tiny_config()
    net = BERTModel.from_config(config)
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())  # shapes known before any forward pass
    assert net.config == config
    shapes = {name: p.shape for name, p in net.canonical_parameters().items()}
    assert list(shapes) == list(parameter_shapes(config))
    assert shapes == parameter_shapes(config)


def test_book_constructor_and_imperative_call():
    net = bmx.BERTModel(VOCAB, num_hiddens=HIDDEN, ffn_num_hiddens=64, num_heads=2,
                        num_layers=2, dropout=0.2)
    net.initialize(mx.init.Xavier(), ctx=bmx.try_all_gpus())
    assert net.config.max_len == 1000
    tokens, segments = mx.np.array([[2, 7, 9, 3]]), mx.np.array([[0, 0, 0, 0]])
    encoded, mlm, nsp = net(tokens, segments, mx.np.array([4.0]))
    assert encoded.shape == (1, 4, HIDDEN) and mlm is None and nsp.shape == (1, 2)


def test_devices(mxb):
    assert bmx.try_all_gpus() == [mx.cpu()]
    assert bmx.try_gpu() == mx.cpu()
    assert mxb.parse_devices(None) == bmx.try_all_gpus()
    assert mxb.parse_devices("cpu") == [mx.cpu()]
    assert mxb.parse_devices("cpu:0,cpu:1") == TWO_CPUS
    assert mxb.parse_devices("cpu:0,1") == TWO_CPUS
    assert mxb.parse_devices(TWO_CPUS) == TWO_CPUS
    assert mxb.describe_devices([mx.cpu()]) == "[cpu(0)]"
    if mx.context.num_gpus() == 0:
        for spec in ("gpu", "gpu:0,1", "cuda:0", [mx.gpu(0)]):
            with pytest.raises(DeviceError, match="no GPU"):
                mxb.parse_devices(spec)
    for spec in ("tpu", "cpu:x", "cpu:0,cpu:0", "", 3):
        with pytest.raises(DeviceError):
            mxb.parse_devices(spec)


def test_info(mxb):
    info = mxb.info()
    assert tuple(info) == INFO_KEYS
    assert info["framework"] == "mxnet" and info["version"] == mx.__version__
    features = info["build"]["features"]
    assert "DIST_KVSTORE" in features and "CUDA" in features
    assert info["gpus"] == mx.context.num_gpus()


@pytest.mark.parametrize("env, expected", [({}, "cores"), ({"MXNET_OMP_MAX_THREADS": "1"}, "1"),
                                           ({"OMP_NUM_THREADS": "1"}, None)])
def test_cpu_threads_default_to_the_physical_cores(env, expected):
    """MXNet would use half the logical CPUs; importing the backend first makes it all the
    physical cores, unless the user chose."""
    import os
    import subprocess

    clean = {k: v for k, v in os.environ.items()
             if k not in ("MXNET_OMP_MAX_THREADS", "OMP_NUM_THREADS")}
    code = ("import os, bertlite.backends.mxnet as m; "
            "print(os.environ.get('MXNET_OMP_MAX_THREADS'), m._physical_cores())")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env={**clean, **env},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    value, cores = (None if out[0] == "None" else out[0]), out[1]
    assert value == (cores if expected == "cores" else expected)


def test_load_data_wiki_gives_mxnet_batches(tmp_path):
    train_iter, vocab = bmx.load_data_wiki(16, 32, corpus="sample")
    batch = next(iter(train_iter))
    assert len(batch) == 7 and all(isinstance(a, mx.np.ndarray) for a in batch)
    assert [str(a.dtype) for a in batch] == ["int32", "int32", "float32", "int32", "float32",
                                             "int32", "int32"]
    shards = gluon.utils.split_and_load(batch[0], TWO_CPUS, even_split=False)
    assert sum(s.shape[0] for s in shards) == 16
    assert len(vocab) > 10


# -- (4) the book's MXNet tab, unchanged ----------------------------------------------------------

def book_cells(path: Path) -> list[str]:
    """The MXNet tab: untagged ``{.python .input}`` cells and ``#@tab all`` cells."""
    cells = re.findall(r"```\{\.python \.input\}\n(.*?)```", path.read_text(encoding="utf-8"),
                       flags=re.S)
    keep = []
    for cell in cells:
        tag = re.match(r"\s*#@tab (\S+)", cell)
        if tag is None or tag.group(1) == "all":
            keep.append(cell)
    return keep


@pytest.mark.slow
def test_the_book_mxnet_tab_runs_unchanged(wikitext_train_dir, monkeypatch, capsys, no_stubs):
    if not BOOK.is_file():
        pytest.skip(f"the book chapter is not at {BOOK}")
    monkeypatch.setenv("BERTLITE_DATA", str(wikitext_train_dir.parent))
    cells = book_cells(BOOK)
    assert any("train_bert(train_iter" in c for c in cells)
    source = "\n".join(cells)
    assert "from d2l import mxnet as d2l" in source
    source = source.replace("from d2l import mxnet as d2l",
                            "from bertlite.backends import mxnet as d2l")
    source, n_steps = re.subn(r"(train_bert\(train_iter, net, loss, len\(vocab\), devices, )50\)",
                              r"\g<1>2)", source)
    source, n_batch = re.subn(r"batch_size, max_len = 512, 64", "batch_size, max_len = 48, 64",
                              source)
    assert n_steps == 1 and n_batch == 1
    namespace: dict = {"__name__": "book"}
    exec(compile(source, str(BOOK), "exec"), namespace)  # noqa: S102 - the book's own code
    printed = capsys.readouterr().out
    assert re.search(r"MLM loss \d+\.\d{3}, NSP loss \d+\.\d{3}", printed), printed
    assert re.search(r"\d+\.\d sentence pairs/sec on \[cpu\(0\)\]", printed), printed
    assert namespace["encoded_text"].shape == (1, 6, 128)
    assert namespace["encoded_text_cls"].shape == (1, 128)
    assert namespace["encoded_text_crane"][0][:3].shape == (3,)
    assert namespace["encoded_pair"].shape == (1, 10, 128)
    assert namespace["encoded_pair_cls"].shape == (1, 128)
    # the polysemous "crane" is encoded differently in another context
    assert not np.allclose(namespace["encoded_text_crane"].asnumpy(),
                           namespace["encoded_pair_crane"].asnumpy())


# -- (5) accumulation, precision, non-finite losses, several processes ---------------------------

SETTINGS = {
    "adam": OptimizerSettings(lr=1e-3),
    "adamw-clip": OptimizerSettings(lr=1e-3, optimizer="adamw", weight_decay=0.1, clip_norm=0.5),
}


def _train(mxb, devices, batches, settings, **options):
    net = build(mxb, devices=devices)
    opt = mxb.create_optimizer(net, settings)
    losses = [[float(x) for x in mxb.train_step(net, opt, b, settings.lr, **options)]
              for b in batches]
    return net, opt, losses


def _assert_same_weights(w, reference, lr, steps, rtol=1e-4, atol=2e-5):
    for name, value in reference.items():
        if name.endswith("attention.W_k.bias"):  # zero gradient in exact arithmetic: see above
            assert np.abs(w[name] - value).max() <= 2 * steps * lr, name
            continue
        np.testing.assert_allclose(w[name], value, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("settings", list(SETTINGS.values()), ids=list(SETTINGS))
@pytest.mark.parametrize("accumulate", [2, 3])
def test_accumulation_over_two_devices_gives_the_update_of_the_whole_batch(mxb, settings,
                                                                           accumulate):
    """K micro-batches, each over two devices, every one normalized by the whole batch, then
    one update: the losses and weights of one pass over the whole batch on one device (dropout
    0). (One device: tests/test_scale.py, for every mxb.)"""
    devices = TWO_CPUS
    batches = [batch_of(n=9, seed=s) for s in range(3)]
    one, opt1, l1 = _train(mxb, [mx.cpu()], batches, settings)
    acc, opt2, l2 = _train(mxb, devices, batches, settings, accumulate=accumulate)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    _assert_same_weights(mxb.state_dict(acc), mxb.state_dict(one), settings.lr, 3)
    assert int(mxb.optimizer_state(opt2)["step"]) == 3
    for name, param in acc.canonical_parameters().items():  # the replicas stay equal
        replicas = [d.asnumpy() for d in param.list_data()]
        np.testing.assert_array_equal(replicas[0], replicas[1], err_msg=name)


@pytest.mark.parametrize("rows, accumulate", [(3, 2), (3, 4), (2, 3)])
def test_micro_batches_shorter_than_the_device_list(mxb, rows, accumulate):
    """Parts with fewer rows than devices run on the first devices only (an idle device adds a
    zero gradient); empty parts are skipped."""
    settings = SETTINGS["adam"]
    batches = [batch_of(n=rows, seed=s) for s in range(2)]
    one, _, l1 = _train(mxb, [mx.cpu()], batches, settings)
    acc, _, l2 = _train(mxb, TWO_CPUS, batches, settings, accumulate=accumulate)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    _assert_same_weights(mxb.state_dict(acc), mxb.state_dict(one), settings.lr, 2)


def test_accumulation_leaves_loss_and_grads_exact(mxb):
    """After training with accumulate (grad_req "add"), loss_and_grads still gives the
    gradient of one batch, not a sum with old ones."""
    net, _, _ = _train(mxb, [mx.cpu()], [batch_of(n=6)], SETTINGS["adam"], accumulate=2)
    batch = batch_of(n=7, seed=4)
    first = mxb.loss_and_grads(net, batch)
    second = mxb.loss_and_grads(net, batch)
    assert first[:2] == second[:2]
    for name, g in first[2].items():
        np.testing.assert_array_equal(second[2][name], g, err_msg=name)


def _poisoned(batch: Batch, row: int) -> Batch:
    weights = batch.mlm_weights.copy()
    weights[row, 0] = np.nan
    return batch._replace(mlm_weights=weights)


def test_skip_nonfinite_over_devices_and_micro_batches(mxb):
    """A NaN loss (in one micro-batch, on one of two devices) skips the update: weights,
    optimizer state and step count stay, every device's gradients are cleared, the NaN is
    returned; training then goes on as if the step had never been. (One device:
    tests/test_scale.py.)"""
    accumulate = 3
    settings = SETTINGS["adamw-clip"]
    good = [batch_of(n=9, seed=s) for s in range(2)]
    net, opt, _ = _train(mxb, TWO_CPUS, good[:1], settings, accumulate=accumulate)
    before, state = mxb.state_dict(net), mxb.optimizer_state(opt)
    mlm, nsp = mxb.train_step(net, opt, _poisoned(good[1], row=8), settings.lr,
                                  accumulate=accumulate, skip_nonfinite=True)
    assert not np.isfinite(float(mlm)) and np.isfinite(float(nsp))
    after = mxb.state_dict(net)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    for name, value in mxb.optimizer_state(opt).items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    for param in net.collect_params().values():
        for g in param.list_grad():
            assert not g.asnumpy().any(), param.name
    # the next step is the one an uninterrupted run takes
    loss = [float(x) for x in mxb.train_step(net, opt, good[1], settings.lr,
                                                 accumulate=accumulate, skip_nonfinite=True)]
    ref, _, ref_losses = _train(mxb, [mx.cpu()], good, settings)
    np.testing.assert_allclose(loss, ref_losses[1], rtol=1e-5)
    _assert_same_weights(mxb.state_dict(net), mxb.state_dict(ref), settings.lr, 2)


def test_without_skip_a_nonfinite_loss_is_returned(mxb):
    net, opt, _ = _train(mxb, [mx.cpu()], [], SETTINGS["adam"])
    mlm, _ = mxb.train_step(net, opt, _poisoned(batch_of(), row=0), 1e-3)
    assert np.isnan(float(mlm))


def _graph_json(graph) -> str:
    return graph._cached_graph[1].tojson(remove_amp_cast=False)


def test_bf16_runs_the_dense_layers_in_bfloat16(mxb):
    """precision="bf16": every Dense product in bfloat16 (amp_cast nodes in the compiled loss
    graph), float32 weights, gradients and optimizer state; losses and weights near float32."""
    if not mx_step._cpu_computes_bfloat16():
        pytest.skip("oneDNN has no bfloat16 kernels for this CPU (it lacks AVX-512)")
    settings = SETTINGS["adam"]
    batches = [batch_of(n=9, seed=s) for s in range(3)]
    fp32, _, l32 = _train(mxb, [mx.cpu()], batches, settings)
    bf16, opt, l16 = _train(mxb, TWO_CPUS, batches, settings, precision="bf16",
                            accumulate=2)
    # the first step starts from the same weights; after it, Adam's first steps (about lr
    # times the gradient's sign) let the runs drift apart, NSP on 9 examples most
    np.testing.assert_allclose(l16[0], l32[0], rtol=5e-3)
    assert l16[0] != l32[0]  # it did compute in lower precision
    np.testing.assert_allclose(np.array(l16)[:, 0], np.array(l32)[:, 0], rtol=1e-2)
    assert np.isfinite(l16).all()
    graph = _graph_json(fast.loss_graph(bf16, "bfloat16").graph)
    assert graph.count('"op": "amp_cast"') >= 4 * 16 and "bfloat16" in graph
    assert "amp_cast" not in _graph_json(fast.loss_graph(fp32))
    for name, param in bf16.canonical_parameters().items():
        assert np.dtype(param.dtype) == np.float32, name
        assert all(g.dtype == np.float32 for g in param.list_grad()), name
    w16, w32 = mxb.state_dict(bf16), mxb.state_dict(fp32)
    for name, value in w32.items():
        assert np.isfinite(w16[name]).all()
        if not name.endswith("attention.W_k.bias"):
            assert np.abs(w16[name] - value).max() <= 3 * 2 * settings.lr, name
    assert mxb.optimizer_state(opt)["mlm.decoder.weight.exp_avg"].dtype == np.float32


def test_accumulation_through_amp_cast_keeps_every_gradient(mxb, monkeypatch):
    """The low-precision graph's ``amp_cast`` nodes (casting to float32 here, so that any CPU
    runs them) with accumulate=2 give the losses and weights of accumulate=1. (Issue 19:
    ``amp_cast``'s backward ignored ``grad_req="add"`` and the Dense layers got no gradient.)"""
    monkeypatch.setitem(mx_step.PRECISION_PLANS, "bf16",
                        mx_step.PrecisionPlan("bf16", "float32", False, None))
    settings = SETTINGS["adam"]
    batches = [batch_of(n=9, seed=s) for s in range(3)]
    one, _, l1 = _train(mxb, [mx.cpu()], batches, settings, precision="bf16")
    acc, _, l2 = _train(mxb, [mx.cpu()], batches, settings, precision="bf16", accumulate=2)
    assert _graph_json(fast.loss_graph(acc, "float32").graph).count('"op": "amp_cast"') >= 64
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    _assert_same_weights(mxb.state_dict(acc), mxb.state_dict(one), settings.lr, 3)


def test_precision_errors_name_what_works(mxb):
    with pytest.raises(BackendError, match="fp16.*GPU.*bf16"):
        mxb.check_train_options([mx.cpu()], precision="fp16")
    with pytest.raises(BackendError, match="bf16.*CPU.*fp16"):
        mxb.check_train_options([mx.gpu(0)], precision="bf16")
    # the values are checked in the core (bertlite.options), the devices' part here
    with pytest.raises(OptionError, match="precision must be one of"):
        mxb.check_train_options([mx.cpu()], precision="int8")
    with pytest.raises(OptionError, match="accumulate must be a positive integer"):
        mxb.check_train_options([mx.cpu()], accumulate=0)
    if mx_step._cpu_computes_bfloat16():
        mxb.check_train_options(TWO_CPUS, accumulate=4, precision="bf16",
                                    skip_nonfinite=True)
    else:
        with pytest.raises(BackendError, match="bf16.*AVX-512.*float32"):
            mxb.check_train_options(TWO_CPUS, precision="bf16")
    net = build(mxb, devices=[mx.cpu()])
    opt = mxb.create_optimizer(net, SETTINGS["adam"])
    with pytest.raises(ValueError, match="fp16.*GPU"):
        mxb.train_step(net, opt, batch_of(), 1e-3, precision="fp16")


@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_loss_scaling_gives_the_unscaled_update_and_skips_overflows(mxb, monkeypatch,
                                                                    clip_norm):
    """fp16's dynamic loss scaling, exercised in float32 on the CPU: scaled by a power of two,
    the update is the unscaled one; an overflow skips the update and halves the scale."""
    monkeypatch.setitem(mx_step.PRECISION_PLANS, "fp16",
                        mx_step.PrecisionPlan("fp16", None, True, None))
    settings = OptimizerSettings(lr=1e-3, clip_norm=clip_norm)
    batches = [batch_of(n=9, seed=s) for s in range(3)]
    ref, _, l1 = _train(mxb, [mx.cpu()], batches, settings)
    net = build(mxb, devices=[mx.cpu()])
    opt = mxb.create_optimizer(net, settings)
    assert opt.loss_scale == 2.0**16
    before = mxb.state_dict(net)
    # non-finite gradients (here from a NaN in the data; in float16, from a scale too large)
    mlm, _ = mxb.train_step(net, opt, _poisoned(batches[0], row=3), settings.lr,
                                precision="fp16")
    assert np.isnan(float(mlm))
    assert opt.loss_scale == 2.0**15 and int(mxb.optimizer_state(opt)["step"]) == 0
    for name, value in mxb.state_dict(net).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    opt.loss_scale = 2.0**10
    losses = [[float(x) for x in mxb.train_step(net, opt, b, settings.lr, precision="fp16")]
              for b in batches]
    np.testing.assert_allclose(losses, l1, rtol=1e-6)
    _assert_same_weights(mxb.state_dict(net), mxb.state_dict(ref), settings.lr, 3,
                         rtol=1e-5, atol=1e-6)
    assert opt.loss_scale == 2.0**10 and opt.good_steps == 3


def test_one_process_is_the_main_one(mxb, monkeypatch):
    monkeypatch.delenv("DMLC_ROLE", raising=False)
    assert mxb.is_main_process() and mxb.any_process(True) is True
    assert mxb.any_process(False) is False
    assert mxb.num_replicas(TWO_CPUS) == 2
    assert mxb.free_memory([mx.cpu()]) is None
    assert mxb.info()["distributed"] == "no (one process)"


def test_distributed_environment(monkeypatch):
    env = {"DMLC_ROLE": "worker", "DMLC_NUM_WORKER": "2", "DMLC_PS_ROOT_URI": "127.0.0.1",
           "DMLC_PS_ROOT_PORT": "9000", "DMLC_NUM_SERVER": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.env_kvstore_type() == "dist_sync"
    monkeypatch.setenv("BERTLITE_MXNET_KVSTORE", "dist_device_sync")
    assert distributed.env_kvstore_type() == "dist_device_sync"
    monkeypatch.setenv("BERTLITE_MXNET_KVSTORE", "dist_async")
    with pytest.raises(DeviceError, match="dist_sync, dist_device_sync"):
        distributed.env_kvstore_type()
    monkeypatch.delenv("BERTLITE_MXNET_KVSTORE")
    monkeypatch.delenv("DMLC_PS_ROOT_URI")
    with pytest.raises(DeviceError, match="DMLC_PS_ROOT_URI not set.*bertlite.launch"):
        distributed.env_kvstore_type()
    monkeypatch.setenv("DMLC_NUM_WORKER", "1")
    assert distributed.env_kvstore_type() is None  # one worker: no distributed kvstore
    monkeypatch.setenv("DMLC_ROLE", "server")
    assert distributed.env_kvstore_type() is None


def test_dist_sync_without_the_feature_is_a_clear_error(monkeypatch):
    for key, value in {"DMLC_ROLE": "worker", "DMLC_NUM_WORKER": "2",
                       "DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": "9000",
                       "DMLC_NUM_SERVER": "1"}.items():
        monkeypatch.setenv(key, value)

    class NoDist:
        def is_enabled(self, name):
            return name != "DIST_KVSTORE"

    monkeypatch.setattr(mx.runtime, "Features", NoDist)
    monkeypatch.setattr(distributed, "_kvstore", None)
    with pytest.raises(DeviceError, match="DIST_KVSTORE.*dist_sync"):
        distributed.get_kvstore()
    with pytest.raises(DeviceError, match="DIST_KVSTORE"):
        bmx.MXNetBackend().is_main_process()
