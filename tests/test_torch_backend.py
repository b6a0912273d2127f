"""What only the PyTorch backend has: SDPA attention, the book's PyTorch tab
running unchanged on ``bertlite.backends.torch``, torch devices."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
from helpers import make_batch, tiny_config

from bertlite.backend import INFO_KEYS
from bertlite.config import BERTConfig
from bertlite.errors import DeviceError
from bertlite.loss import bert_loss_numpy
from bertlite.optim import OptimizerSettings
from bertlite.params import init_params, parameter_shapes
from bertlite.registry import get_backend
from conftest import REPO, import_d2l, skip_unless_backend

skip_unless_backend("torch")  # before importing torch: a skip with the pip hint, not an error

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bertlite.backends import torch as d2l_api  # noqa: E402
from bertlite.backends.torch import fast as torch_fast  # noqa: E402
from bertlite.backends.torch import model as torch_model  # noqa: E402
from bertlite.backends.torch import step as torch_step  # noqa: E402
from bertlite.backends.torch.devices import parse_devices, try_all_gpus, try_gpu  # noqa: E402

CHAPTER = REPO.parent / "shared" / "seed" / "bert-pretraining.ko.md"
BOOK_KWARGS = dict(num_hiddens=128, norm_shape=[128], ffn_num_input=128, ffn_num_hiddens=256,
                   num_heads=2, num_layers=2, dropout=0.2, key_size=128, query_size=128,
                   value_size=128, hid_in_features=128, mlm_in_features=128,
                   nsp_in_features=128)


@pytest.fixture
def torch_backend():  # not the shared `backend` fixture, which runs every backend in turn
    return get_backend("torch")


def reference_attention(q, k, v, valid_lens):
    """Attention written out with a masked softmax (keys at or beyond valid_len get -1e6)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    keys = torch.arange(scores.shape[-1])
    padded = keys[None, :] >= valid_lens.reshape(-1, 1)
    scores = scores.masked_fill(padded[:, None, None, :], -1e6)
    return torch.softmax(scores, dim=-1) @ v


# -- attention and dropout ----------------------------------------------------------------------

def test_sdpa_attention_equals_manual_masked_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 12, 16) for _ in range(3))
    valid_lens = torch.tensor([12.0, 5.0, 1.0, 9.0])
    expected = reference_attention(q, k, v, valid_lens)
    mask = torch_model.attention_mask(valid_lens, 12, torch.float32)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    manual = torch_model.masked_softmax_attention(q, k, v, mask)
    assert (sdpa - expected).abs().max() < 1e-6
    assert (manual - expected).abs().max() < 1e-6


def test_multi_head_attention_module_matches_reference():
    torch.manual_seed(1)
    attention = torch_model.MultiHeadAttention(32, 4, dropout=0.1).eval()
    X = torch.randn(3, 10, 32)
    valid_lens = torch.tensor([10, 4, 7])
    mask = torch_model.attention_mask(valid_lens, 10, X.dtype)
    with torch.no_grad():
        out = attention(X, X, X, mask)
        heads = [attention._heads(W(X)) for W in (attention.W_q, attention.W_k, attention.W_v)]
        expected = attention.W_o(reference_attention(*heads, valid_lens).transpose(1, 2)
                                 .flatten(2))
        cross = attention(X, X.clone(), X.clone(), mask)  # the unfused projections
    assert (out - expected).abs().max() < 1e-6
    assert (cross - expected).abs().max() < 1e-6


def test_training_attention_path_equals_sdpa_without_dropout():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 8, 4, requires_grad=True) for _ in range(3))
    mask = torch_model.attention_mask(torch.tensor([8, 3]), 8, torch.float32)
    manual = torch_model.masked_softmax_attention(q, k, v, mask, nn.Dropout(0.0))
    grads = torch.autograd.grad(manual.square().sum(), (q, k, v))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    sdpa_grads = torch.autograd.grad(sdpa.square().sum(), (q, k, v))
    assert (manual - sdpa).abs().max() < 1e-6
    for a, b in zip(grads, sdpa_grads):
        assert (a - b).abs().max() < 1e-5


