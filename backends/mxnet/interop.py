"""The book's own MXNet model (d2l 0.17.6 ``d2l.mxnet.BERTModel``) into bertlite, and back.

``from_d2l(net, vocab=None, *, devices=None)`` reads a ``BERTModel`` built, and possibly
trained, with the MXNet tab of the book (``net.initialize(init.Xavier(), ctx=devices)``), and
returns a :class:`bertlite.model.Pretrained` of this backend with the same weights: same
``(encoded_X, mlm_Y_hat, nsp_Y_hat)`` as the d2l model in predict mode (any call outside
``autograd.record()``), to float32 rounding. From there the model trains with
:meth:`~bertlite.backend.Backend.train_step`, saves as a bertlite checkpoint and loads in any
backend. ``to_d2l(pretrained)`` goes back: a d2l ``BERTModel`` holding the weights of a bertlite
model of *either* backend. ``read_d2l(net)`` is the first half of ``from_d2l``: the config and
the weights under the canonical names of :mod:`bertlite.params`. ``from_d2l`` is also
``bertlite.backends.mxnet.from_d2l``; the rest is imported from this module.

The config is read from the parameter shapes (``vocab_size``, ``num_hiddens``,
``ffn_num_hiddens``, ``num_layers``, ``max_len``), ``num_heads`` from
``net.encoder.blks[0].attention.num_heads`` and ``dropout`` from the first block's ``AddNorm``.
Parameters are found by their structured Gluon names (``net._collect_params_with_prefix()``,
not the global ``dense12_weight`` names, which depend on what else the process built) and map
one to one (the PyTorch module :mod:`bertlite.backends.torch.interop` does the same for the
PyTorch tab)::

    d2l (MXNet tab)                  bertlite
    ....ln.gamma / ....ln.beta       ....ln.weight / ....ln.bias   (every LayerNorm)
    mlm.mlp.0.{weight,bias}          mlm.dense.{weight,bias}       (Dense with activation relu)
    mlm.mlp.1.{gamma,beta}           mlm.ln.{weight,bias}
    mlm.mlp.2.{weight,bias}          mlm.decoder.{weight,bias}
    everything else                  the same name

Gluon ``Dense`` weights are ``(units, in_units)``, the canonical ``(out, in)``: no transpose.
d2l's MXNet ``MultiHeadAttention`` is built with ``use_bias=True`` by ``BERTEncoder`` (as in the
PyTorch tab), so ``W_q/W_k/W_v/W_o`` have biases, as bertlite's. Every canonical parameter must be
filled exactly once with its shape; anything missing, unexpected or misshapen is a ValueError
naming it. Something that is not a d2l ``BERTModel`` (a ``Dense``, a PyTorch module, bertlite's
own ``BERTModel``) is a TypeError.

``vocab``: the vocabulary the d2l model was trained with (d2l's ``Vocab``, a
:class:`bertlite.Vocab`, or the list of tokens, index 0 ``<unk>``); its size must be the
model's. It is optional: without it the returned ``Pretrained`` has ``vocab=None``, which
encodes token ids (``pretrained.backend.encode(pretrained.model, ids, segments, valid_lens)``,
``backend.forward``) and trains, but cannot ``encode`` text nor be saved as a checkpoint (a
checkpoint holds its ``vocab.txt``): pass the vocabulary for those.

Quirks of d2l 0.17.6's MXNet ``BERTModel``, handled here:

* Shapes are inferred on the first forward pass (``Dense`` and ``LayerNorm`` without
  ``in_units``/``in_channels``): a model that was initialized but never called has parameters
  of unknown shape, and from_d2l asks for one forward pass first (a ValueError). ``to_d2l``
  gives every parameter its full shape before ``initialize``, so it is usable at once.
* The positional embedding is a ``Parameter`` read with ``.data(ctx)``, which MXNet does train
  (unlike the PyTorch tab's ``.data``); it is imported as it is.
* The masked softmax fills scores of padded keys with -1e6 before the softmax; bertlite adds
  -1e6 to them instead, which gives those keys exactly zero weight too (exp(-1e6 - max) is 0
  in float32): the same outputs (rows with ``valid_len`` 0, which d2l would spread uniformly
  over the padding, never occur in BERT inputs).
* The book's notebooks run ``npx.set_np()`` first, and d2l's MXNet code needs it (numpy
  arrays); importing this backend sets it too, for the whole process.
* LayerNorm epsilon is Gluon's default 1e-5, bertlite's too; ``Dense(..., activation=...)``
  applies ReLU / tanh inside the layer, as bertlite does after it.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import mxnet as mx
import numpy as onp
from mxnet import gluon
from mxnet import np as mnp

from bertlite.config import BERTConfig
from bertlite.interop import (
    build_pretrained,
    canonical_arrays,
    check_book_flavour,
    check_d2l_layout,
    d2l_num_heads,
    infer_config,
)
from bertlite.model import Pretrained
from bertlite.params import check_state_dict, parameter_shapes

__all__ = ["from_d2l", "read_d2l", "to_d2l"]

#: the framework of this module's d2l tab (``d2l.mxnet``) and of the backend it builds
FRAMEWORK = "mxnet"
#: d2l name prefixes that differ from the canonical ones, and what they become
D2L_PREFIXES = {"mlm.mlp.0.": "mlm.dense.", "mlm.mlp.1.": "mlm.ln.", "mlm.mlp.2.": "mlm.decoder."}
#: Gluon LayerNorm parameter names and their canonical names
D2L_SUFFIXES = {"gamma": "weight", "beta": "bias"}
_GLUON_SUFFIXES = {v: k for k, v in D2L_SUFFIXES.items()}
_LN_PARENTS = ("addnorm1.ln", "addnorm2.ln", "mlm.ln")


def canonical_name(d2l_name: str) -> str:
    """The canonical name of a structured d2l Gluon parameter name (``mlm.mlp.1.gamma`` ->
    ``mlm.ln.weight``); other names are returned as they are."""
    for old, new in D2L_PREFIXES.items():
        if d2l_name.startswith(old):
            d2l_name = new + d2l_name[len(old):]
            break
    head, _, last = d2l_name.rpartition(".")
    return f"{head}.{D2L_SUFFIXES[last]}" if head and last in D2L_SUFFIXES else d2l_name


def d2l_name(canonical: str) -> str:
    """The structured d2l Gluon name of a canonical parameter name (the inverse of
    :func:`canonical_name`)."""
    head, _, last = canonical.rpartition(".")
    if head.endswith(_LN_PARENTS) and last in _GLUON_SUFFIXES:
        canonical = f"{head}.{_GLUON_SUFFIXES[last]}"
    for old, new in D2L_PREFIXES.items():
        if canonical.startswith(new):
            return old + canonical[len(new):]
    return canonical


def _check_d2l_net(net: Any) -> gluon.Block:
    """The d2l BERTModel, or a TypeError."""
    if not isinstance(net, gluon.Block):
        torch = sys.modules.get("torch")
        hint = (" (a PyTorch module: use bertlite.backends.torch.from_d2l)"
                if torch is not None and isinstance(net, torch.nn.Module) else "")
        raise TypeError(f"from_d2l needs d2l's MXNet BERTModel (a gluon.Block), got "
                        f"{type(net).__name__}{hint}")
    from .model import BERTModel

    if isinstance(net, BERTModel):
        raise TypeError("this is already bertlite's BERTModel; from_d2l imports the book's "
                        "d2l.mxnet.BERTModel (wrap a bertlite model in bertlite.Pretrained, or "
                        "save and load it)")
    check_d2l_layout(net, "mxnet")
    return net


def _dropout(net: gluon.Block) -> float:
    p = getattr(getattr(net.encoder.blks[0].addnorm1, "dropout", None), "_rate", None)
    return float(p) if isinstance(p, (int, float)) else BERTConfig.dropout


def _value(name: str, param: gluon.Parameter) -> onp.ndarray:
    """A parameter's value as float32 numpy; a ValueError while its shape is still unknown."""
    try:
        ctx = param.list_ctx()[0]
        return param.data(ctx).asnumpy().astype(onp.float32, copy=True)
    except gluon.parameter.DeferredInitializationError:
        raise ValueError(f"the d2l model's parameter {name} has no shape yet {param.shape}: "
                         "MXNet infers shapes on the first forward pass; call the model once "
                         "(e.g. on one batch) before from_d2l") from None
    except RuntimeError as err:
        raise ValueError(f"the d2l model's parameter {name} is not initialized ({err}); call "
                         "net.initialize(init.Xavier()) and run it once before from_d2l") from None


