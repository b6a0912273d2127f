"""SIGTERM and SIGINT as requests to stop: cluster schedulers send SIGTERM some time before
the kill, and Ctrl-C should not lose the steps since the last checkpoint.

While :class:`StopRequests` is active, the first signal only sets a flag: the trainer finishes
the step it is in, every process agrees to stop after that step, a checkpoint is written and
:class:`TrainingInterrupted` is raised (the CLI exits 128 + the signal number: 143 for
SIGTERM, 130 for SIGINT). A second signal restores the default action and stops at once,
unless it is the same signal within ``BERTLITE_SIGNAL_WINDOW`` seconds (default 1) of the
first: launchers (torchrun, Slurm) forward the signal they get to workers that got it too, and
such a copy is the same request.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

#: the signals that ask a run to stop
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: seconds within which a repeat of the first signal is taken as a copy of it
DEFAULT_WINDOW = 1.0


def _window() -> float:
    try:
        return max(0.0, float(os.environ.get("BERTLITE_SIGNAL_WINDOW", DEFAULT_WINDOW)))
    except ValueError:
        return DEFAULT_WINDOW


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped cleanly on a signal after step ``step``; ``checkpoint`` is the folder
    it resumes from (None without a checkpoint directory). A KeyboardInterrupt, so code that
    handles Ctrl-C keeps working; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, *, signum: int, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class StopRequests:
    """A context manager that turns the first SIGTERM/SIGINT into a stop request.

    Handlers are installed only in the main thread (Python delivers signals there); elsewhere
    the object never reports a request and the signals keep their handlers. ``announce``
    prints one line when the first signal arrives (the main process of a distributed run)."""

    def __init__(self, *, announce: bool = True, window: float | None = None):
        self.announce = announce
        self.window = _window() if window is None else window
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum == self.signum and time.monotonic() - self._first_at < self.window:
                return  # a launcher's copy of the first signal
            # the second signal: stop now, as if we were not here
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum, self._first_at = signum, time.monotonic()
        if self.announce:  # os.write: print() may be in the middle of another print
            name = signal.Signals(signum).name
            os.write(2, f"\nbertlite: {name} received, stopping after the current step "
                        f"(send it again to stop at once)\n".encode())

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Give the signals back the handlers they had before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.signum is not None and self._previous:  # a copy may still be on its way
            time.sleep(max(0.0, self.window - (time.monotonic() - self._first_at)))
        self.restore()


def raise_interrupted(signum: int | None, step: int, num_steps: int, checkpoint: Path | None,
                      *, announce: bool = True) -> None:
    """Print the one line naming the checkpoint and how to resume (``announce``), and raise
    :class:`TrainingInterrupted`. ``signum`` None: another process of the run was signalled
    (schedulers send SIGTERM, so this one reports that)."""
    if signum is None:
        signum, name = int(signal.SIGTERM), "a signal to another process"
    else:
        name = signal.Signals(signum).name
    where = (f"checkpoint {checkpoint}; resume with the same command and --resume "
             "(resume=True)" if checkpoint is not None else
             "nothing saved (pass --checkpoint-dir / checkpoint_dir to make a run resumable)")
    message = f"stopped by {name} after step {step} of {num_steps}: {where}"
    if announce:
        print(f"bertlite: {message}", file=sys.stderr, flush=True)
    raise TrainingInterrupted(message, signum=signum, step=step, checkpoint=checkpoint)
