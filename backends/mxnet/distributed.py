"""Several processes training one model with MXNet's parameter-server kvstore (``dist_sync``).

The core never sees any of it. A process started as an MXNet *worker* -- ``DMLC_ROLE=worker``
and ``DMLC_NUM_WORKER`` greater than one in its environment, with a scheduler and server(s)
running (``python -m bertlite.launch`` starts them all on this machine) -- trains through a
``dist_sync`` kvstore:

* every worker reads the same data in the same order (same seed) and is handed the same global
  batch; :func:`bertlite.sharding.process_parts` gives each its own disjoint rows (``kv.rank`` of
  ``kv.num_workers``), whose losses use the *global* batch's normalizers, so the gradients
  that the kvstore sums over the workers (and over each worker's devices) are the gradient of
  the global batch, and the update equals one process training on the whole batch;
* the losses returned to the core are the global batch's: the workers' shares summed through
  the same kvstore (:func:`all_reduce_sum`, on int keys of their own, as the Trainer's);
* only ``kv.rank == 0`` prints, plots and writes checkpoints.

``BERTLITE_MXNET_KVSTORE`` picks the kvstore type: ``dist_sync`` (the default: gradients summed
on the servers through CPU memory) or ``dist_device_sync`` (summed on a worker's GPUs first).
Asynchronous kvstores (``dist_async``) are refused: their updates are not those of one process.
The launcher is :mod:`.launch` (``python -m bertlite.launch``); any other (MXNet's
``tools/launch.py``, a cluster scheduler) works the same when it sets the ``DMLC_*`` variables.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from bertlite.errors import DeviceError

__all__ = ["DIST_TYPES", "FLAG_KEY", "LOSS_KEY", "all_reduce_sum", "any_process",
           "env_kvstore_type", "get_kvstore", "is_distributed", "prepare_trainer", "rank",
           "setup", "world_size"]

#: the kvstore types whose update equals the single-process update
DIST_TYPES = ("dist_sync", "dist_device_sync")
#: environment variable choosing among :data:`DIST_TYPES`
KVSTORE_ENV = "BERTLITE_MXNET_KVSTORE"
#: kvstore keys of the loss sums and the any-process flag: ints, as the Trainer's parameter
#: indices (0, 1, ...) are, far above them (a kvstore must not mix int and string keys)
LOSS_KEY = 100_000
FLAG_KEY = 100_001

_kvstore: Any = None
_initialized_keys: set[int] = set()
_trainers = 0
#: the status this worker fails with (an uncaught exception: 1), or None
_failed: int | None = None


def env_kvstore_type() -> str | None:
    """The distributed kvstore type this process should use, or None when the environment
    does not make it an MXNet worker among several (``DMLC_ROLE=worker``,
    ``DMLC_NUM_WORKER > 1``)."""
    if os.environ.get("DMLC_ROLE", "") != "worker":
        return None
    try:
        workers = int(os.environ.get("DMLC_NUM_WORKER", "1"))
    except ValueError:
        raise DeviceError(f"DMLC_NUM_WORKER={os.environ['DMLC_NUM_WORKER']!r} is not a "
                          "number") from None
    if workers <= 1:
        return None
    kind = os.environ.get(KVSTORE_ENV, "dist_sync").strip() or "dist_sync"
    if kind not in DIST_TYPES:
        raise DeviceError(f"{KVSTORE_ENV}={kind!r}: use one of {', '.join(DIST_TYPES)} "
                          "(asynchronous kvstores do not give the single-process update)")
    missing = [v for v in ("DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER")
               if not os.environ.get(v)]
    if missing:
        raise DeviceError(f"DMLC_ROLE=worker with DMLC_NUM_WORKER={workers} but "
                          f"{', '.join(missing)} not set: start the workers with "
                          "`python -m bertlite.launch --workers N -- <command>`")
    return kind


def is_distributed() -> bool:
    """Whether the environment makes this process one of several training together."""
    return env_kvstore_type() is not None


def _check_feature() -> None:
    import mxnet as mx

    try:
        enabled = mx.runtime.Features().is_enabled("DIST_KVSTORE")
    except Exception:  # pragma: no cover - very old builds have no runtime features
        enabled = False
    if not enabled:
        raise DeviceError(f"this MXNet build ({mx.__version__}) has no distributed kvstore "
                          "(feature DIST_KVSTORE is off), so dist_sync training is impossible: "
                          "install a build with it (the mxnet 1.9.1 wheels from PyPI have it) "
                          "or train in one process")


def get_kvstore() -> Any:
    """This process's distributed kvstore, created (and connected to the scheduler) on first
    use; None when the process is not a worker among several. One per process: the
    parameter-server connection cannot be opened twice."""
    global _kvstore
    if _kvstore is None:
        kind = env_kvstore_type()
        if kind is None:
            return None
        _check_feature()
        import mxnet as mx

        _kvstore = mx.kv.create(kind)
        _watch_for_failure()
        atexit.register(_close)  # runs before mxnet's own exit handler (registered earlier)
    return _kvstore


def _watch_for_failure() -> None:
    """Record whether this worker fails (an uncaught exception, or ``sys.exit`` with a non-zero
    status as the ``bertlite`` command does on errors), for :func:`_close`."""
    excepthook, exit_ = sys.excepthook, sys.exit

    def failing_excepthook(*args: Any) -> None:
        global _failed
        _failed = 1
        excepthook(*args)

    def recording_exit(status: Any = None) -> None:
        global _failed
        if status not in (None, 0):
            _failed = status if isinstance(status, int) else 1
        exit_(status)

    sys.excepthook, sys.exit = failing_excepthook, recording_exit


def _close() -> None:
    """Leave the job at exit. Normally: wait for pending pushes and pulls, then free the
    kvstore, whose destructor meets the other workers at a barrier (worker 0 then stops the
    servers). Left to the interpreter's final garbage collection, that can happen after MXNet's
    engine has shut down, and the process aborts ("terminate called without an active
    exception"). When this worker failed, the others wait for its next push and would never
    reach that barrier: it exits at once instead, and the launcher stops the job."""
    kv = _kvstore
    if kv is None or getattr(kv, "handle", None) is None:
        return
    if _failed is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_failed)
    import mxnet as mx
    from mxnet.base import _LIB, check_call

    mx.nd.waitall()
    handle, kv.handle = kv.handle, None  # the Trainer's reference frees nothing later
    check_call(_LIB.MXKVStoreFree(handle))


def setup(device: Any) -> None:
    """Join the other workers when the environment asks for several processes: create the
    distributed kvstore (connecting to the scheduler). Idempotent; the trainer calls it once,
    after choosing the devices (``device`` is unused: a worker's kvstore serves all of its
    devices)."""
    get_kvstore()


def rank() -> int:
    """This worker's rank (0 in one process)."""
    kv = get_kvstore()
    return 0 if kv is None else int(kv.rank)


def world_size() -> int:
    """How many workers train together (1 in one process)."""
    kv = get_kvstore()
    return 1 if kv is None else int(kv.num_workers)


def prepare_trainer(trainer: Any) -> None:
    """Initialize the trainer's parameters on the kvstore (every worker takes worker 0's
    weights) and this module's own keys now, in the same order in every worker, before any
    gradient or loss is pushed."""
    global _trainers
    kv = get_kvstore()
    if kv is None:
        return
    if _trainers:
        # the parameter keys 0, 1, ... are taken: a second Trainer's initial weights would be
        # added to the first one's gradients on the servers
        raise DeviceError("a worker process trains one model through the distributed kvstore; "
                          "start a new job (python -m bertlite.launch ...) for another")
    _trainers += 1
    trainer._init_kvstore()
    trainer._init_params()
    _init_key(kv, LOSS_KEY, 2)
    _init_key(kv, FLAG_KEY, 1)
    kv._barrier()


def _init_key(kv: Any, key: int, size: int) -> None:
    import mxnet as mx

    if key not in _initialized_keys:
        # a barrier among the workers: every worker reaches it in the same order
        kv.init(key, mx.nd.zeros((size,), ctx=mx.cpu()))
        _initialized_keys.add(key)


def all_reduce_sum(values: Any) -> Any:
    """A 1-d float32 array summed over the workers (through the kvstore's servers); returned
    as a new array on the CPU, asynchronously (no host synchronization). In one process the
    array itself."""
    return _all_reduce_sum(values, LOSS_KEY)


def _all_reduce_sum(values: Any, key: int) -> Any:
    kv = get_kvstore()
    if kv is None:
        return values
    import mxnet as mx

    local = values.as_in_ctx(mx.cpu()).as_nd_ndarray()
    _init_key(kv, key, int(local.shape[0]))
    out = mx.nd.zeros(local.shape, ctx=mx.cpu())
    kv.pushpull(key, local, out=out)
    return out.as_np_ndarray()


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any worker (every worker must ask, in the same order)."""
    if get_kvstore() is None:
        return flag
    import mxnet as mx

    total = _all_reduce_sum(mx.np.array([1.0 if flag else 0.0], dtype="float32"), FLAG_KEY)
    return bool(float(total[0]) > 0)


def _reset_for_tests() -> None:
    """Forget the kvstore (tests that fake the environment)."""
    global _kvstore, _trainers
    _kvstore, _trainers = None, 0
    _initialized_keys.clear()
