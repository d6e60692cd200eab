"""Ctrl-C that a library cannot lose.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread is; a library
that catches it (a broad `except` around its own work) then loses the user's Ctrl-C and the run
goes on to the end. `install` (called by `clbench` at start) keeps the default behaviour and also
records the request; the training loop calls `check` at every step, which raises it again if it was
swallowed. Written here because no library offers this; it is a few lines of the signal module.
"""

from __future__ import annotations

import signal
import threading

_requested = False


def _handler(signum, frame):
    global _requested
    _requested = True
    raise KeyboardInterrupt


def install() -> None:
    """Record Ctrl-C from now on (a fresh start: an earlier request in this process is forgotten)."""
    global _requested
    _requested = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came since install, even if something caught it."""
    if _requested:
        raise KeyboardInterrupt
