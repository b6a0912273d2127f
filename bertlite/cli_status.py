"""The CLI's first words: a status line on stderr within a second of the command, before
the slow part (framework import, data preparation), then the data step's own lines."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["status_line"]


def status_line(args: argparse.Namespace) -> None:
    """A line on stderr at once, before the slow part (framework import, data preparation),
    and the data step's own line (read from the cache, or being prepared); not with
    ``pretrain --no-progress`` or ``evaluate --json`` (nor where no backend is chosen: the
    error says so at once)."""
    import os

    backend = getattr(args, "backend", None) or os.environ.get("BERTLITE_BACKEND")
    if args.command == "pretrain" and not args.no_progress and backend:
        source = (f"the data {args.data}" if getattr(args, "data", None)
                  else f"the {args.corpus} corpus ({args.split} split)")
        what = f"starting {backend}, reading {source}"
    elif args.command == "prepare" and not args.merge:
        what = f"reading {', '.join(args.corpus) or 'the corpus'}"
    elif args.command == "evaluate" and not args.json:
        what = f"loading {args.checkpoint}, reading its {args.split} split"
    else:
        return
    print(f"bertlite {args.command}: {what} ...", file=sys.stderr, flush=True)
    handler = _StatusHandler()
    handler.setFormatter(logging.Formatter(f"bertlite {args.command}: %(message)s"))
    data_log = logging.getLogger("bertlite.data.loader")
    for old in [h for h in data_log.handlers if isinstance(h, _StatusHandler)]:
        data_log.removeHandler(old)  # main() called again in one process: one status line
    data_log.addHandler(handler)
    data_log.setLevel(logging.INFO)


class _StatusHandler(logging.Handler):
    """The data pipeline's status lines to whatever ``sys.stderr`` is when they are written
    (not the stream of the first call: ``main`` may run many times in one process)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging's contract: never raise from emit
            self.handleError(record)
