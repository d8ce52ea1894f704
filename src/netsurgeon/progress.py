"""Progress of long phases: a rich bar when stderr is a terminal, else a log line every few seconds.

Library code reports through the ``netsurgeon.progress`` logger (the CLI shows it at INFO), never ``print``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

__all__ = ["Progress", "log"]

log = logging.getLogger("netsurgeon.progress")


class Progress:
    """One phase of ``total`` units. ``update(done, info)`` as it goes, ``close()`` at the end (or use ``with``).

    ``enabled=False`` makes every call a no-op. Off a terminal a line is logged at the start, at most every
    ``every_s`` seconds while running (done/total, elapsed, estimated time left) and at the end.
    """

    every_s = 5.0

    def __init__(self, description: str, total: int, *, enabled: bool = True, start: int = 0) -> None:
        self.description, self.total, self.enabled = description, max(int(total), 1), enabled
        self.done, self.start, self._t0 = start, start, time.perf_counter()
        self._last = self._t0
        self._bar: Any = None
        if not enabled:
            return
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=Console(stderr=True))
            self._task = self._bar.add_task(description, total=self.total, completed=start, info="")
            self._bar.start()
        else:
            log.info("%s: %d/%d", description, start, self.total)

    def update(self, done: int, info: str = "") -> None:
        if not self.enabled:
            return
        self.done = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=info)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            elapsed = now - self._t0
            # the rate of this run only: units done before a resume took no time here
            left = elapsed / max(done - self.start, 1) * (self.total - done)
            log.info("%s: %d/%d %s(%.0f s, about %.0f s left)", self.description, done, self.total,
                     f"{info} " if info else "", elapsed, left)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        else:
            log.info("%s: done, %d/%d in %.1f s", self.description, self.done, self.total,
                     time.perf_counter() - self._t0)
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
