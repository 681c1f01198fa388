"""A progress bar for long commands: done / total, rate and ETA on stderr.

On a terminal it redraws one line; otherwise (CI logs, pipes) it prints a plain line at
most every ``every`` seconds, so logs stay readable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

WIDTH = 30


class Progress:
    def __init__(
        self,
        what: str,
        total: int,
        out: TextIO,
        *,
        tty: bool | None = None,
        every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.total = total
        self.done = 0
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.every = every if not self.tty else 0.1
        self.clock = clock
        self.started = clock()
        self._shown = -1e9

    @property
    def rate(self) -> float:
        elapsed = self.clock() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int) -> None:
        self.done += n
        if self.clock() - self._shown >= self.every:
            self._show()

    def line(self) -> str:
        rate = self.rate
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        left = (self.total - self.done) / rate if rate > 0 else None
        eta = f"{left:,.0f}s" if left is not None else "?"
        text = f"{self.what} {self.done:,}/{self.total:,} ({fraction:.0%}) {rate:,.0f}/s ETA {eta}"
        if not self.tty:
            return text
        filled = round(WIDTH * fraction)
        return f"[{'#' * filled}{'.' * (WIDTH - filled)}] {text}"

    def _show(self) -> None:
        self._shown = self.clock()
        if self.tty:
            self.out.write(f"\r\x1b[K{self.line()}")
        else:
            self.out.write(f"{self.line()}\n")
        self.out.flush()

    def finish(self) -> None:
        self._show()
        if self.tty:
            self.out.write("\n")
            self.out.flush()
