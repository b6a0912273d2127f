"""bertlite's PyTorch backend; also the book's PyTorch-tab API, so that
``from bertlite.backends import torch as d2l`` runs the chapter's code."""

from bertlite.registry import require_framework

require_framework("torch")

from . import d2l  # noqa: E402
from .backend import TorchBackend  # noqa: E402
from .d2l import *  # noqa: E402,F403  (the book's API: d2l.__all__)
from .devices import parse_devices  # noqa: E402
from .interop import from_d2l, to_d2l  # noqa: E402

__all__ = [*d2l.__all__, "TorchBackend", "from_d2l", "parse_devices", "to_d2l"]
