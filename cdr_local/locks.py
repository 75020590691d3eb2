"""Exclusive locks: one writer per output.

``flock`` locks belong to an open file and the kernel drops them when the
process dies, so a killed run never leaves a stale lock.  ``fcntl`` is
POSIX-only; it is imported here, lazily, so that importing cdr-local works
everywhere (on a platform without it, locking is skipped: the README says
which platforms are tested).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import CdrError


def try_lock(fd: int) -> bool:
    """Take an exclusive lock on an open file without waiting; False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def lock_path_for(target: Path) -> Path:
    """The lock file of ``target``: hidden, beside it (``.NAME.lock``)."""
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def exclusive(target: Path, what: str) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``target`` for the block, or fail at once with a
    one-line error if another cdr process holds it.  The lock file is removed
    on exit.  A process that opened the old lock file just before it was
    removed would lock a file nobody else sees: after locking, the path is
    checked to still be the locked file, and the lock is taken again if not.
    """
    path = lock_path_for(target)
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CdrError(f"cannot create the lock {path}: {e.strerror or e}") from None
        if not try_lock(fd):
            os.close(fd)
            raise CdrError(f"{target} is being written by another cdr {what} (locked: {path})")
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)  # removed under us: take the new one
    else:  # pragma: no cover - ten races in a row
        raise CdrError(f"cannot lock {target}: its lock file keeps changing")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
