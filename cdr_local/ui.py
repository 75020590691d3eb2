"""Terminal display for pipeline runs: a rich progress bar on a TTY, plain log lines otherwise.

Fed by pipeline events (the pipeline itself never imports rich).  Everything
goes to stderr, so ``-o -`` can stream JSONL on stdout.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from .pipeline import RunSummary
from .records import Reject

LOG_EVERY_S = 10.0


class RunDisplay:
    def __init__(self, title: str, *, quiet: bool = False, plain: bool | None = None) -> None:
        from rich.console import Console
        from rich.markup import escape

        self.title = escape(title)
        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False)
        self.plain = (not self.console.is_terminal) if plain is None else plain
        self._progress: Any = None
        self._task: Any = None
        self.n = 0
        self.tokens = 0.0
        self.margin_sum = 0.0
        self.margin_n = 0
        self.first = 0.0
        self.first_n = 0
        self.rejects = 0
        self.sim_sum = 0.0
        self.sim_n = 0
        self.total: int | None = None
        self.t0 = time.perf_counter()
        self._last_log = self.t0

    # events ---------------------------------------------------------------
    def start(self, total: int | None, resumed: int) -> None:
        self.total = total
        self.t0 = self._last_log = time.perf_counter()
        if self.quiet:
            return
        if resumed:
            self.console.print(f"resuming: {resumed} records already in the output are skipped")
        if self.plain:
            self.console.print(f"{self.title}: started ({total if total is not None else '?'} input lines)")
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[extra]}"),
            console=self.console,
            transient=False,
            refresh_per_second=4,
        )
        self._progress.start()
        todo = None if total is None else max(total - resumed, 0)
        self._task = self._progress.add_task(self.title, total=todo, rate="", extra="")

    def record(self, stats: dict[str, float]) -> None:
        self.n += 1
        self.tokens += stats.get("tokens", 0.0)
        if "margin" in stats:
            self.margin_sum += stats["margin"]
            self.margin_n += 1
        if "first_wins" in stats:
            self.first += stats["first_wins"]
            self.first_n += 1
        if "similarity" in stats:
            self.sim_sum += stats["similarity"]
            self.sim_n += 1
        self._update()

    def reject(self, reject: Reject) -> None:
        self.rejects += 1
        self._update()

    def _status(self) -> tuple[str, str]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = f"{self.n / dt:.2f} rec/s {self.tokens / dt:,.0f} tok/s"
        parts = []
        if self.margin_n:
            parts.append(f"mean margin {self.margin_sum / self.margin_n:+.2f}")
        if self.first_n:
            parts.append(f"first wins {100 * self.first / self.first_n:.0f}%")
        if self.sim_n:
            parts.append(f"mean similarity {self.sim_sum / self.sim_n:.3f}")
        if self.rejects:
            parts.append(f"rejects {self.rejects}")
        return rate, "  ".join(parts)

    def _update(self) -> None:
        if self.quiet:
            return
        rate, extra = self._status()
        if self._progress is not None:
            self._progress.update(self._task, advance=1, rate=rate, extra=extra)
            return
        now = time.perf_counter()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            total = f"/{self.total}" if self.total is not None else ""
            self.console.print(f"{self.title}: {self.n}{total} done  {rate}  {extra}")

    def finish(self, s: RunSummary) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self.quiet:
            return
        self.console.print(summary_table(s))
        if self.sim_n:
            self.console.print(f"mean similarity (cosine) of kept pairs: {self.sim_sum / self.sim_n:.4f}")
        if s.interrupted:
            self.console.print("[yellow]interrupted[/]: everything written so far is valid; rerun with --resume to continue")


def quantiles(xs: list[float], qs: tuple[float, ...]) -> list[float]:
    if not xs:
        return []
    v = sorted(xs)
    out = []
    for q in qs:
        pos = q * (len(v) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return out


def histogram(xs: list[float], bins: int = 10, width: int = 30) -> list[tuple[float, float, int, str]]:
    if not xs:
        return []
    lo, hi = min(xs), max(xs)
    if hi == lo:
        return [(lo, hi, len(xs), "#" * width)]
    step = (hi - lo) / bins
    counts = [0] * bins
    for x in xs:
        counts[min(int((x - lo) / step), bins - 1)] += 1
    top = max(counts)
    return [(lo + i * step, lo + (i + 1) * step, c, "#" * max(1 if c else 0, round(width * c / top))) for i, c in enumerate(counts)]


def summary_table(s: RunSummary) -> Any:
    from rich.console import Group
    from rich.table import Table

    t = Table(title="cdr summary", show_header=False, title_justify="left")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("records scored", str(s.done))
    if s.resumed:
        t.add_row("already in output (resume)", str(s.resumed))
    t.add_row("rejected", f"{s.rejected}" + (f"  -> {s.rejects_path}" if s.rejected and s.rejects_path else ""))
    if s.abstained_path:
        t.add_row("abstained (not confident enough)", f"{s.abstained}" + (f"  -> {s.abstained_path}" if s.abstained else ""))
    t.add_row("truncated", str(s.truncated))
    t.add_row("ties", str(s.ties))
    if s.first_n:
        t.add_row("first response wins", f"{100 * s.first_wins / s.first_n:.1f}%")
    t.add_row("time", f"{s.seconds:.1f} s")
    if s.seconds > 0:
        t.add_row("throughput", f"{s.done / s.seconds:.2f} rec/s, {s.tokens / s.seconds:,.0f} scored tok/s")
    parts: list[Any] = [t]
    if s.margins:
        qs = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
        qt = Table(title="margin (the rule's value, best - worst)", title_justify="left")
        for name in ("mean", "min", "p10", "p25", "median", "p75", "p90", "max"):
            qt.add_column(name, justify="right")
        qt.add_row(f"{s.margin_sum / s.margin_n:.3f}", *(f"{v:.3f}" for v in quantiles(s.margins, qs)))
        parts.append(qt)
        ht = Table(show_header=False, box=None)
        for lo, hi, c, bar in histogram(s.margins):
            ht.add_row(f"[{lo:8.2f}, {hi:8.2f})", str(c), bar)
        parts.append(ht)
    return Group(*parts)


def say(message: str) -> None:
    """A one-off status line on stderr (model pulls and the like)."""
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()