def read_d2l(net: Any) -> tuple[BERTConfig, dict[str, onp.ndarray]]:
    """The config and the float32 weights, under canonical names, of d2l's MXNet
    ``BERTModel``; every canonical parameter exactly once with its shape, else a ValueError."""
    net = _check_d2l_net(net)
    named = {name: _value(name, p) for name, p in net._collect_params_with_prefix().items()}
    arrays = canonical_arrays(named, canonical_name, d2l_name)
    config = infer_config(arrays, d2l_num_heads(net), _dropout(net))
    check_state_dict(arrays, config, "the d2l model (canonical names)")
    return config, arrays


def from_d2l(net: Any, vocab: Any = None, *, devices: Any = None) -> Pretrained:
    """A bertlite model of this backend with the weights of d2l's MXNet ``BERTModel``.

    ``vocab``: the model's vocabulary (d2l's ``Vocab``, a :class:`bertlite.Vocab` or a token
    list), needed to encode text and to save a checkpoint; None gives ``vocab=None`` (token
    ids only). ``devices``: where the bertlite model lives (a backend device spec); default the
    contexts the d2l model's parameters live on. See the module docstring for d2l's quirks.
    """
    config, arrays = read_d2l(net)
    if devices is None:
        first = next(iter(_check_d2l_net(net)._collect_params_with_prefix().values()))
        devices = list(first.list_ctx())
    return build_pretrained(FRAMEWORK, config, arrays, vocab, devices)


