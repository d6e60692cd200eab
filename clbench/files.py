"""Writing files so that a crash never leaves half of one, and hashing them: the one
implementation every writer of clbench uses (results, samples, checkpoints, prepared data).

A file is written to a temp file beside it, `.clbench-tmp-<pid>-<8 random characters>-<name>`,
flushed to disk and renamed onto its name: a reader sees the old file or the new one. A process
killed mid-write leaves only the temp file, which `remove_unfinished_writes` deletes on the next
run of the directory. The prefix is clbench's own, so no user file (`.env.20240101`) is ever
taken for one, and the pid keeps a live writer's file from being taken for a dead one's. A failed
write (a full disk, a read-only folder) is one line naming the file meant."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path

from clbench.errors import ClbenchError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_UMASK = os.umask(0o022)  # read once, at import (single-threaded): os.umask both reads and sets
os.umask(_UMASK)


TEMP_PREFIX = ".clbench-tmp-"


def temp_file(path: Path) -> str:
    """A new empty temp file beside `path` (`.clbench-tmp-<pid>-<8 random characters>-<name>`), to
    be renamed onto it, with the permissions of any new file under the user's umask (mkstemp makes
    it 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=f"-{path.name}", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
    finally:
        os.close(fd)
    return tmp


_UNFINISHED = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-[A-Za-z0-9_]{8}-.+")  # temp_file's names
# The folders of a run directory that clbench writes files into (clbench.results.contract, clbench.checkpoint);
# anything else in it (a user's files, a tracker's folder, another run directory) is never looked into.
RUN_SUBDIRS = ("samples", "checkpoints")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours: this process is not writing it (it calls this before writing anything)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_unfinished_writes(run_dir: Path) -> list[Path]:
    """Delete the temp files of writes that never finished in the run directory `run_dir` (a
    process killed mid-write leaves one; a full-FT checkpoint's is a whole model copy): files named
    as temp_file names them, at the top of `run_dir` and below its own folders (RUN_SUBDIRS) only,
    never through a symlink and never into a folder holding another run's `.lock`; a file whose
    writer is still alive is left alone. Only call this while holding `run_dir`'s lock."""
    run_dir = Path(run_dir)
    found = []

    def scan(folder: Path, recurse: bool):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        if folder != run_dir and any(e.name == ".lock" for e in entries):
            return  # another run directory nested inside ours: its lock holder owns its files
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if recurse:
                    scan(Path(e.path), True)
            elif e.is_file(follow_symlinks=False):
                m = _UNFINISHED.fullmatch(e.name)
                if m and not _alive(int(m.group(1))):
                    found.append(Path(e.path))

    scan(run_dir, False)
    for sub in RUN_SUBDIRS:
        if (run_dir / sub).is_dir() and not (run_dir / sub).is_symlink():
            scan(run_dir / sub, True)
    for p in sorted(found):
        p.unlink(missing_ok=True)
    return sorted(found)


class WriteError(ClbenchError):
    """A results, samples or checkpoint file could not be written (disk full, read-only, ...)."""


def write_failed(path: Path, e: OSError) -> WriteError:
    """One readable line for a failed write: the file meant, and why (an OSError raised by write()
    or fsync() names no file of its own)."""
    why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return WriteError(f"writing {path} failed: {why}; the files written before it are kept")


@contextlib.contextmanager
def atomic_replace(path: Path):
    """`with atomic_replace(path) as tmp:` write the file at `tmp` (a path beside `path`); when the
    block ends it is renamed onto `path`. On any error the temp file goes, `path` keeps its old
    content, and an OSError becomes a WriteError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_file(path)
    except OSError as e:
        raise write_failed(path, e) from e
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise write_failed(path, e) from e
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) atomically and durably to `path`."""
    with atomic_replace(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())


