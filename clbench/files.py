"""Writing files so that a crash never leaves half of one, and hashing them: the one
implementation every writer of clbench uses (results, samples, checkpoints, prepared data).

A file is written to a temp file beside it, `.<name>.<8 random characters>`, flushed to disk and
renamed onto its name: a reader sees the old file or the new one. A process killed mid-write
leaves only the temp file, which `remove_unfinished_writes` deletes on the next run of the
directory. A failed write (a full disk, a read-only folder) is one line naming the file meant."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path

from .errors import ClbenchError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_UMASK = os.umask(0o022)  # read once, at import (single-threaded): os.umask both reads and sets
os.umask(_UMASK)


def temp_file(path: Path) -> str:
    """A new empty temp file beside `path` (`.<name>.<8 random characters>`), to be renamed onto it,
    with the permissions of any new file under the user's umask (mkstemp makes it 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
    finally:
        os.close(fd)
    return tmp


_UNFINISHED = re.compile(r"\..+\.[a-z0-9_]{8}")  # temp_file's names


def remove_unfinished_writes(folder: Path) -> list[Path]:
    """Delete the temp files of writes that never finished anywhere under `folder` (a process
    killed mid-write leaves one; a full-FT checkpoint's is a whole model copy). Only call this
    while holding the run directory's lock: no other process is writing there."""
    gone = sorted(p for p in Path(folder).rglob(".*") if p.is_file() and _UNFINISHED.fullmatch(p.name))
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


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