def _d2l_module(d2l: ModuleType | None) -> ModuleType:
    if d2l is not None:
        return d2l
    try:
        return importlib.import_module(f"d2l.{FRAMEWORK}")
    except Exception as err:
        raise ImportError(f"to_d2l needs the book's code, d2l 0.17.6 (pip install --no-deps "
                          f"d2l==0.17.6), importable as d2l.{FRAMEWORK} ({type(err).__name__}: "
                          f"{err}); or pass the imported module as d2l=") from err


def to_d2l(pretrained: Pretrained, d2l: ModuleType | None = None) -> gluon.Block:
    """d2l's MXNet ``BERTModel`` (of ``d2l``, default ``import d2l.mxnet``) with the weights of
    a bertlite model of any backend, initialized on the bertlite model's devices when they are
    MXNet contexts, else on the CPU; every parameter has its shape, so it runs at once."""
    if not isinstance(pretrained, Pretrained):
        raise TypeError(f"to_d2l needs a bertlite.Pretrained (what from_d2l, bertlite.train or "
                        f"bertlite.load return), got {type(pretrained).__name__}")
    check_book_flavour(pretrained.config)
    d2l = _d2l_module(d2l)
    c = pretrained.config
    net = d2l.BERTModel(c.vocab_size, c.num_hiddens, c.ffn_num_hiddens, c.num_heads,
                        c.num_layers, c.dropout, c.max_len)
    arrays = pretrained.state_dict()
    check_state_dict(arrays, c, "the bertlite model")
    params = net._collect_params_with_prefix()
    shapes = parameter_shapes(c)
    names = {d2l_name(n): n for n in shapes}
    if set(names) != set(params):  # pragma: no cover - another d2l version
        raise ValueError(f"this d2l's BERTModel has other parameters than d2l 0.17.6's: "
                         f"{sorted(set(names) ^ set(params))}")
    for name, param in params.items():
        param.shape = shapes[names[name]]  # fills the dimensions d2l leaves to inference
    ctx = [d for d in pretrained.devices if isinstance(d, mx.Context)] or [mx.cpu()]
    net.initialize(ctx=ctx)
    for name, param in params.items():
        param.set_data(mnp.array(onp.ascontiguousarray(arrays[names[name]], dtype=onp.float32),
                                 dtype="float32", ctx=ctx[0]))
    return net
