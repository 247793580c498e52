"""A small progress bar for the command line, silent when not on a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``with Progress("fanout", total=500) as bar: bar.advance()`` draws on stderr.

    On a terminal the bar redraws at most ten times a second; elsewhere (CI
    logs, pipes) only the final line is written, so logs stay readable.
    """

    def __init__(
        self, label: str, *, total: int, stream: TextIO | None = None, width: int = 30
    ) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self.stream = stream or sys.stderr
        self.width = width
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._drawn = 0.0

    def __enter__(self) -> Progress:
        self._draw()
        return self

    def __exit__(self, *exc: object) -> None:
        self._draw(final=True)

    def advance(self, step: int = 1) -> None:
        """Count ``step`` more items done."""
        self.done += step
        now = time.monotonic()
        if self.live and now - self._drawn >= 0.1:
            self._draw()

    def update(self, done: int) -> None:
        """Set the count of items done."""
        self.advance(done - self.done)

    def _draw(self, *, final: bool = False) -> None:
        if not self.live and not final:
            return
        self._drawn = time.monotonic()
        fraction = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = int(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = self._drawn - self._started
        line = f"{self.label:<22} [{bar}] {self.done:>8,}/{self.total:<8,} {elapsed:6.1f}s"
        end = "\n" if final else ""
        prefix = "\r" if self.live else ""
        self.stream.write(prefix + line + end)
        self.stream.flush()
