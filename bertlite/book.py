"""The book's small helpers (d2l ``Timer``, ``Accumulator``, ``Animator``), framework-free, so
that the book's code runs against ``bertlite.backends.torch`` / ``.mxnet`` unchanged."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np


class Timer:
    """Records running times."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.start()

    def start(self) -> None:
        self.tik = time.perf_counter()

    def stop(self) -> float:
        self.times.append(time.perf_counter() - self.tik)
        return self.times[-1]

    def avg(self) -> float:
        return sum(self.times) / len(self.times)

    def sum(self) -> float:
        return sum(self.times)

    def cumsum(self) -> list[float]:
        return np.array(self.times).cumsum().tolist()


class Accumulator:
    """Sums over ``n`` variables."""

    def __init__(self, n: int) -> None:
        self.data = [0.0] * n

    def add(self, *args: Any) -> None:
        self.data = [a + _to_float(b) for a, b in zip(self.data, args)]

    def reset(self) -> None:
        self.data = [0.0] * len(self.data)

    def __getitem__(self, idx: int) -> float:
        return self.data[idx]


def _to_float(value: Any) -> float:
    """``float()`` of a number or a framework scalar (detached first if it tracks gradients)."""
    detach = getattr(value, "detach", None)
    return float(detach() if callable(detach) else value)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    if not callable(get_ipython):
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"


class Animator:
    """Plots data in animation: live in a notebook; in a script it only collects the points
    (``save(path)`` writes the figure)."""

    def __init__(self, xlabel: str | None = None, ylabel: str | None = None,
                 legend: Sequence[str] | None = None, xlim=None, ylim=None, xscale="linear",
                 yscale="linear", fmts=("-", "m--", "g-.", "r:"), nrows=1, ncols=1,
                 figsize=(3.5, 2.5)) -> None:
        self.xlabel, self.ylabel, self.legend = xlabel, ylabel, list(legend or [])
        self.xlim, self.ylim, self.xscale, self.yscale = xlim, ylim, xscale, yscale
        self.fmts, self.figsize = fmts, figsize
        self.X: list[list[float]] | None = None
        self.Y: list[list[float]] | None = None
        self._live = _in_notebook()
        self.fig = None

    def add(self, x: Any, y: Any) -> None:
        if not hasattr(y, "__len__"):
            y = [y]
        n = len(y)
        if not hasattr(x, "__len__"):
            x = [x] * n
        if self.X is None:
            self.X = [[] for _ in range(n)]
            self.Y = [[] for _ in range(n)]
        for i, (a, b) in enumerate(zip(x, y)):
            if a is not None and b is not None:
                self.X[i].append(float(a))
                self.Y[i].append(float(b))
        if self._live:
            from IPython import display

            self._draw()
            display.display(self.fig)
            display.clear_output(wait=True)

    def _draw(self):
        import matplotlib

        if not self._live:
            matplotlib.use("Agg", force=False)
        from matplotlib import pyplot as plt

        if self.fig is None:
            self.fig, self.axes = plt.subplots(figsize=self.figsize)
        ax = self.axes
        ax.cla()
        for x, y, fmt in zip(self.X or [], self.Y or [], self.fmts):
            ax.plot(x, y, fmt)
        ax.set_xlabel(self.xlabel or "")
        ax.set_ylabel(self.ylabel or "")
        ax.set_xscale(self.xscale)
        ax.set_yscale(self.yscale)
        if self.xlim:
            ax.set_xlim(self.xlim)
        if self.ylim:
            ax.set_ylim(self.ylim)
        if self.legend:
            ax.legend(self.legend)
        ax.grid()
        return self.fig

    def save(self, path: str) -> None:
        from matplotlib import pyplot as plt

        fig = self._draw()
        fig.savefig(path, bbox_inches="tight", dpi=120)
        plt.close(fig)
        self.fig = None


class ConvertedBatches:
    """A re-iterable of batches converted to framework arrays (the book's ``train_iter``)."""

    def __init__(self, batches: Any, convert: Callable[[np.ndarray], Any]) -> None:
        self.batches, self.convert = batches, convert

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for batch in self.batches:
            yield tuple(self.convert(a) for a in batch)
