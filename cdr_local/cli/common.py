"""What several commands share after a run: the "nothing scored" check."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CdrError

if TYPE_CHECKING:
    from ..pipeline import RunSummary


class NothingScored(CdrError):
    """A finished run wrote no record: every input line was rejected, or there was none.

    Exit code 1, apart from the user errors' 2: the command ran as asked, and its
    rejects file and sidecar are written, but the output is empty.
    """

    exit_code = 1


def require_scored(summary: RunSummary, *, resume: bool = False, limit: int | None = None) -> None:
    """Raise :class:`NothingScored` when the run that produced ``summary`` scored nothing.

    Not an error: an interrupted run (its own exit code), an output that already
    held records (a resume), records held back by --min-confidence / --keep-top
    (they were scored), ``--limit 0``, and a resumed run with nothing left to do.
    """
    if summary.interrupted or summary.done or summary.resumed or summary.abstained:
        return
    n = summary.rejected
    if n:
        where = f"see {summary.rejects_path}" if summary.rejects_path else "the reasons are above, on stderr"
        lines = "the only input line was" if n == 1 else f"all {n} input lines were"
        raise NothingScored(f"nothing scored: {lines} rejected ({where})")
    if resume or limit == 0:
        return
    raise NothingScored("nothing scored: the input is empty")
