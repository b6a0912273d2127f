"""The two backends are mirror images (in the spirit of thinc's ``test_ops_consistency``): the
same modules, the same public names module by module, and the same signatures (parameter
names, kinds and defaults) for what they share, the backend classes' methods included.

What one backend has by design is listed below, each entry with its reason; anything else that
differs is drift, and fails here. The allowlists are checked too: an entry that no longer
differs must be removed. Runs where both frameworks are installed (the mxnet env, which also
has torch)."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import framework_installed

pytestmark = pytest.mark.skipif(
    not (framework_installed("torch") and framework_installed("mxnet")),
    reason="the comparison needs both frameworks (torch and mxnet), as in the mxnet env; "
           'pip install "bertlite[torch,mxnet]"')

BACKENDS = ("torch", "mxnet")
#: the modules both backends have, with the same responsibility
SHARED_MODULES = ("backend", "d2l", "devices", "distributed", "fast", "interop", "kernels",
                  "loss", "model", "step")
#: modules only one backend has
ONLY_MODULES = {
    # torch: the valid tokens as packed rows for its fast path (MXNet's compiled graph needs
    # static shapes, so it keeps the padded batch)
    "torch": {"packing"},
    # mxnet: the parameter-server launcher (torch uses torchrun)
    "mxnet": {"launch"},
}

#: public names that only one backend has, by module
FRAMEWORK_SPECIFIC: dict[str, dict[str, set[str]]] = {
    "torch": {
        # the backend class is named after its framework (compared method by method below)
        "backend": {"TorchBackend"},
        # moving the book's torch model/tensors in and out
        "d2l": {"to_torch"},
        # DDP: the world of torchrun's environment, the process group and the DDP wrapper
        "distributed": {"WorldInfo", "env_world", "is_initialized", "local_device", "world",
                        "wrap"},
        # the fast path is each framework's own: torch packs the valid tokens and runs autograd
        # Functions eagerly; the loss takes its sparse last layer one level below the shared
        # sparse_forward (sparse_encodings: the encodings at the used slots, not the logits, so
        # that the MLM decoder runs fused with its cross-entropy, decoder_cross_entropy) ...
        "fast": {"Output", "Projections", "Unpack", "add_norm", "attention", "block",
                 "cross_entropy", "decoder_cross_entropy", "encode", "forward", "group_keeps",
                 "packs", "sparse_encodings", "supported", "unpack"},
        # ... on fused autograd Functions, each with its plain reference
        "kernels": {"CE_CHUNK", "DECODER_CHUNK", "FUSED_LINEAR",  # its kernels' tuning
                    "Attention", "CrossEntropy", "DecoderCrossEntropy", "DropoutAdd", "FFN",
                    "FusedLinear", "activate", "attention_reference",
                    "cross_entropy_reference", "decoder_cross_entropy_reference", "dropout",
                    "dropout_add_reference", "ffn_reference", "gelu_linear", "keep_mask",
                    "linear", "linear_reference", "mkldnn_linear", "uses_keep_mask",
                    # dropout masks drawn where the packed path reads them (MXNet's static
                    # graph takes whole masks, fast.shard_masks), scaled once drawn
                    "LayerMasks", "scale_keep"},
        # the per-batch loss of one model (MXNet: per device shard, `shard_loss`) and the plain
        # per-row cross-entropy (MXNet's `cross_entropy` takes Gluon's F to run in a graph too)
        "loss": {"batch_loss", "plain_cross_entropy"},
        # plain torch attention helpers of the book's classes (MXNet's MASK_VALUE and
        # masked softmax are in its kernels' op sets)
        "model": {"MASK_VALUE", "activate", "attention_mask", "masked_softmax_attention"},
        # torch tensors, DDP/DataParallel unwrapping, autocast + GradScaler, the per-piece loss
        "step": {"TorchBatch", "TorchOptimizer", "autocast", "dropout_masks",
                 "grad_scaler", "local_model", "micro_batches", "model_device",
                 "named_parameters", "to_tensors", "unwrap"},
    },
    "mxnet": {
        "backend": {"MXNetBackend"},
        "d2l": {"to_mxnet"},
        # MXNet counts GPUs itself (torch.cuda.device_count is torch's own)
        "devices": {"num_gpus"},
        # the dist_sync kvstore: its types, its keys, the kvstore and the trainer's keys on it
        "distributed": {"DIST_TYPES", "FLAG_KEY", "LOSS_KEY", "SUM_KEY", "env_kvstore_type",
                        "get_kvstore", "prepare_trainer"},
        # the fast path is one hybridized graph: the loss block around the sparse last layer
        # (sparse_forward, shared) and the low-precision casts (static shapes, so masks of
        # fixed rows)
        "fast": {"PretrainingLoss", "loss_graph", "low_precision_dense", "pretraining_loss",
                 "shard_masks", "sparse_masks"},
        # MXNet's op sets (fast and plain), each kernel beside its reference
        "kernels": {"FAST", "MASK_VALUE", "Ops", "PLAIN", "activation", "activation_reference",
                    "add", "add_positions", "add_positions_reference", "add_reference",
                    "gather_rows", "gather_rows_reference", "key_mask_bias", "layer_norm",
                    "layer_norm_reference", "masked_softmax", "masked_softmax_reference", "ops"},
        # per-device shard losses (the book's MXNet _get_batch_loss_bert takes shards), the
        # per-row cross-entropies written with Gluon's F (imperative and in the compiled graph)
        "loss": {"batch_totals", "cross_entropy", "output_row_losses", "shard_loss"},
        # Gluon needs its own LayerNorm (matrix-product kernel), canonical names of Gluon's
        # prefixed parameters and the dropout masks as flat graph inputs
        "model": {"LayerNorm", "canonical_name", "flat_masks"},
        # PyTorch's Adam as an MXNet optimizer, the optimizer wrapper, the precision plans
        # (bf16 on the CPU only), clipping of per-device gradients and the device shards
        "step": {"MXNetOptimizer", "PRECISION_PLANS", "PrecisionPlan", "TorchAdam",
                 "clip_grad_norm", "shard_losses", "split_batch"},
    },
}
# The optimizer wrappers TorchOptimizer / MXNetOptimizer are named after their framework, as
# the backend classes are; their shared attributes are compared in test_optimizer_wrappers.

#: shared names whose signatures differ by design: (module, name) -> why
SIGNATURES_DIFFER = {
    # the book's two tabs define these constructors differently (torch: norm_shape,
    # ffn_num_input, key/query/value sizes; Gluon: use_bias, **kwargs for the block prefix)
    ("d2l", "AddNorm"): "book", ("d2l", "BERTEncoder"): "book", ("d2l", "BERTModel"): "book",
    ("d2l", "EncoderBlock"): "book", ("d2l", "MaskLM"): "book",
    ("d2l", "MultiHeadAttention"): "book", ("d2l", "NextSentencePred"): "book",
    ("d2l", "PositionWiseFFN"): "book",
    ("model", "AddNorm"): "book", ("model", "BERTEncoder"): "book",
    ("model", "BERTModel"): "book", ("model", "EncoderBlock"): "book",
    ("model", "MaskLM"): "book", ("model", "MultiHeadAttention"): "book",
    ("model", "NextSentencePred"): "book", ("model", "PositionWiseFFN"): "book",
    # the book's MXNet _get_batch_loss_bert takes lists of device shards
    ("d2l", "_get_batch_loss_bert"): "book", ("loss", "_get_batch_loss_bert"): "book",
    # MXNet computes the loss over a list of devices (its model lives on all of them); a
    # torch model is on one device (or wrapped in DataParallel/DDP)
    ("step", "loss_and_grads"): "devices",
    # the sparse last layer: MXNet's takes Gluon's F after the model (mx.symbol inside the
    # compiled loss graph, mx.ndarray imperatively), as its loss.cross_entropy does; otherwise
    # the same arguments and the same (mlm_Y_hat, nsp_Y_hat)
    ("fast", "sparse_forward"): "Gluon's F",
}


def load(backend: str, module: str) -> ModuleType:
    return importlib.import_module(f"bertlite.backends.{backend}.{module}")


def public_names(module: ModuleType) -> set[str]:
    """``__all__``, or the module's own top-level public definitions (functions, classes and
    assignments in its source; imported names do not count)."""
    if hasattr(module, "__all__"):
        return set(module.__all__)
    tree = ast.parse(Path(module.__file__).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {n for n in names if not n.startswith("_")}


def shape(obj: Any) -> list[tuple[str, str, str]] | None:
    """A callable's parameters as (name, kind, default); None for what has no signature (a
    constant). Annotations are left out: they name each framework's own types."""
    if not callable(obj):
        return None
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [(p.name, p.kind.name, "-" if p.default is p.empty else repr(p.default))
            for p in sig.parameters.values()]


