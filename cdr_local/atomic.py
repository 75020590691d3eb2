"""Whole-or-nothing file writes: temporary file, fsync, rename, fsync the folder.

Metadata sidecars, reports, Ray partitions and the sha256 cache are written
with ``write_bytes_atomic``; ``cdr lc``'s rewritten output streams through
``atomic_writer``; models (downloaded or converted, written by other code
into a ``.part`` file, see ``models._atomic_file``) use ``fsync_dir`` after
their rename.  A crash or a power cut leaves either the old file or the new
one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast


def fsync_dir(d: Path) -> None:
    """Make a rename in ``d`` survive a power cut (where the platform allows)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, *, tmp: Path | None = None) -> Iterator[BinaryIO]:
    """Stream into a temporary file that replaces ``path`` only if the block ends cleanly.

    On any exception (a full disk, a bad record, Ctrl-C) the temporary file is
    removed, the exception propagates and ``path`` is untouched.  The temporary
    name is unique (``.NAME.PID.RANDOM.tmp`` beside ``path``), so two processes
    writing one path never share a temporary file: the last rename wins, and
    the file is always one whole version.
    """
    mode = "wb"
    if tmp is None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        mode = "xb"  # never another writer's temporary file
    created = False
    try:
        with open(tmp, mode) as f:
            created = True
            yield cast(BinaryIO, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes, *, tmp: Path | None = None) -> None:
    """Replace ``path`` with ``data`` whole or not at all.

    Raises the ``OSError`` of a failed write (full disk, read-only folder)
    after removing the temporary file; ``path`` is then untouched.
    """
    with atomic_writer(path, tmp=tmp) as f:
        f.write(data)

