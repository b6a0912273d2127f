"""The book's reference code (d2l 0.17.6) for benchmarks, importable without its heavy extras.

d2l imports torchvision, PIL, pandas, requests, IPython and matplotlib_inline at module level;
the data pipeline uses none of them. Those that are missing (or, for torchvision, fail to import
beside the CPU torch wheel) are replaced by empty stub modules before ``d2l.<framework>`` is
imported. Nothing is copied from d2l: this only imports it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

STUBBED = ("torchvision", "torchvision.transforms", "PIL", "PIL.Image", "pandas", "requests",
           "IPython", "IPython.display", "matplotlib_inline",
           "matplotlib_inline.backend_inline")


class ReferenceUnavailable(RuntimeError):
    """d2l 0.17.6 or the framework it needs is not installed."""


def _stub_getattr(attr: str) -> object:
    if attr.startswith("__"):  # inspect and pickle probe __file__ etc. of every module
        raise AttributeError(attr)
    return types.SimpleNamespace()  # anything d2l touches at import


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    module.__getattr__ = _stub_getattr
    module.__bertlite_stub__ = True
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            sys.modules.pop(loaded, None)
        return False
    return True


def _stub_missing() -> None:
    for name in STUBBED:
        if name in sys.modules:
            continue
        parent = sys.modules.get(name.rpartition(".")[0])
        if getattr(parent, "__bertlite_stub__", False) or not _importable(name):
            _stub_module(name)


def import_d2l(framework: str = "torch") -> types.ModuleType:
    """``d2l.<framework>`` of d2l 0.17.6, with its unused imports stubbed when missing."""
    if importlib.util.find_spec("d2l") is None:
        raise ReferenceUnavailable("d2l 0.17.6 (the book's code) is not installed: "
                                   "pip install --no-deps d2l==0.17.6")
    module = {"torch": "torch", "mxnet": "mxnet"}[framework]
    if importlib.util.find_spec(module) is None:
        raise ReferenceUnavailable(f"{module} is not installed; the book's {framework} code "
                                   "needs it")
    os.environ.setdefault("MPLBACKEND", "Agg")
    _stub_missing()
    d2l = importlib.import_module(f"d2l.{framework}")
    try:
        from importlib.metadata import version

        found = version("d2l")
    except Exception:  # pragma: no cover - metadata missing
        found = "unknown"
    if found != "0.17.6":
        print(f"warning: d2l {found} is installed; the reference is d2l 0.17.6",
              file=sys.stderr)
    return d2l
