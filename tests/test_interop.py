"""The book's own BERTModel (d2l 0.17.6, PyTorch and MXNet tabs), trained a few steps with the
book's loss and Adam, imported with ``from_d2l``: same outputs as the d2l model, trains, saves
as a bertlite checkpoint that loads in the other framework, and goes back with ``to_d2l``."""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
from helpers import make_batch

import bertlite
from bertlite.config import BERTConfig
from bertlite.data.loader import Batch
from bertlite.optim import OptimizerSettings
from bertlite.params import parameter_shapes
from conftest import framework_installed, import_d2l, skip_unless_backend

FRAMEWORKS = ["torch", "mxnet"]
OTHER = {"torch": "mxnet", "mxnet": "torch"}
VOCAB_SIZE, HIDDEN, FFN, HEADS, LAYERS, DROPOUT, MAX_LEN = 200, 32, 64, 2, 2, 0.1, 64
CONFIG = BERTConfig(vocab_size=VOCAB_SIZE, num_hiddens=HIDDEN, ffn_num_hiddens=FFN,
                    num_heads=HEADS, num_layers=LAYERS, dropout=DROPOUT, max_len=MAX_LEN)
RESERVED = ["<pad>", "<mask>", "<cls>", "<sep>"]
WORDS = [f"w{i}" for i in range(VOCAB_SIZE - 1 - len(RESERVED))]
TEXT_A, TEXT_B = "w3 w17 w42 nonsense w8", "w99 w100"
TOL = dict(rtol=1e-5, atol=1e-5)


# -- the book's model in each tab: build, train 3 steps of the book's loss, run ------------------

class TorchTab:
    @staticmethod
    def build(d2l, seed: int = 0):
        import torch

        torch.manual_seed(seed)
        h = HIDDEN
        return d2l.BERTModel(VOCAB_SIZE, h, [h], h, FFN, HEADS, LAYERS, DROPOUT,
                             max_len=MAX_LEN, key_size=h, query_size=h, value_size=h,
                             hid_in_features=h, mlm_in_features=h, nsp_in_features=h)

    @staticmethod
    def inputs(batch: Batch) -> list:
        import torch

        return [torch.from_numpy(a).long() if a.dtype == np.int32 else torch.from_numpy(a)
                for a in batch]

    @classmethod
    def train(cls, d2l, net, batches, lr: float = 0.01):
        """The book's PyTorch train_bert step: CrossEntropyLoss, Adam, dropout on."""
        import torch
        from torch import nn

        loss, trainer = nn.CrossEntropyLoss(), torch.optim.Adam(net.parameters(), lr=lr)
        net.train()
        for batch in batches:
            trainer.zero_grad()
            _, _, total = d2l._get_batch_loss_bert(net, loss, VOCAB_SIZE, *cls.inputs(batch))
            total.backward()
            trainer.step()
        return net.eval()

    @classmethod
    def outputs(cls, net, batch) -> list[np.ndarray]:
        import torch

        net.eval()
        tokens, segments, valid_lens, positions = cls.inputs(batch)[:4]
        with torch.no_grad():
            return [o.numpy() for o in net(tokens, segments, valid_lens, positions)]

    @staticmethod
    def pos_embedding(net) -> np.ndarray:
        return net.encoder.pos_embedding.detach().numpy().copy()