def backend_dir(backend: str) -> Path:
    return Path(importlib.import_module(f"bertlite.backends.{backend}").__file__).parent


def test_the_same_modules():
    files = {b: {p.stem for p in backend_dir(b).glob("*.py") if p.stem != "__init__"}
             for b in BACKENDS}
    for b in BACKENDS:
        assert files[b] == set(SHARED_MODULES) | ONLY_MODULES[b], (
            f"{b}: modules {sorted(files[b] ^ (set(SHARED_MODULES) | ONLY_MODULES[b]))} are "
            "not in both backends: add the mirror module or list it in ONLY_MODULES with why")


@pytest.mark.parametrize("module", SHARED_MODULES)
def test_the_same_public_names(module):
    names = {b: public_names(load(b, module)) for b in BACKENDS}
    for b in BACKENDS:
        allowed = FRAMEWORK_SPECIFIC[b].get(module, set())
        stale = allowed - names[b]
        assert not stale, f"{b}.{module}: allowlisted names {sorted(stale)} no longer exist"
        other = BACKENDS[1 - BACKENDS.index(b)]
        both = allowed & names[other]
        assert not both, f"{module}: {sorted(both)} exist in both backends now: unlist them"
    torch_names = names["torch"] - FRAMEWORK_SPECIFIC["torch"].get(module, set())
    mxnet_names = names["mxnet"] - FRAMEWORK_SPECIFIC["mxnet"].get(module, set())
    assert torch_names == mxnet_names, (
        f"{module}: only in torch {sorted(torch_names - mxnet_names)}, only in mxnet "
        f"{sorted(mxnet_names - torch_names)}: give both backends the name (or list it in "
        "FRAMEWORK_SPECIFIC with the reason)")