# -- the model ----------------------------------------------------------------------------------

def test_book_signature_and_canonical_names():
    net = d2l_api.BERTModel(500, **BOOK_KWARGS, seed=0)
    assert net.config == BERTConfig(vocab_size=500, num_hiddens=128, ffn_num_hiddens=256,
                                    num_heads=2, num_layers=2, dropout=0.2, max_len=1000)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == parameter_shapes(net.config)
    for name, value in init_params(net.config, 0).items():
        np.testing.assert_array_equal(net.state_dict()[name].numpy(), value)
    from_config = d2l_api.BERTModel.from_config(net.config, seed=0)
    assert from_config.config == net.config
    assert torch.equal(from_config.mlm.decoder.weight, net.mlm.decoder.weight)


def test_inconsistent_book_sizes_raise():
    with pytest.raises(ValueError, match="ffn_num_input=100, key_size=64"):
        d2l_api.BERTModel(100, num_hiddens=128, ffn_num_input=100, key_size=64)
    with pytest.raises(ValueError, match="norm_shape"):
        d2l_api.BERTModel(100, num_hiddens=32, norm_shape=[64])
    with pytest.raises(ValueError, match="divisible"):
        d2l_api.BERTModel(100, num_hiddens=30, num_heads=4)
    # The book's positional BERTEncoder arguments.
    encoder = d2l_api.BERTEncoder(100, 32, [32], 32, 64, 2, 1, 0.1, 50, 32, 32, 32)
    assert encoder.pos_embedding.shape == (1, 50, 32) and len(encoder.blks) == 1
    with pytest.raises(ValueError, match="BERTEncoder: norm_shape=16"):
        d2l_api.BERTEncoder(100, 32, [16])


def test_positional_embedding_trains_through_the_module():
    net = d2l_api.BERTModel(100, num_hiddens=16, ffn_num_hiddens=32, num_heads=2,
                            num_layers=1, dropout=0.0, max_len=20, seed=0)
    tokens = torch.randint(0, 100, (2, 6))
    _, mlm, nsp = net(tokens, torch.zeros_like(tokens), torch.tensor([6, 4]),
                      torch.tensor([[1, 2], [1, 3]]))
    (mlm.sum() + nsp.sum()).backward()
    assert net.encoder.pos_embedding.grad is not None
    assert net.encoder.pos_embedding.grad[0, :6].abs().sum() > 0


def _import_book_torch():
    return import_d2l("torch")


def test_same_outputs_as_the_books_model():
    book = _import_book_torch()
    torch.manual_seed(0)
    ref = book.BERTModel(300, max_len=64, **{**BOOK_KWARGS, "num_hiddens": 32,
                                              "norm_shape": [32], "ffn_num_input": 32,
                                              "ffn_num_hiddens": 64, "key_size": 32,
                                              "query_size": 32, "value_size": 32,
                                              "hid_in_features": 32, "mlm_in_features": 32,
                                              "nsp_in_features": 32})
    ours = d2l_api.BERTModel(300, num_hiddens=32, ffn_num_hiddens=64, num_heads=2,
                             num_layers=2, dropout=0.2, max_len=64, seed=4)
    renamed = {"hidden.weight": "hidden.0.weight", "hidden.bias": "hidden.0.bias",
               "mlm.dense.weight": "mlm.mlp.0.weight", "mlm.dense.bias": "mlm.mlp.0.bias",
               "mlm.ln.weight": "mlm.mlp.2.weight", "mlm.ln.bias": "mlm.mlp.2.bias",
               "mlm.decoder.weight": "mlm.mlp.3.weight", "mlm.decoder.bias": "mlm.mlp.3.bias"}
    ref.load_state_dict({renamed.get(k, k): v for k, v in ours.state_dict().items()})
    ref.eval(), ours.eval()
    tokens = torch.randint(0, 300, (4, 16))
    segments = (torch.arange(16) >= 8).long().expand(4, 16)
    valid_lens = torch.tensor([16.0, 9.0, 12.0, 5.0])
    positions = torch.tensor([[1, 2, 3], [4, 5, 0], [1, 7, 9], [2, 3, 0]])
    with torch.no_grad():
        for a, b in zip(ours(tokens, segments, valid_lens, positions),
                        ref(tokens, segments, valid_lens, positions)):
            assert (a - b).abs().max() < 1e-5


