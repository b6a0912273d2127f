"""The book's own PyTorch model (d2l 0.17.6 ``d2l.torch.BERTModel``) into bertlite, and back.

``from_d2l(net, vocab=None, *, devices=None)`` reads a ``BERTModel`` built, and possibly
trained, with the PyTorch tab of the book, and returns a :class:`bertlite.model.Pretrained` of
this backend with the same weights: same ``(encoded_X, mlm_Y_hat, nsp_Y_hat)`` as the d2l model
in eval mode (``net.eval()``), to float32 rounding. From there the model trains with
:meth:`~bertlite.backend.Backend.train_step`, saves as a bertlite checkpoint and loads in any
backend. ``to_d2l(pretrained)`` goes back: a d2l ``BERTModel`` holding the weights of a bertlite
model of *either* backend. ``read_d2l(net)`` is the first half of ``from_d2l``: the config and
the weights under the canonical names of :mod:`bertlite.params`. ``from_d2l`` is also
``bertlite.backends.torch.from_d2l``; the rest is imported from this module.

The config is read from the parameter shapes (``vocab_size``, ``num_hiddens``,
``ffn_num_hiddens``, ``num_layers``, ``max_len``), ``num_heads`` from
``net.encoder.blks[0].attention.num_heads`` and ``dropout`` from the first block's ``AddNorm``.
Names map one to one (the Gluon module :mod:`bertlite.backends.mxnet.interop` does the same for
the MXNet tab); only the heads are laid out differently::

    d2l (PyTorch tab)                bertlite
    hidden.0.{weight,bias}           hidden.{weight,bias}       (nn.Sequential(Linear, Tanh))
    mlm.mlp.0.{weight,bias}          mlm.dense.{weight,bias}
    mlm.mlp.2.{weight,bias}          mlm.ln.{weight,bias}        (mlp.1 is the ReLU)
    mlm.mlp.3.{weight,bias}          mlm.decoder.{weight,bias}
    everything else                  the same name

Every canonical parameter must be filled exactly once with its shape; anything missing,
unexpected or misshapen is a ValueError naming it. Something that is not a d2l ``BERTModel``
(an ``nn.Linear``, a Gluon block, bertlite's own ``BERTModel``) is a TypeError.

``vocab``: the vocabulary the d2l model was trained with (d2l's ``Vocab``, a
:class:`bertlite.Vocab`, or the list of tokens, index 0 ``<unk>``); its size must be the
model's. It is optional: without it the returned ``Pretrained`` has ``vocab=None``, which
encodes token ids (``pretrained.backend.encode(pretrained.model, ids, segments, valid_lens)``,
``backend.forward``) and trains, but cannot ``encode`` text nor be saved as a checkpoint (a
checkpoint holds its ``vocab.txt``): pass the vocabulary for those.

Quirks of d2l 0.17.6's PyTorch ``BERTModel``, handled here:

* The positional embedding is ``nn.Parameter(torch.randn(1, max_len, num_hiddens))`` read
  through ``.data``: it gets no gradient, so however long the d2l model trained, it is still
  the random N(0, 1) draw of its constructor. It is imported as it is (that is what the d2l
  model adds to its inputs); in bertlite it is a trained parameter from then on, and
  ``to_d2l`` writes the trained value back (where d2l again will not train it).
* Its masked softmax fills scores of padded keys with -1e6 before the softmax; bertlite adds
  -1e6 too (:data:`bertlite.backends.torch.model.MASK_VALUE`), so the outputs are the same,
  also for the padded positions (their encodings are computed, and compared, as well).
* ``key_size``, ``query_size``, ``value_size``, ``ffn_num_input``, ``hid_in_features``,
  ``mlm_in_features`` and ``nsp_in_features`` default to 768 in d2l's signature; a model built
  with any of them other than ``num_hiddens`` cannot run and is refused by the shape check.
  ``to_d2l`` passes them all as ``num_hiddens`` (and ``norm_shape=[num_hiddens]``).
* d2l's ``MaskLM`` indexes with a CPU ``batch_idx``; bertlite's gathers on the model's device.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

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

#: the framework of this module's d2l tab (``d2l.torch``) and of the backend it builds
FRAMEWORK = "torch"
#: d2l name prefixes that differ from the canonical ones, and what they become
D2L_PREFIXES = {"hidden.0.": "hidden.", "mlm.mlp.0.": "mlm.dense.", "mlm.mlp.2.": "mlm.ln.",
                "mlm.mlp.3.": "mlm.decoder."}


def canonical_name(d2l_name: str) -> str:
    """The canonical name of a d2l PyTorch parameter name (``mlm.mlp.3.weight`` ->
    ``mlm.decoder.weight``); other names are returned as they are."""
    for old, new in D2L_PREFIXES.items():
        if d2l_name.startswith(old):
            return new + d2l_name[len(old):]
    return d2l_name


def d2l_name(canonical: str) -> str:
    """The d2l PyTorch name of a canonical parameter name (the inverse of
    :func:`canonical_name`)."""
    for old, new in D2L_PREFIXES.items():
        if canonical.startswith(new):
            return old + canonical[len(new):]
    return canonical


def _check_d2l_net(net: Any) -> nn.Module:
    """The d2l BERTModel itself (unwrapped from ``nn.DataParallel``), or a TypeError."""
    if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        net = net.module
    if not isinstance(net, nn.Module):
        mxnet = sys.modules.get("mxnet")
        hint = (" (a Gluon block: use bertlite.backends.mxnet.from_d2l)"
                if mxnet is not None and isinstance(net, mxnet.gluon.Block) else "")
        raise TypeError(f"from_d2l needs d2l's PyTorch BERTModel (an nn.Module), got "
                        f"{type(net).__name__}{hint}")
    from .model import BERTModel

    if isinstance(net, BERTModel):
        raise TypeError("this is already bertlite's BERTModel; from_d2l imports the book's "
                        "d2l.torch.BERTModel (wrap a bertlite model in bertlite.Pretrained, or "
                        "save and load it)")
    check_d2l_layout(net, "torch")
    return net


def _dropout(net: nn.Module) -> float:
    p = getattr(getattr(net.encoder.blks[0].addnorm1, "dropout", None), "p", None)
    return float(p) if isinstance(p, (int, float)) else BERTConfig.dropout


def read_d2l(net: Any) -> tuple[BERTConfig, dict[str, np.ndarray]]:
    """The config and the float32 weights, under canonical names, of d2l's PyTorch
    ``BERTModel``; every canonical parameter exactly once with its shape, else a ValueError."""
    net = _check_d2l_net(net)
    named = {name: p.detach().cpu().float().numpy().copy() for name, p in net.named_parameters()}
    arrays = canonical_arrays(named, canonical_name, d2l_name)
    config = infer_config(arrays, d2l_num_heads(net), _dropout(net))
    check_state_dict(arrays, config, "the d2l model (canonical names)")
    return config, arrays


def from_d2l(net: Any, vocab: Any = None, *, devices: Any = None) -> Pretrained:
    """A bertlite model of this backend with the weights of d2l's PyTorch ``BERTModel``.

    ``vocab``: the model's vocabulary (d2l's ``Vocab``, a :class:`bertlite.Vocab` or a token
    list), needed to encode text and to save a checkpoint; None gives ``vocab=None`` (token
    ids only). ``devices``: where the bertlite model lives (a backend device spec); default the
    device of the d2l model's parameters. See the module docstring for d2l's quirks.
    """
    config, arrays = read_d2l(net)
    if devices is None:
        module = _check_d2l_net(net)
        devices = [next(module.parameters()).device]
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


def to_d2l(pretrained: Pretrained, d2l: ModuleType | None = None) -> nn.Module:
    """d2l's PyTorch ``BERTModel`` (of ``d2l``, default ``import d2l.torch``) with the weights
    of a bertlite model of any backend, on the bertlite model's first device when it is a
    torch device, else on the CPU; in train mode, as d2l builds it (``.eval()`` it for
    inference)."""
    if not isinstance(pretrained, Pretrained):
        raise TypeError(f"to_d2l needs a bertlite.Pretrained (what from_d2l, bertlite.train or "
                        f"bertlite.load return), got {type(pretrained).__name__}")
    check_book_flavour(pretrained.config)
    d2l = _d2l_module(d2l)
    c = pretrained.config
    h = c.num_hiddens
    net = d2l.BERTModel(c.vocab_size, h, [h], h, c.ffn_num_hiddens, c.num_heads, c.num_layers,
                        c.dropout, max_len=c.max_len, key_size=h, query_size=h, value_size=h,
                        hid_in_features=h, mlm_in_features=h, nsp_in_features=h)
    arrays = pretrained.state_dict()
    check_state_dict(arrays, c, "the bertlite model")
    state = {d2l_name(n): torch.from_numpy(np.ascontiguousarray(arrays[n], dtype=np.float32))
             for n in parameter_shapes(c)}
    net.load_state_dict(state, strict=True)
    devices = [d for d in pretrained.devices if isinstance(d, torch.device)]
    return net.to(devices[0] if devices else torch.device("cpu"))