class MXNetTab:
    @staticmethod
    def build(d2l, seed: int = 0, run: bool = True):
        import mxnet as mx
        from mxnet import init, npx

        npx.set_np()  # the first line of every MXNet notebook of the book
        mx.random.seed(seed)
        net = d2l.BERTModel(VOCAB_SIZE, HIDDEN, FFN, HEADS, LAYERS, DROPOUT, MAX_LEN)
        net.initialize(init.Xavier())
        if run:  # shapes are inferred on the first forward pass
            MXNetTab.outputs(net, make_batch(VOCAB_SIZE, 2, 20, seed=9))
        return net

    @staticmethod
    def inputs(batch: Batch) -> list:
        from mxnet import np as mnp

        return [mnp.array(a, dtype=a.dtype) for a in batch]

    @classmethod
    def train(cls, d2l, net, batches, lr: float = 0.01):
        """The book's MXNet train_bert step: SoftmaxCELoss, Trainer('adam'), step(1)."""
        from mxnet import autograd, gluon

        loss = gluon.loss.SoftmaxCELoss()
        trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": lr})
        for batch in batches:
            shards = [[a] for a in cls.inputs(batch)]
            with autograd.record():
                _, _, ls = d2l._get_batch_loss_bert(net, loss, VOCAB_SIZE, *shards)
            for total in ls:
                total.backward()
            trainer.step(1)
        return net

    @classmethod
    def outputs(cls, net, batch) -> list[np.ndarray]:
        tokens, segments, valid_lens, positions = cls.inputs(batch)[:4]
        return [o.asnumpy() for o in net(tokens, segments, valid_lens, positions)]

    @staticmethod
    def pos_embedding(net) -> np.ndarray:
        return net.encoder.pos_embedding.data().asnumpy().copy()


TABS = {"torch": TorchTab, "mxnet": MXNetTab}


def interop(framework: str):
    skip_unless_backend(framework)
    return importlib.import_module(f"bertlite.backends.{framework}.interop")


@pytest.fixture(scope="module", params=FRAMEWORKS)
def book(request):
    """(framework, d2l module, d2l's Vocab, the d2l model after 3 training steps, its
    positional embedding before training)."""
    framework = request.param
    d2l = import_d2l(framework)
    interop(framework)
    tab = TABS[framework]
    net = tab.build(d2l)
    pos_before = tab.pos_embedding(net)
    tab.train(d2l, net, [make_batch(VOCAB_SIZE, 8, 20, seed=s) for s in range(3)])
    vocab = d2l.Vocab(WORDS, reserved_tokens=RESERVED)
    return framework, d2l, vocab, net, pos_before


@pytest.fixture(scope="module")
def imported(book):
    framework, d2l, vocab, net, _ = book
    return interop(framework).from_d2l(net, vocab)


def test_names_map_one_to_one(book):
    module = interop(book[0])
    canonical = list(parameter_shapes(CONFIG))
    d2l_names = [module.d2l_name(n) for n in canonical]
    assert len(set(d2l_names)) == len(canonical)
    assert [module.canonical_name(n) for n in d2l_names] == canonical
    net_names = (dict(book[3].named_parameters()) if book[0] == "torch"
                 else book[3]._collect_params_with_prefix())
    assert set(d2l_names) == set(net_names)


def test_imported_model_gives_the_d2l_outputs(book, imported):
    framework, d2l, vocab, net, pos_before = book
    tab = TABS[framework]
    assert imported.config == CONFIG
    assert imported.backend.name == framework
    assert imported.vocab.idx_to_token == vocab.idx_to_token
    pos_after = tab.pos_embedding(net)
    if framework == "torch":  # read through .data: never trained, still torch.randn
        np.testing.assert_array_equal(pos_after, pos_before)
    else:  # a Parameter MXNet trains
        assert not np.allclose(pos_after, pos_before)
    np.testing.assert_array_equal(imported.state_dict()["encoder.pos_embedding"], pos_after)
    batch = make_batch(VOCAB_SIZE, 7, 24, preds=4, seed=5)
    ours = imported.backend.forward(imported.model, batch)
    ref = tab.outputs(net, batch)
    for name, a, b in zip(("encoded_X", "mlm_Y_hat", "nsp_Y_hat"), ours, ref):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, **TOL, err_msg=name)
    # text through the vocabulary: the d2l model on the same ids
    tokens = ["<cls>", *TEXT_A.split(), "<sep>", *TEXT_B.split(), "<sep>"]
    ids = np.asarray([vocab[tokens]], dtype=np.int32)
    segments = np.asarray([[0] * 7 + [1] * 3], dtype=np.int32)
    one = Batch(ids, segments, np.asarray([10.0], np.float32), np.zeros((1, 1), np.int32),
                np.ones((1, 1), np.float32), np.zeros((1, 1), np.int32), np.zeros(1, np.int32))
    np.testing.assert_allclose(imported.encode(TEXT_A, TEXT_B), tab.outputs(net, one)[0], **TOL)