def test_sparse_mlm_training_loss_equals_the_full_forward():
    """train_step runs the MLM head only at weighted slots; loss and gradients are the same."""
    config = tiny_config()
    model = torch_model.BERTModel.from_config(config, seed=0).eval()
    batch = make_batch()
    tensors = torch_step.to_tensors(batch, torch.device("cpu"))
    sparse = torch_step.batch_loss(model, tensors)
    sparse[2].backward()
    sparse_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, mlm, nsp = model(tensors.tokens, tensors.segments, tensors.valid_lens,
                        tensors.pred_positions)
    full = d2l_api._get_batch_loss_bert(model, nn.CrossEntropyLoss(), config.vocab_size,
                                        *tensors)
    full[2].backward()
    expected = bert_loss_numpy(mlm.detach().numpy(), batch.mlm_labels, batch.mlm_weights,
                               nsp.detach().numpy(), batch.nsp_labels)
    for a, b, c in zip(sparse, full, expected):
        assert a.item() == pytest.approx(c, rel=1e-6)
        assert b.item() == pytest.approx(c, rel=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(sparse_grads[name], p.grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_packed_training_path_equals_the_plain_one(num_layers):
    """Training on the CPU packs the valid tokens, computes the last layer only at the
    predicted positions and <cls> and fuses the MLM decoder with its loss: the same losses,
    gradients and (at the rows asked for) encodings as the padded path."""
    config = BERTConfig(vocab_size=tiny_config().vocab_size, num_hiddens=32,
                        ffn_num_hiddens=64, num_heads=2, num_layers=num_layers, dropout=0.0,
                        max_len=64)
    model = torch_model.BERTModel.from_config(config, seed=0).train()
    tensors = torch_step.to_tensors(make_batch(seed=3), torch.device("cpu"))
    assert torch_fast.packs(model, tensors.tokens, tensors.valid_lens)
    length = tensors.tokens.shape[1]
    rows = torch.tensor([0, 5, length + 3, 3 * length + 2])  # valid positions of make_batch
    results = []
    for fast in (True, False):
        model.fast = fast
        model.zero_grad()
        losses = torch_step.batch_loss(model, tensors)
        losses[2].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            encoded = torch_fast.sparse_encodings(model, tensors.tokens, tensors.segments,
                                                  tensors.valid_lens, rows)[0]
        results.append(([float(x.detach()) for x in losses], grads, encoded))
    (fast, fast_grads, fast_rows), (plain, plain_grads, plain_rows) = results
    assert fast == pytest.approx(plain, rel=1e-5)
    assert fast_rows.shape == (4, 32)
    torch.testing.assert_close(fast_rows, plain_rows, rtol=1e-4, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    short = int(torch.nonzero(tensors.valid_lens < length)[0])  # an example with padding
    pad = short * length + int(tensors.valid_lens[short])  # its first padded position
    model.fast = True
    with torch.no_grad():
        padded = torch_fast.sparse_encodings(model, tensors.tokens, tensors.segments,
                                             tensors.valid_lens, torch.tensor([pad, 0]))[0]
    assert padded[0].abs().sum() == 0 and padded[1].abs().sum() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_sparse_forward_gives_the_full_forward_outputs(fast, dropout):
    """fast.sparse_forward (MXNet's function of the same name and meaning) computes the last
    layer only at <cls> and the predicted positions: the MLM and NSP logits of the model's
    forward pass, and their gradients, on uneven valid lengths; with dropout, the same masks
    given to both."""
    from bertlite.dropout import encoder_masks

    config = tiny_config(dropout=dropout, num_layers=3)
    model = torch_model.BERTModel.from_config(config, seed=2, fast=fast).train()
    tensors = torch_step.to_tensors(make_batch(seed=4), torch.device("cpu"))
    assert torch_fast.packs(model, tensors.tokens, tensors.valid_lens) == fast
    length = tensors.tokens.shape[1]
    masks = [{site: torch.from_numpy(m) for site, m in layer.items()}  # none when dropout 0
             for layer in encoder_masks(config, 3, 0, 0, len(tensors.tokens), length)] or None
    outputs = []
    for function in (_forward_outputs, torch_fast.sparse_forward):
        model.zero_grad()
        mlm_Y_hat, nsp_Y_hat = function(model, tensors.tokens, tensors.segments,
                                         tensors.valid_lens, tensors.pred_positions, masks)
        (mlm_Y_hat.square().mean() + nsp_Y_hat.square().mean()).backward()
        outputs.append((mlm_Y_hat.detach(), nsp_Y_hat.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (mlm, nsp, grads), (sparse_mlm, sparse_nsp, sparse_grads) = outputs
    assert sparse_mlm.shape == (8, 3, config.vocab_size) and sparse_nsp.shape == (8, 2)
    torch.testing.assert_close(sparse_mlm, mlm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_nsp, nsp, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():  # (the key bias's gradient is 0 up to round-off)
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-4,
                                   atol=1e-6 * max(1.0, float(grad.abs().max())), msg=name)


def _forward_outputs(model, tokens, segments, valid_lens, pred_positions, masks):
    """``(mlm_Y_hat, nsp_Y_hat)`` of the model's own (full) forward pass."""
    return model(tokens, segments, valid_lens, pred_positions, masks=masks)[1:]


# -- the backend --------------------------------------------------------------------------------

def test_train_step_returns_detached_scalars(torch_backend):
    config = tiny_config(dropout=0.1)
    model = torch_backend.build_model(config, torch_backend.parse_devices("cpu"))
    optimizer = torch_backend.create_optimizer(model, OptimizerSettings(clip_norm=1.0))
    mlm, nsp = torch_backend.train_step(model, optimizer, make_batch(), 0.003)
    for value in (mlm, nsp):
        assert isinstance(value, torch.Tensor) and value.dim() == 0
        assert not value.requires_grad
        assert math.isfinite(float(value))
    assert all(g["lr"] == 0.003 for g in optimizer.param_groups)
    assert optimizer.clip_norm == 1.0


def test_weight_decay_groups(torch_backend):
    model = torch_backend.build_model(tiny_config(), torch_backend.parse_devices("cpu"))
    optimizer = torch_backend.create_optimizer(model, OptimizerSettings(optimizer="adamw",
                                                                 weight_decay=0.05))
    assert isinstance(optimizer, torch_step.TorchOptimizer)
    assert isinstance(optimizer.optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "mlm.ln.weight" in no_decay["param_names"]
    assert "encoder.blks.0.attention.W_q.bias" in no_decay["param_names"]
    assert "encoder.pos_embedding" in decay["param_names"]
    assert "mlm.decoder.weight" in decay["param_names"]
    plain = torch_backend.create_optimizer(model, OptimizerSettings()).optimizer
    assert isinstance(plain, torch.optim.Adam) and not isinstance(plain, torch.optim.AdamW)


def test_forward_restores_the_mode_and_needs_no_grad(torch_backend):
    model = torch_backend.build_model(tiny_config(dropout=0.5), torch_backend.parse_devices("cpu"))
    assert model.training
    first = torch_backend.forward(model, make_batch())
    second = torch_backend.forward(model, make_batch())
    assert model.training
    for a, b in zip(first, second):  # dropout off: deterministic
        np.testing.assert_array_equal(a, b)
    empty = make_batch()._replace(pred_positions=np.zeros((8, 0), np.int32),
                                  mlm_weights=np.zeros((8, 0), np.float32),
                                  mlm_labels=np.zeros((8, 0), np.int32))
    assert torch_backend.forward(model, empty)[1].shape == (8, 0, tiny_config().vocab_size)


def test_seed_fixes_dropout(torch_backend):
    net = torch_backend.build_model(tiny_config().replace(dropout=0.5), [torch.device("cpu")])
    opt = torch_backend.create_optimizer(net, OptimizerSettings())
    state = {k: v.copy() for k, v in torch_backend.state_dict(net).items()}
    losses = []
    for seed in (7, 7, 8):
        torch_backend.load_state_dict(net, state)
        losses.append(float(torch_backend.train_step(net, opt, make_batch(), 1e-9,
                                                     seed=seed)[0]))
    assert losses[0] == losses[1] != losses[2]


def test_info(torch_backend):
    info = torch_backend.info()
    assert tuple(info) == INFO_KEYS
    assert info["framework"] == "torch" and info["version"] == torch.__version__
    assert info["threads"].startswith(f"{torch.get_num_threads()} (")
    assert isinstance(info["build"]["cuda_available"], bool)
    assert info["distributed"] == "no (one process)" or "WORLD_SIZE" in os.environ


# -- devices ------------------------------------------------------------------------------------

def test_parse_devices_on_the_cpu():
    cpu = torch.device("cpu")
    assert parse_devices("cpu") == [cpu]
    assert parse_devices("CPU:0") == [cpu]
    assert parse_devices([cpu]) == [cpu]
    assert try_gpu() == (torch.device("cuda:0") if torch.cuda.is_available() else cpu)
    assert parse_devices(None) == try_all_gpus()
    for spec, match in (("tpu", "cannot parse"), ("cpu:1", "one CPU device"),
                        ("cpu,cpu", "twice"), ("", "no device"), ([1.5], "cannot use")):
        with pytest.raises(DeviceError, match=match):
            parse_devices(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages without a GPU")
def test_gpus_asked_for_where_there_are_none():
    assert try_all_gpus() == [torch.device("cpu")]
    for spec in ("cuda", "gpu:0", "cuda:0,1", [0], [torch.device("cuda:1")]):
        with pytest.raises(DeviceError, match="no CUDA GPU") as err:
            parse_devices(spec)
        assert "cpu" in str(err.value)
    with pytest.raises(DeviceError):
        get_backend("torch").build_model(tiny_config(), ["cpu", "cpu"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_data_parallel_model(torch_backend):
    devices = parse_devices("cuda:0,1")
    model = torch_backend.build_model(tiny_config(), devices)
    assert isinstance(model, nn.DataParallel)
    torch_backend.load_state_dict(model, init_params(tiny_config(), 1))
    assert list(torch_backend.state_dict(model)) == list(parameter_shapes(tiny_config()))
    optimizer = torch_backend.create_optimizer(model, OptimizerSettings())
    mlm, nsp = torch_backend.train_step(model, optimizer, make_batch(), 0.01)
    assert math.isfinite(float(mlm)) and math.isfinite(float(nsp))


# -- the book's PyTorch tab ---------------------------------------------------------------------

def test_d2l_names_and_data_types(monkeypatch):
    for name in ("BERTModel", "BERTEncoder", "MaskLM", "NextSentencePred", "load_data_wiki",
                 "try_all_gpus", "Timer", "Accumulator", "Animator", "get_tokens_and_segments",
                 "_get_batch_loss_bert", "TorchBackend"):
        assert hasattr(d2l_api, name), name
    train_iter, vocab = d2l_api.load_data_wiki(16, 32, corpus="sample")
    batch = next(iter(train_iter))
    assert len(batch) == 7
    assert [t.dtype for t in batch] == [torch.int64, torch.int64, torch.float32, torch.int64,
                                        torch.float32, torch.int64, torch.int64]
    assert batch[0].shape == (16, 32)
    assert torch.tensor(vocab[["<cls>", "<sep>"]]).dtype == torch.int64


def book_cells(path):
    """The code of the chapter's ``#@tab pytorch`` and ``#@tab all`` cells, in order."""
    cells = re.findall(r"```\{\.python \.input\}\n(.*?)```", path.read_text(encoding="utf-8"),
                       flags=re.S)
    return [c for c in cells if c.lstrip().startswith(("#@tab pytorch", "#@tab all"))]


@pytest.mark.slow
def test_parse_devices_joins_no_process_group():
    """Under torchrun's environment parse_devices only parses; the trainer joins the process
    group with setup_processes (before, parse_devices joined it and waited for the other
    rank here)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    code = ("import torch.distributed as dist; from bertlite.registry import get_backend; "
            "be = get_backend('torch'); d = be.parse_devices('cpu'); "
            "print(d, be.describe_devices(d), dist.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split("\n")[0]
    assert out == "[device(type='cpu')] [device(type='cpu')] x 2 processes False"


def test_the_books_pytorch_tab_runs_unchanged(wikitext_train_dir, monkeypatch, capsys):
    if not CHAPTER.is_file():
        pytest.skip(f"the book chapter is not at {CHAPTER}")
    cells = book_cells(CHAPTER)
    assert len(cells) == 9
    edits = {"from d2l import torch as d2l": "from bertlite.backends import torch as d2l",
             "batch_size, max_len = 512, 64": "batch_size, max_len = 64, 64",
             "train_bert(train_iter, net, loss, len(vocab), devices, 50)":
                 "train_bert(train_iter, net, loss, len(vocab), devices, 2)"}
    source = "\n".join(cells)
    for old, new in edits.items():
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    monkeypatch.setenv("BERTLITE_DATA", str(wikitext_train_dir.parent))
    namespace = {"__name__": "book"}
    torch.manual_seed(0)
    exec(compile(source, "<the book's PyTorch tab>", "exec"), namespace)

    printed = capsys.readouterr().out
    assert re.search(r"MLM loss \d+\.\d{3}, NSP loss \d+\.\d{3}", printed)
    assert re.search(r"[\d.]+ sentence pairs/sec on \[device\(type='cpu'\)\]", printed) or \
        "sentence pairs/sec on [device(type='cuda'" in printed
    assert tuple(namespace["encoded_text"].shape) == (1, 6, 128)
    assert tuple(namespace["encoded_text_cls"].shape) == (1, 128)
    assert tuple(namespace["encoded_pair"].shape) == (1, 10, 128)
    assert tuple(namespace["encoded_pair_crane"][0][:3].shape) == (3,)
    assert len(namespace["vocab"]) > 1000

    # The chapter's own _get_batch_loss_bert (mean-reduced, unmasked MLM loss) runs against
    # our model; d2l._get_batch_loss_bert gives the masked loss of the core formula.
    net, loss = namespace["net"], namespace["loss"]
    batch = next(iter(namespace["train_iter"]))
    book_losses = namespace["_get_batch_loss_bert"](net, loss, len(namespace["vocab"]), *batch)
    assert all(math.isfinite(float(x.detach())) for x in book_losses)
    net.eval()
    with torch.no_grad():
        ours = d2l_api._get_batch_loss_bert(net, loss, len(namespace["vocab"]), *batch)
        _, mlm, nsp = net(batch[0], batch[1], batch[2], batch[3])
    expected = bert_loss_numpy(mlm.numpy(), batch[5].numpy(), batch[4].numpy(), nsp.numpy(),
                               batch[6].numpy())
    assert float(ours[0]) == pytest.approx(expected[0], rel=1e-5)
    assert float(ours[1]) == pytest.approx(expected[1], rel=1e-5)
