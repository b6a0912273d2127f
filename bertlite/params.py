"""Canonical parameter names and shapes, shared by every backend, and the initial weights.

Both backends name and shape their parameters this way (dense weights as ``(out, in)``), so a
state dict of numpy arrays moves between frameworks unchanged. The initial weights are drawn
here, in numpy, from the seed: the same seed gives the same model in every backend.

=====================================================  =====================
name                                                   shape
=====================================================  =====================
encoder.token_embedding.weight                         (vocab, H)
encoder.segment_embedding.weight                       (2, H)
encoder.pos_embedding                                  (1, max_len, H)
encoder.ln.{weight,bias}  (``embedding_norm`` only)    (H,)
encoder.blks.{i}.attention.W_{q,k,v,o}.weight          (H, H)
encoder.blks.{i}.attention.W_{q,k,v,o}.bias            (H,)
encoder.blks.{i}.addnorm1.ln.{weight,bias}             (H,)
encoder.blks.{i}.ffn.dense1.weight / .bias             (F, H) / (F,)
encoder.blks.{i}.ffn.dense2.weight / .bias             (H, F) / (H,)
encoder.blks.{i}.addnorm2.ln.{weight,bias}             (H,)
hidden.weight / hidden.bias                            (H, H) / (H,)
mlm.dense.weight / mlm.dense.bias                      (H, H) / (H,)
mlm.ln.weight / mlm.ln.bias                            (H,)
mlm.decoder.weight / mlm.decoder.bias                  (vocab, H) / (vocab,)
nsp.output.weight / nsp.output.bias                    (2, H) / (2,)
=====================================================  =====================

With ``tie_decoder`` there is no ``mlm.decoder.weight``: the decoder reads
``encoder.token_embedding.weight``.
"""

from __future__ import annotations

import numpy as np

from bertlite.config import BERTConfig


def parameter_shapes(config: BERTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a BERTModel, in a fixed order, with its shape."""
    h, f, v = config.num_hiddens, config.ffn_num_hiddens, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.token_embedding.weight": (v, h),
        "encoder.segment_embedding.weight": (2, h),
        "encoder.pos_embedding": (1, config.max_len, h),
    }
    if config.embedding_norm:
        shapes["encoder.ln.weight"] = (h,)
        shapes["encoder.ln.bias"] = (h,)
    for i in range(config.num_layers):
        p = f"encoder.blks.{i}."
        for w in ("W_q", "W_k", "W_v", "W_o"):
            shapes[f"{p}attention.{w}.weight"] = (h, h)
            shapes[f"{p}attention.{w}.bias"] = (h,)
        shapes[f"{p}addnorm1.ln.weight"] = (h,)
        shapes[f"{p}addnorm1.ln.bias"] = (h,)
        shapes[f"{p}ffn.dense1.weight"] = (f, h)
        shapes[f"{p}ffn.dense1.bias"] = (f,)
        shapes[f"{p}ffn.dense2.weight"] = (h, f)
        shapes[f"{p}ffn.dense2.bias"] = (h,)
        shapes[f"{p}addnorm2.ln.weight"] = (h,)
        shapes[f"{p}addnorm2.ln.bias"] = (h,)
    shapes.update({
        "hidden.weight": (h, h), "hidden.bias": (h,),
        "mlm.dense.weight": (h, h), "mlm.dense.bias": (h,),
        "mlm.ln.weight": (h,), "mlm.ln.bias": (h,),
        "mlm.decoder.weight": (v, h), "mlm.decoder.bias": (v,),
        "nsp.output.weight": (2, h), "nsp.output.bias": (2,),
    })
    if config.tie_decoder:
        del shapes["mlm.decoder.weight"]
    return shapes


def is_no_decay(name: str) -> bool:
    """Biases and LayerNorm parameters: excluded from weight decay."""
    return name.endswith(".bias") or ".ln." in name


def init_params(config: BERTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Initial float32 weights: Xavier-uniform matrices and embeddings (the book's MXNet
    initializer), zero biases, LayerNorm scales of one; a function of ``seed`` alone."""
    rng = np.random.default_rng([seed, 10])
    params = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith(".ln.weight"):
            value = np.ones(shape)
        elif name.endswith(".bias"):
            value = np.zeros(shape)
        else:
            fan_out, fan_in = shape[-2], shape[-1]
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            value = rng.uniform(-bound, bound, shape)
        params[name] = value.astype(np.float32)
    return params


def check_state_dict(arrays: dict[str, np.ndarray], config: BERTConfig, source: str = "") -> None:
    """Raise a ValueError naming every missing, unexpected or misshapen parameter."""
    expected = parameter_shapes(config)
    where = f" in {source}" if source else ""
    missing = [n for n in expected if n not in arrays]
    unexpected = [n for n in arrays if n not in expected]
    wrong = [f"{n}: {tuple(arrays[n].shape)} != {expected[n]}" for n in expected
             if n in arrays and tuple(arrays[n].shape) != expected[n]]
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
    if problems:
        raise ValueError(f"parameters{where} do not match the config: " + "; ".join(problems))