def test_without_a_vocab_encodes_token_ids(book, imported):
    framework, _, _, net, _ = book
    bare = interop(framework).from_d2l(net)
    assert bare.vocab is None and bare.config == CONFIG
    batch = make_batch(VOCAB_SIZE, 3, 20, seed=2)
    np.testing.assert_allclose(
        bare.backend.encode(bare.model, batch.tokens, batch.segments, batch.valid_lens),
        TABS[framework].outputs(net, batch)[0], **TOL)


def test_imported_model_trains_saves_and_loads(book, tmp_path):
    framework, _, vocab, net, _ = book
    model = interop(framework).from_d2l(net, vocab)  # its own copy: this test trains it
    backend = model.backend
    before = model.state_dict()
    optimizer = backend.create_optimizer(model.model, OptimizerSettings(lr=1e-3))
    for seed in range(2):
        batch = make_batch(VOCAB_SIZE, 8, 20, seed=seed)
        mlm, nsp = backend.train_step(model.model, optimizer, batch, 1e-3)
        assert np.isfinite(float(mlm)) and np.isfinite(float(nsp))
    after = model.state_dict()
    assert not np.allclose(after["mlm.decoder.weight"], before["mlm.decoder.weight"])
    bertlite.save(model, tmp_path / "ckpt")
    loaded = bertlite.load(tmp_path / "ckpt")
    assert loaded.backend.name == framework and loaded.config == CONFIG
    assert loaded.vocab == model.vocab
    for name, value in after.items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value, err_msg=name)
    np.testing.assert_allclose(loaded.encode(TEXT_A, TEXT_B), model.encode(TEXT_A, TEXT_B), **TOL)


@pytest.mark.every_env  # both frameworks: the env testing each runs it
def test_checkpoint_of_an_imported_model_loads_in_the_other_backend(book, imported, tmp_path):
    framework = book[0]
    skip_unless_backend(OTHER[framework])
    imported.save(tmp_path / "ckpt")
    other = bertlite.load(tmp_path / "ckpt", backend=OTHER[framework])
    assert other.backend.name == OTHER[framework]
    np.testing.assert_allclose(other.encode(TEXT_A, TEXT_B), imported.encode(TEXT_A, TEXT_B),
                               **TOL)
    np.testing.assert_allclose(other.encode(TEXT_A), imported.encode(TEXT_A), **TOL)


def test_to_d2l_gives_back_the_same_model(book, imported):
    framework, d2l, _, net, _ = book
    back = interop(framework).to_d2l(imported, d2l)
    assert type(back) is type(net)
    batch = make_batch(VOCAB_SIZE, 5, 20, seed=7)
    for a, b in zip(TABS[framework].outputs(back, batch), TABS[framework].outputs(net, batch)):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.every_env  # both frameworks: the env testing each runs it
def test_d2l_model_moves_to_the_other_tab(book, imported):
    """One model, two frameworks: the book's model of one tab, through bertlite, is the book's
    model of the other tab with the same outputs."""
    framework, _, _, net, _ = book
    other = OTHER[framework]
    if not framework_installed(other):
        pytest.skip(f"{other} is not installed")
    other_d2l = import_d2l(other)
    moved = interop(other).to_d2l(imported, other_d2l)
    batch = make_batch(VOCAB_SIZE, 5, 20, seed=8)
    for a, b in zip(TABS[other].outputs(moved, batch), TABS[framework].outputs(net, batch)):
        np.testing.assert_allclose(a, b, **TOL)
    # and back in: the other tab's model imports to the same weights
    again = interop(other).from_d2l(moved)
    for name, value in imported.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name], value, err_msg=name)