@pytest.mark.parametrize("module", SHARED_MODULES)
def test_the_same_signatures(module):
    mods = {b: load(b, module) for b in BACKENDS}
    shared = public_names(mods["torch"]) & public_names(mods["mxnet"])
    compared = 0
    for name in sorted(shared):
        shapes = [shape(getattr(mods[b], name)) for b in BACKENDS]
        if (module, name) in SIGNATURES_DIFFER:
            assert shapes[0] != shapes[1], f"{module}.{name} no longer differs: unlist it"
            continue
        assert shapes[0] == shapes[1], (
            f"{module}.{name}: torch {shapes[0]} vs mxnet {shapes[1]}")
        compared += shapes[0] is not None
    listed = {n for m, n in SIGNATURES_DIFFER if m == module}
    assert listed <= shared, f"{module}: {sorted(listed - shared)} in SIGNATURES_DIFFER " \
                             "are not shared names"
    assert compared or module in ("backend", "fast", "kernels", "loss", "model")


def test_sparse_forward_differs_by_gluons_F_only():
    """The sparse last layer is one function in both backends: MXNet's adds only Gluon's ``F``
    after the model (its SIGNATURES_DIFFER entry)."""
    torch_shape, mxnet_shape = (shape(load(b, "fast").sparse_forward) for b in BACKENDS)
    assert mxnet_shape[1][0] == "F"
    assert mxnet_shape[:1] + mxnet_shape[2:] == torch_shape


def backend_classes() -> dict[str, type]:
    return {"torch": load("torch", "backend").TorchBackend,
            "mxnet": load("mxnet", "backend").MXNetBackend}


def test_backend_classes_mirror_each_other():
    """Both implement the same public methods of :class:`bertlite.backend.Backend`, with the
    base class's parameters, and add none of their own."""
    from bertlite.backend import Backend

    classes = backend_classes()
    base = {n for n in dir(Backend) if not n.startswith("_")}
    for cls in classes.values():
        assert issubclass(cls, Backend)
        extra = {n for n in dir(cls) if not n.startswith("_")} - base - {"fast"}
        assert not extra, f"{cls.__name__} has public names the Backend interface lacks: " \
                          f"{sorted(extra)}"
        for name in sorted(base):
            if callable(getattr(Backend, name)):
                assert shape(getattr(cls, name)) == shape(getattr(Backend, name)), (
                    f"{cls.__name__}.{name} {shape(getattr(cls, name))} vs Backend's "
                    f"{shape(getattr(Backend, name))}")
    overridden = {b: {n for n in base if n in vars(cls)} for b, cls in classes.items()}
    # describe_devices: torch alone adds "x N processes" (MXNet workers share no devices list)
    assert overridden["torch"] - {"describe_devices"} == overridden["mxnet"]
    assert shape(classes["torch"].__init__) == shape(classes["mxnet"].__init__)


def test_info_has_the_same_keys():
    from bertlite.backend import INFO_KEYS

    for cls in backend_classes().values():
        assert tuple(cls().info()) == INFO_KEYS


def test_optimizer_wrappers():
    """TorchOptimizer and MXNetOptimizer: the settings, the framework optimizer, and the count
    of steps skipped for a non-finite loss, on the same model."""
    import numpy as np
    from helpers import tiny_config

    from bertlite.optim import OptimizerSettings
    from bertlite.params import init_params

    settings, config = OptimizerSettings(lr=0.01, clip_norm=1.0), tiny_config()
    for cls in backend_classes().values():
        be = cls()
        model = be.build_model(config, be.parse_devices("cpu"))
        be.load_state_dict(model, init_params(config, 0))
        opt = be.create_optimizer(model, settings)
        assert opt.settings is settings and opt.nonfinite_skips == 0
        assert opt.optimizer is not None and not hasattr(opt.optimizer, "nonfinite_skips")
        state = be.optimizer_state(opt)
        assert int(state["step"]) == 0 and all(np.all(v == 0) for v in state.values())
