"""Ctrl-C that a library cannot lose.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread is; a library
that catches it (a broad `except` around its own work) then loses the user's Ctrl-C and the run
goes on to the end. `watching` (around every `clbench` command) keeps the default behaviour and
also records the request; the training loop calls `check` at every step, which raises it again if it was
swallowed. Written here because no library offers this; it is a few lines of the signal module.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_requested = False


def _handler(signum, frame):
    global _requested
    _requested = True
    raise KeyboardInterrupt


@contextmanager
def watching():
    """Record Ctrl-C while the block runs (a fresh start: an earlier request is forgotten), then
    put back the SIGINT handler that was there (clbench.cli.main is also called in-process)."""
    global _requested
    _requested = False
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came in the current `watching` block, even if something caught it."""
    if _requested:
        raise KeyboardInterrupt
