"""Framework backends of bertlite, installed as ``bertlite.backends``.

Importing this package imports no framework; ``get_backend("torch")`` or
``import bertlite.backends.torch`` does.
"""

from bertlite.backend import Backend
from bertlite.registry import available_backends, get_backend, installed_backends

__all__ = ["Backend", "available_backends", "get_backend", "installed_backends"]
