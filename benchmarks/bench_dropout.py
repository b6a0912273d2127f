"""Dropout masks: bertlite's counter-based masks against torch's CPU generators.

    python benchmarks/bench_dropout.py [--repeats 15] [--threads 2] [--p 0.2] [--json FILE]

Shapes: the tiny config's at batch 512 x 64 (activations 512 x 64 x 128 and the FFN's
512 x 64 x 256, attention weights 512 x 2 x 64 x 64). For each, in one process, interleaved
(:func:`_machine.time_interleaved`, the order rotating every round) so that all see the same
load, medians over the rounds:

* ``bertlite.dropout.random_bits`` (the uint16 draws), ``keep_mask`` (bool) and ``scaled_mask``
  (float32, kept elements ``1 / keep_probability``), for the whole batch, with the default
  threads (``$OMP_NUM_THREADS``, else the usable CPUs, at most 4), and ``keep_mask`` with one
  thread, and ``scaled_mask`` filling a buffer reused from call to call (``out=``);
* ``bertlite.dropout.scaled_rows`` at 59% of the rows (the valid positions of the sample
  batch): what torch's packed path draws;
* torch: ``x.bernoulli_(1 - p)`` into a preallocated float32 tensor, ``torch.rand(shape) >= p``
  (bool), and the torch backend's own mask for dropout not keyed by the step
  (``kernels.keep_mask``, 16-bit draws of torch's generator), each with ``--threads`` torch
  threads (skipped when torch is absent).

Ratios are ``bernoulli_``'s median over each one's, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _machine as M  # noqa: E402

SHAPES = {"activations 512x64x128": (512, (64, 128)),
          "FFN hidden 512x64x256": (512, (64, 256)),
          "attention 512x2x64x64": (512, (2, 64, 64))}


def candidates(rows: int, shape: tuple[int, ...], p: float, threads: int) -> dict:
    """The mask generators to time, by name, each making one whole-batch mask."""
    import numpy as np

    from bertlite import dropout

    fns = {
        "bertlite random_bits": lambda: dropout.random_bits(0, 1, 2, range(rows), shape),
        "bertlite keep_mask": lambda: dropout.keep_mask(0, 1, 2, p, 0, rows, shape),
        "bertlite scaled_mask": lambda: dropout.scaled_mask(0, 1, 2, p, 0, rows, shape),
        "bertlite scaled_mask, out= buffer": lambda: dropout.scaled_mask(
            0, 1, 2, p, 0, rows, shape, out=buffer),
        "bertlite keep_mask, 1 thread": lambda: one_thread(dropout.keep_mask),
        # what torch's packed path draws of an add & norm mask: the valid tokens' rows (59% of
        # the sample batch's positions), scaled
        "bertlite scaled_rows, 59% of the rows": lambda: dropout.scaled_rows(
            0, 1, 2, p, valid_rows, shape[-1]),
    }
    per_example = math.prod(shape[:-1])
    valid_rows = np.flatnonzero(np.arange(rows * per_example) % shape[-2]
                                < round(0.59 * shape[-2]))
    buffer = np.empty((rows, *shape), dtype=np.float32)

    def one_thread(fn):
        dropout.set_num_threads(1)
        try:
            return fn(0, 1, 2, p, 0, rows, shape)
        finally:
            dropout.set_num_threads(None)
    try:
        import torch
    except ImportError:
        print("torch is not installed: torch's generators skipped", file=sys.stderr)
        return fns
    torch.set_num_threads(threads)
    full = (rows, *shape)
    buf = torch.empty(full)
    fns["torch bernoulli_"] = lambda: buf.bernoulli_(1 - p)
    fns["torch rand >= p"] = lambda: torch.rand(full) >= p
    from bertlite.backends.torch.kernels import keep_mask

    fns["torch backend kernels.keep_mask (torch's generator)"] = lambda: keep_mask(
        full, p, torch.float32)
    return fns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--p", type=float, default=0.2, help="dropout probability (0.2)")
    parser.add_argument("--json", help="write the raw timings here")
    args = parser.parse_args(argv)
    info = M.describe(args.threads)
    M.print_machine(info)
    results = {}
    for label, (rows, shape) in SHAPES.items():
        timings = M.time_interleaved(candidates(rows, shape, args.p, args.threads),
                                     args.repeats, warmup=2)
        base = timings.get("torch bernoulli_")
        elements = rows * math.prod(shape)
        table = []
        for name, t in timings.items():
            ratio = f"{base.median / t.median:.1f}x" if base else ""
            table.append((name, f"{t.median * 1e3:.1f}", f"{t.median / elements * 1e9:.2f}",
                          f"{t.spread:.0%}", ratio))
        print(f"\n{label} (p = {args.p}, {elements:,} elements; medians of {args.repeats})")
        print(M.table(["generator", "ms", "ns/element", "spread", "vs bernoulli_"], table))
        results[label] = {name: t.to_dict() for name, t in timings.items()}
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