# -- what is not a d2l BERTModel -----------------------------------------------------------------

def test_wrong_objects_raise_clear_errors(book):
    framework, d2l, vocab, net, _ = book
    module = interop(framework)
    if framework == "torch":
        from torch import nn

        from bertlite.backends.torch.model import BERTModel

        not_bert, ours = nn.Linear(4, 4), BERTModel.from_config(CONFIG, seed=0)
    else:
        from mxnet.gluon import nn

        from bertlite.backends.mxnet.model import BERTModel

        not_bert, ours = nn.Dense(4, in_units=4), BERTModel.from_config(CONFIG)
    with pytest.raises(TypeError, match="not d2l's BERTModel"):
        module.from_d2l(not_bert)
    with pytest.raises(TypeError, match="already bertlite's BERTModel"):
        module.from_d2l(ours)
    with pytest.raises(TypeError, match="gluon.Block|nn.Module"):
        module.from_d2l("bert.params")
    with pytest.raises(ValueError, match=r"vocabulary has 11 tokens .* 200 rows"):
        module.from_d2l(net, ["<unk>", *WORDS[:10]])
    with pytest.raises(TypeError, match="vocab must be"):
        module.from_d2l(net, 200)
    with pytest.raises(TypeError, match="bertlite.Pretrained"):
        module.to_d2l(net, d2l)
    other = OTHER[framework]
    if framework_installed(other):
        with pytest.raises(TypeError, match=f"use bertlite.backends.{framework}.from_d2l"):
            interop(other).from_d2l(net)


def test_missing_and_unexpected_parameters_are_named(book):
    framework, d2l, _, net, _ = book
    module = interop(framework)
    if framework == "torch":
        from torch import nn

        missing = copy.deepcopy(net)
        missing.mlm.mlp[3] = nn.Identity()  # no decoder
        extra = copy.deepcopy(net)
        extra.extra = nn.Linear(2, 2)
        no_bias = TorchTab.build(d2l)
        no_bias.encoder.blks[1].attention.W_k = nn.Linear(HIDDEN, HIDDEN, bias=False)
    else:
        from mxnet import init
        from mxnet.gluon import nn

        missing = MXNetTab.build(d2l)
        missing.mlm.mlp = nn.Sequential()  # no MLM head at all
        missing.mlm.mlp.add(nn.Dense(HIDDEN, flatten=False, in_units=HIDDEN))
        missing.mlm.mlp.initialize(init.Xavier())
        extra = MXNetTab.build(d2l)
        extra.extra = nn.Dense(2, in_units=2)
        extra.extra.initialize()
        no_bias = MXNetTab.build(d2l)
        no_bias.encoder.blks[1].attention.W_k = nn.Dense(HIDDEN, use_bias=False, flatten=False,
                                                         in_units=HIDDEN)
        no_bias.encoder.blks[1].attention.W_k.initialize()
    with pytest.raises(ValueError, match=r"missing \['mlm\.ln\.weight'|missing .*mlm\.decoder"):
        module.from_d2l(missing)
    with pytest.raises(ValueError, match=r"unexpected \['extra\.weight', 'extra\.bias'\]"):
        module.from_d2l(extra)
    with pytest.raises(ValueError, match=r"missing \['encoder\.blks\.1\.attention\.W_k\.bias'\]"):
        module.from_d2l(no_bias)


def test_mxnet_model_must_have_run_once():
    d2l = import_d2l("mxnet")
    module = interop("mxnet")
    net = MXNetTab.build(d2l, run=False)
    with pytest.raises(ValueError, match="first forward pass"):
        module.from_d2l(net)
    MXNetTab.outputs(net, make_batch(VOCAB_SIZE, 2, 20))
    assert module.from_d2l(net).config == CONFIG
