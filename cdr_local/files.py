"""Which file is which: identity checks before anything is opened for writing.

A command reads some files and writes others (output, rejects, metadata
sidecar, reports).  Comparing *names* is not enough: ``a.jsonl`` and
``./a.jsonl``, a symlink and its target, and two hard links are all one file,
and writing one of them destroys the other.  So files are compared by
identity: device and inode for files that exist (``os.stat`` follows
symlinks, and hard links share an inode), and the fully resolved path for
files that do not exist yet.  Every command calls :func:`check_distinct` on
all the files it touches before it opens any of them for writing.

Stdlib only, no POSIX-only imports: this module is imported by every command.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .errors import CdrError

_KINDS = (
    (stat.S_ISREG, "regular file"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def kind(path: str | Path) -> str:
    """What ``path`` is: ``"missing"``, ``"regular file"``, ``"FIFO (named pipe)"``, ...
    (symlinks followed; never opens the file, so a FIFO cannot block)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unreadable"
    for test, name in _KINDS:
        if test(mode):
            return name
    return "special file"  # pragma: no cover - no other kinds on POSIX


def is_regular(path: str | Path) -> bool:
    return kind(path) == "regular file"


def _identity(path: str | Path) -> tuple[str, object]:
    try:
        st = os.stat(path)
        return ("inode", (st.st_dev, st.st_ino))
    except OSError:
        return ("path", os.path.realpath(path))


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether writing ``a`` would write ``b`` (same inode, or same resolved path)."""
    ia, ib = _identity(a), _identity(b)
    if ia[0] == ib[0]:
        return ia == ib
    # one exists, the other does not: distinct, unless the names resolve alike
    return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(files: Sequence[tuple[str, str | Path | None]]) -> None:
    """Refuse, in one line, any two roles that name the same file.

    ``files`` is ``(role, path)`` in the order the user thinks of them
    (input first); ``None`` and ``"-"`` (stdin/stdout) are skipped.
    """
    named = [(role, p) for role, p in files if p is not None and str(p) != "-"]
    for i, (ra, pa) in enumerate(named):
        for rb, pb in named[i + 1 :]:
            if same_file(pa, pb):
                same = f"{pa}" if str(pa) == str(pb) else f"{pa} and {pb}"
                raise CdrError(f"the {ra} and the {rb} are the same file ({same}): give them different paths")


def check_writable_target(role: str, path: str | Path) -> None:
    """A file we are about to create or replace must be a regular file (or not
    exist yet) in a folder that exists: writing to a FIFO would block, and a
    device such as /dev/null would get sidecars written next to it."""
    k = kind(path)
    if k not in ("missing", "regular file"):
        hint = " (to discard the output, write to stdout: -o - > /dev/null)" if role == "output" else ""
        raise CdrError(f"the {role} {path} is a {k}, not a regular file{hint}")
    parent = Path(path).parent
    if not parent.is_dir():
        raise CdrError(f"the {role}'s folder does not exist: {parent}")
    if k == "missing" and not os.access(parent, os.W_OK | os.X_OK):
        raise CdrError(f"cannot write the {role} {path}: its folder is not writable")
    if k == "regular file" and not os.access(path, os.W_OK):
        raise CdrError(f"cannot write the {role} {path}: permission denied")
