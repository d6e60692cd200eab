"""Ctrl-C and SIGTERM that a library cannot lose.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread is; a library
that catches it (a broad `except` around its own work) then loses the user's Ctrl-C and the run
goes on to the end. `watching` (around every `clbench` command) keeps the default behaviour and
also records the request; the training loop calls `check` at every step, which raises it again if it was
swallowed. Written here because no library offers this; it is a few lines of the signal module.

SIGTERM (what `kill`, a batch scheduler's time limit or a container stop sends) is handled the
same way: by default Python dies of it on the spot with no word (exit 143) and leaves the lock and
the half-done stage to the next run; here it stops the command as Ctrl-C does (`Terminated`, a
KeyboardInterrupt), so the results are recorded, the lock released and one line printed. A second
signal while the first is being handled is not raised again (a sweep forwards the signal to its
runs, which may also have had it from the terminal): the command is already stopping.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

_requested: int | None = None  # the signal that asked the command to stop


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled as Ctrl-C is, told apart in the message and the exit status (143)."""


def _stop(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum, frame):
    global _requested
    if _requested is not None:
        return  # already stopping
    _requested = signum
    raise _stop(signum)


def requested() -> int | None:
    """The signal that asked this command to stop (SIGINT or SIGTERM), or None."""
    return _requested


@contextmanager
def watching():
    """Record Ctrl-C and SIGTERM while the block runs (a fresh start: an earlier request is
    forgotten), then put back the handlers that were there (clbench.cli.main is also called
    in-process)."""
    global _requested
    _requested = None
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _stop_with_parent()
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# Set by a sweep's launcher (clbench.experiments.launch.run_unit) to its own pid: the run is to stop, as on
# SIGTERM, if that process dies (a launcher SIGKILLed, as submitit's local executor does to its job
# worker a second after cancelling it), rather than train on as an orphan holding its lock.
PARENT_ENV = "CLBENCH_STOP_WITH_PARENT"


def _stop_with_parent() -> None:
    """Linux's PR_SET_PDEATHSIG (prctl(2)): SIGTERM to this process when the launcher that started
    it dies; a launcher already gone by now is seen by the parent pid having changed. Elsewhere a
    no-op. The variable is consumed, so processes this one starts do not inherit it."""
    want = os.environ.pop(PARENT_ENV, "")
    if not want.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(want):  # the launcher died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def check() -> None:
    """Raise KeyboardInterrupt (Terminated for SIGTERM) if a stop came in the current `watching`
    block, even if something caught it."""
    if _requested is not None:
        raise _stop(_requested)
