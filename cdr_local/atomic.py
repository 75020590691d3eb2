"""Whole-or-nothing file writes: temporary file, fsync, rename, fsync the folder.

Metadata sidecars, Ray partitions and the sha256 cache are written with
``write_bytes_atomic``; models (downloaded or converted, written by other code
into a ``.part`` file, see ``models._atomic_file``) use ``fsync_dir`` after
their rename.  A crash or a power cut leaves either the old file or the new
one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


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


def write_bytes_atomic(path: Path, data: bytes, *, tmp: Path | None = None) -> None:
    """Replace ``path`` with ``data`` whole or not at all.

    Raises the ``OSError`` of a failed write (full disk, read-only folder)
    after removing the temporary file; ``path`` is then untouched.
    """
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
