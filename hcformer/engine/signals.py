"""Stopping a training run cleanly: signals and a Python-level hook (docs/pipeline.md, "One run").

Outside submitit, SIGTERM, SIGINT and SIGUSR1 (what SLURM sends before preemption or time-out)
ask the training loop to save ``checkpoints/last.pt`` at the next iteration boundary and exit
non-zero (128 + the signal number, e.g. 143 for SIGTERM). Under submitit the launcher owns the
signal; its ``checkpoint()`` hook calls

- :func:`request_stop` to make the loop save and return at the next iteration boundary, or
- :func:`save_now` to write ``last.pt`` of the last completed iteration synchronously (submitit
  exits as soon as ``checkpoint()`` returns). The loop blocks the stop signals while it updates
  the parameters, so a handler never sees a half-applied optimizer step.

The state is per process (a training loop runs once at a time in a process).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_STOPPED = 3  # exit status after request_stop() without a signal

_stop = threading.Event()
_signum: int | None = None
_saver: Callable[[], Path | None] | None = None


def request_stop(signum: int | None = None) -> None:
    """Ask the running loop to save a checkpoint at the next iteration boundary and stop."""
    global _signum
    if signum is not None and _signum is None:
        _signum = signum
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def exit_code() -> int:
    """The exit status of a stopped run: 128 + the signal number, or :data:`EXIT_STOPPED`."""
    return 128 + _signum if _signum is not None else EXIT_STOPPED


def reset() -> None:
    """Forget a previous stop request (a new run starts)."""
    global _signum
    _signum = None
    _stop.clear()


def register_saver(saver: Callable[[], Path | None] | None) -> None:
    """The loop registers how to save its last completed iteration (``None`` when it ends)."""
    global _saver
    _saver = saver


def save_now() -> Path | None:
    """Write ``last.pt`` of the last completed iteration now; ``None`` if no loop is running."""
    return _saver() if _saver is not None else None


def _handler(signum: int, frame) -> None:
    request_stop(signum)


@contextlib.contextmanager
def handle_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Route ``signals`` to :func:`request_stop` while the block runs (main thread only;
    elsewhere a no-op), then restore the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Delay delivery of the stop signals (and submitit's USR2) during a parameter update."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    block = {*STOP_SIGNALS, signal.SIGUSR2}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, block)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
