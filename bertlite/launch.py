"""``python -m bertlite.launch``: the MXNet parameter-server launcher, which lives in the MXNet
backend (``backends/mxnet/launch.py``, :mod:`bertlite.backends.mxnet.launch`).

This shim imports no framework: it loads that file by path, not through the package
``bertlite.backends.mxnet``, whose import loads MXNet and sets MXNet's CPU threads in the
launcher's own process (the workers would inherit that choice instead of sharing the cores).
The launcher itself needs only the standard library.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path
from types import ModuleType

import bertlite.backends  # imports no framework

_NAME = "bertlite.backends._mxnet_launch"


def _load() -> ModuleType:
    """The launcher module, loaded once from ``backends/mxnet/launch.py``."""
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    path = Path(bertlite.backends.__file__).parent / "mxnet" / "launch.py"
    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f"the MXNet launcher {path} is missing: reinstall bertlite")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
    return module


_launcher = _load()
HOST: str = _launcher.HOST
SHUTDOWN_GRACE: float = _launcher.SHUTDOWN_GRACE
free_port = _launcher.free_port
dmlc_env = _launcher.dmlc_env
launch = _launcher.launch
build_parser = _launcher.build_parser
main = _launcher.main

__all__ = ["HOST", "SHUTDOWN_GRACE", "build_parser", "dmlc_env", "free_port", "launch", "main"]

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
