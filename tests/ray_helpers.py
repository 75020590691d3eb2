"""Helpers that Ray workers import in tests/test_ray.py (the tests folder is on their PYTHONPATH)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


class SlowTask:
    """A task that takes ``delay`` seconds more per record, so a test can kill an actor mid-run."""

    def __init__(self, task: Any, delay: float) -> None:
        self.task = task
        self.delay = delay

    def process(self, record: Any) -> Any:
        time.sleep(self.delay)
        return self.task.process(record)


@dataclass(frozen=True)
class SlowFactory:
    """Wraps a task factory (cdr_local.runs.ScoringSpec) with :class:`SlowTask`."""

    inner: Any
    delay: float

    def __call__(self) -> Any:
        built = self.inner()
        built.task = SlowTask(built.task, self.delay)
        return built
