"""bertlite's MXNet backend (MXNet 1.9 Gluon, numpy interface), and the book's MXNet-tab API
(``from bertlite.backends import mxnet as d2l``).

CPU threads: MXNet 1.9 runs its operators on half of the logical CPUs, assuming two hardware
threads per core; on machines without hyperthreading (most cloud VMs) that is half the cores.
When ``mxnet`` is not imported yet and neither ``MXNET_OMP_MAX_THREADS`` nor
``OMP_NUM_THREADS`` is set, importing this package sets ``MXNET_OMP_MAX_THREADS`` to the number
of physical cores this process may run on (MXNet reads it once, when it loads). Set either
variable yourself to choose; ``MXNetBackend().info()["threads"]`` reports the choice.
"""

import os as _os

from bertlite.registry import require_framework

require_framework("mxnet")


def _physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyperthread siblings count once)."""
    try:
        cpus = sorted(_os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return _os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def _default_omp_threads() -> None:
    import sys

    if "mxnet" in sys.modules or "MXNET_OMP_MAX_THREADS" in _os.environ \
            or "OMP_NUM_THREADS" in _os.environ:
        return
    _os.environ["MXNET_OMP_MAX_THREADS"] = str(_physical_cores())


_default_omp_threads()

from mxnet import npx  # noqa: E402

npx.set_np()

from . import d2l  # noqa: E402
from .backend import MXNetBackend  # noqa: E402
from .d2l import *  # noqa: E402,F403  (the book's API: d2l.__all__)
from .devices import parse_devices  # noqa: E402
from .interop import from_d2l, to_d2l  # noqa: E402

__all__ = [*d2l.__all__, "MXNetBackend", "from_d2l", "parse_devices", "to_d2l"]
