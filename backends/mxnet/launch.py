"""Start an MXNet parameter-server job on this machine: a scheduler, server(s) and workers.

    python -m bertlite.launch --workers 2 -- bertlite pretrain --backend mxnet --corpus sample
    bertlite launch-mxnet --workers 2 -- bertlite pretrain --backend mxnet --corpus sample

Both commands run this file through the core's shim :mod:`bertlite.launch`, which loads it by
path: importing the package ``bertlite.backends.mxnet`` would load MXNet in the launcher and
choose its CPU threads there, which the workers would inherit. So this module imports the
standard library only.

This only sets the ``DMLC_*`` variables MXNet reads and starts the processes on 127.0.0.1:

* the scheduler and each server are ``python -c "import mxnet"`` with ``DMLC_ROLE=scheduler``
  / ``server`` (importing mxnet in those roles runs the role and exits when the job ends);
* every worker runs the given command with ``DMLC_ROLE=worker``; the MXNet backend of bertlite
  sees ``DMLC_NUM_WORKER > 1`` and trains through a ``dist_sync`` kvstore.

It waits for the workers and exits with their status (the first non-zero one); when a worker
fails, the others are stopped, since they would wait for it forever. Every worker gets
``MXNET_OMP_MAX_THREADS`` = physical cores / workers unless ``MXNET_OMP_MAX_THREADS`` or
``OMP_NUM_THREADS`` is set. Several machines need a launcher that starts processes on each
(MXNet's ``tools/launch.py``, a cluster scheduler) with the same variables.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

HOST = "127.0.0.1"
#: seconds the scheduler and servers get to finish after the workers did
SHUTDOWN_GRACE = 20.0


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` now (the scheduler binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _count_cores() -> int:
    """Physical cores this process may use, without importing mxnet."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    siblings = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                siblings.add(f.read().strip())
        except OSError:
            siblings.add(str(cpu))
    return max(1, len(siblings))


def dmlc_env(role: str, *, workers: int, servers: int, port: int,
             base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one process of the job."""
    env = dict(os.environ if base is None else base)
    env.update({"DMLC_ROLE": role, "DMLC_PS_ROOT_URI": HOST, "DMLC_PS_ROOT_PORT": str(port),
                "DMLC_NUM_SERVER": str(servers), "DMLC_NUM_WORKER": str(workers),
                "DMLC_NODE_HOST": HOST, "DMLC_INTERFACE": "lo"})
    if role != "worker":  # the scheduler routes messages, the servers add gradients
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MXNET_OMP_MAX_THREADS", "1")
    elif "MXNET_OMP_MAX_THREADS" not in env and "OMP_NUM_THREADS" not in env:
        env["MXNET_OMP_MAX_THREADS"] = str(max(1, _count_cores() // workers))
    return env


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to the processes still running."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in running:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class _StopRequest:
    """SIGTERM or SIGINT to the launcher, as a scheduler sends before it kills a job: passed on
    to the workers, which stop after their step with a checkpoint, and waited for; a second
    signal kills them at once. Installed only in the main thread."""

    def __init__(self, procs: Sequence[subprocess.Popen]) -> None:
        self.procs, self.signum, self._old = procs, None, {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._old[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        self._old = {}

    def _handle(self, signum: int, frame: Any) -> None:
        running = [p for p in self.procs if p.poll() is None]
        if self.signum is not None:
            print("bertlite.launch: second signal; stopping the workers now", file=sys.stderr,
                  flush=True)
            for p in running:
                p.kill()
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"bertlite.launch: {signal.Signals(signum).name}: the workers finish their step, "
              "write a checkpoint and stop (signal again to stop at once)", file=sys.stderr,
              flush=True)
        for p in running:
            p.send_signal(signum)


def launch(command: Sequence[str], *, workers: int = 2, servers: int = 1,
           port: int | None = None, timeout: float | None = None,
           shutdown_grace: float = SHUTDOWN_GRACE) -> int:
    """Run ``command`` as ``workers`` MXNet workers beside a scheduler and ``servers`` servers
    on 127.0.0.1; return the workers' exit status (0, or the first failure's). ``timeout``
    (seconds) stops everything and returns 124; ``shutdown_grace`` is how long the scheduler
    and servers get to finish on their own after the workers did."""
    if workers < 1 or servers < 1:
        raise ValueError(f"need at least one worker and one server, got workers={workers}, "
                         f"servers={servers}")
    if not command:
        raise ValueError("no worker command given: put it after --, e.g. --workers 2 -- "
                         "bertlite pretrain --backend mxnet ...")
    port = port or free_port()
    options = dict(workers=workers, servers=servers, port=port)
    kvstore_cmd = [sys.executable, "-c", "import mxnet"]
    deadline = None if timeout is None else time.monotonic() + timeout
    services: list[subprocess.Popen] = []
    procs: list[subprocess.Popen] = []
    status = 0
    stop = _StopRequest(procs)
    try:
        stop.install()
        services.append(subprocess.Popen(kvstore_cmd, env=dmlc_env("scheduler", **options)))
        services += [subprocess.Popen(kvstore_cmd, env=dmlc_env("server", **options))
                     for _ in range(servers)]
        procs += [subprocess.Popen(list(command), env=dmlc_env("worker", **options))
                  for _ in range(workers)]
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if stop.signum is not None:
                # asked to stop: the workers finish their step, write a checkpoint and exit
                # on their own; wait for all of them (a second signal kills them)
                if all(c is not None for c in codes):
                    status = 128 + stop.signum
                    break
            elif failed:
                # killed by signal N: report 128 + N, as shells do
                status = failed[0] if failed[0] > 0 else 128 - failed[0]
                print(f"bertlite.launch: a worker exited with status {status}; stopping the "
                      "others", file=sys.stderr, flush=True)
                break
            if all(c == 0 for c in codes):
                break
            dead = [s.returncode for s in services if s.poll() not in (None, 0)]
            if dead:
                status = 1
                print(f"bertlite.launch: the MXNet scheduler or a server exited with status "
                      f"{dead[0]}; stopping the workers", file=sys.stderr, flush=True)
                break
            if deadline is not None and time.monotonic() > deadline:
                status = 124
                print(f"bertlite.launch: timed out after {timeout:g} s", file=sys.stderr,
                      flush=True)
                break
            time.sleep(0.2)
    except BaseException:  # Ctrl-C, SIGTERM (SystemExit): take the job down with us
        status = 130
        raise
    finally:
        stop.uninstall()
        if status != 0:
            _stop(procs, 5.0)
        # after a clean end the workers told the servers to stop; give them a moment
        end = time.monotonic() + (shutdown_grace if status == 0 else 0.0)
        for s in services:
            try:
                s.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _stop(services, 5.0)
    return status


def build_parser(prog: str = "python -m bertlite.launch") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run a command as MXNet dist_sync workers on this machine, "
                               "with a scheduler and server(s) on 127.0.0.1.",
        epilog="example: %(prog)s --workers 2 -- bertlite pretrain --backend mxnet "
               "--corpus sample --steps 20")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--servers", type=int, default=1, help="server processes (default 1)")
    parser.add_argument("--port", type=int, help="scheduler port (default: a free one)")
    parser.add_argument("--timeout", type=float, help="stop everything after this many "
                                                      "seconds (exit status 124)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the worker command, after --")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m bertlite.launch") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    try:
        return launch(command, workers=args.workers, servers=args.servers, port=args.port,
                      timeout=args.timeout)
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
