"""Shared helpers of the benchmarks: what machine a figure comes from, its float32 matmul peak,
interleaved timing, peak memory and the analytic FLOP count of a training step.

Nothing here imports a framework at module level: the drivers stay light and every
measurement runs in a subprocess of its own.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "wikitext-2"
#: environment variables that change speed or memory, shown with every table
PERF_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MXNET_OMP_MAX_THREADS", "OMP_WAIT_POLICY",
            "KMP_AFFINITY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
            "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD")


# -- the machine ----------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe(threads: int | None = None) -> dict[str, Any]:
    """The machine and software a measurement ran on (no framework is imported)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "threads": threads,
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "mxnet", "numpy", "d2l")},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "env": {k: os.environ[k] for k in PERF_ENV if k in os.environ},
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line naming the machine, for the head of every table."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    env = ", ".join(f"{k}={v}" for k, v in info["env"].items())
    threads = f"{info['threads']} threads, " if info.get("threads") else ""
    load = "/".join(f"{x:.1f}" for x in info["load_average"])
    return (f"{info['cpu']}, {info['logical_cpus']} logical CPUs, {threads}Python "
            f"{info['python']}, {versions}; load average {load} (1/5/15 min) at the start"
            + (f"; {env}" if env else ""))


def print_machine(info: dict[str, Any], file: Any = None) -> None:
    print(f"machine: {machine_line(info)}", file=file or sys.stdout)


# -- timing ---------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Seconds of repeated runs of one thing."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (the noise of the measurement)."""
        if len(self.times) < 4:
            return (max(self.times) - min(self.times)) / self.median
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return (q[2] - q[0]) / self.median

    def to_dict(self) -> dict[str, Any]:
        return {"times": self.times, "median": self.median, "best": self.best,
                "spread": self.spread}


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     between: Callable[[], Any] | None = None) -> dict[str, Timing]:
    """Run every function ``warmup`` times, then ``repeats`` rounds of each in turn (the order
    rotates every round), so that all see the same machine load; ``between`` runs after every
    round (a peak measurement, say). Each function must wait for its own result."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        if between is not None:
            between()
    return {name: Timing(t) for name, t in times.items()}


class MatmulPeak:
    """The float32 matmul peak of this machine as torch sees it: the best GFLOP/s of
    ``torch.mm`` of two ``n x n`` matrices (MKL's SGEMM) over every :meth:`sample`. Sampled
    between the steps of a benchmark, it is measured under the same load as they are."""

    def __init__(self, n: int = 2048) -> None:
        import torch

        self.n = n
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=gen)
        self.b = torch.randn(n, n, generator=gen)
        self.out = torch.empty(n, n)
        self.best = float("inf")
        self.samples = 0

    def sample(self, times: int = 3) -> None:
        import torch

        for _ in range(times):
            start = time.perf_counter()
            torch.mm(self.a, self.b, out=self.out)
            self.best = min(self.best, time.perf_counter() - start)
            self.samples += 1

    @property
    def gflops(self) -> float:
        return 2 * self.n ** 3 / self.best / 1e9


# -- memory ---------------------------------------------------------------------------------------

def _status_kb(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """This process's resident memory now."""
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM, else ru_maxrss)."""
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0): the next peak is this run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return _status_kb("VmRSS", pid) or 0


class TreeMemory:
    """Samples, every ``interval`` seconds in a thread, the proportional set size (PSS: shared
    pages split among their processes, so that forked DataLoader workers are not counted
    twice) of a process and all its descendants; ``peak_mb`` is the largest sum seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids, todo = [], [self.pid]
            while todo:
                p = todo.pop()
                pids.append(p)
                todo.extend(_children(p))
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in pids))
            self.max_processes = max(self.max_processes, len(pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


def run_worker(script: Path, args: Sequence[str], env: dict[str, str] | None = None,
               timeout: float | None = None, sample_interval: float = 0.05
               ) -> dict[str, Any]:
    """Run ``python script *args`` in a subprocess whose last stdout line is JSON; returns it
    with ``wall_s`` (the subprocess's wall time), ``maxrss_mb`` (its largest process's peak
    RSS, from ``RUSAGE_CHILDREN``: exact when it is the first child to finish, else an upper
    bound) and ``tree_pss_mb`` (the peak PSS of it and its descendants, sampled every
    ``sample_interval`` seconds: reading a big process's memory map costs CPU)."""
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore", **(env or {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    with TreeMemory(proc.pid, sample_interval) as tree:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"{script.name} {' '.join(args)} timed out after {timeout} s"
                               ) from None
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed (exit {proc.returncode}):\n"
                           f"{err[-4000:]}")
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{script.name} {' '.join(args)} printed no result:\n{err[-4000:]}")
    result = json.loads(lines[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result.setdefault("wall_s", wall)
    result["maxrss_mb"] = after / 1024 if after > before else None
    result["tree_pss_mb"] = tree.peak_mb
    result["max_processes"] = tree.max_processes
    return result


# -- FLOPs ----------------------------------------------------------------------------------------

def training_flops(num_hiddens: int, ffn_num_hiddens: int, num_layers: int, vocab_size: int,
                   batch_size: int, length: int, num_predictions: int,
                   num_tokens: int | None = None, attention_pairs: int | None = None) -> float:
    """Analytic FLOPs of one training step (forward + backward) of the book's BERT.

    Matrix products only, 2 FLOPs per multiply-add, and 3x the forward for forward + backward
    (the backward computes the gradients of both inputs and weights):

    * encoder layers: ``6 * (4 h^2 + 2 h f) * layers`` per token (Q, K, V, O projections and
      the two FFN layers: 6 x the parameter FLOPs), over ``num_tokens`` (default: all
      ``batch * length`` positions);
    * attention: ``3 * 2 * 2 * h * layers`` per (query, key) pair (``Q K^T`` and the weighted
      sum of ``V``), over ``attention_pairs`` (default: ``batch * length^2``);
    * MLM head: ``6 * (h^2 + h V)`` per predicted position (dense and vocabulary decoder),
      over the ``num_predictions`` predicted positions (those of weight > 0);
    * NSP head: ``6 * (h^2 + 2 h)`` per example.

    Embedding lookups, LayerNorm, softmax, dropout, the loss and the optimizer are not counted
    (they are memory-bound and small in FLOPs).
    """
    h, f = num_hiddens, ffn_num_hiddens
    tokens = batch_size * length if num_tokens is None else num_tokens
    pairs = batch_size * length * length if attention_pairs is None else attention_pairs
    encoder = 6 * (4 * h * h + 2 * h * f) * num_layers * tokens
    attention = 3 * 2 * 2 * h * num_layers * pairs
    mlm = 6 * (h * h + h * vocab_size) * num_predictions
    nsp = 6 * (h * h + 2 * h) * batch_size
    return float(encoder + attention + mlm + nsp)


FLOPS_FORMULA = ("model FLOPs/step = 6*(4h^2+2hf)*layers*B*L + 12*h*layers*B*L^2 "
                 "+ 6*(h^2+hV)*P + 6*(h^2+2h)*B   (matmuls only; P = predicted positions)")


# -- tables ---------------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], aligns: str | None = None
          ) -> str:
    """A plain-text table; ``aligns`` has one ``<`` or ``>`` per column."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row]
                                           for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    aligns = aligns or "<" + ">" * (len(headers) - 1)
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(f"{c:{a}{w}}" for c, a, w in zip(row, aligns, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check(value: bool) -> str:
    return "met" if value else "NOT met"
