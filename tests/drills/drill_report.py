"""The drills' results table: one row per backend and drill, printed at the end of the session."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["DrillRow", "Report"]


@dataclass
class DrillRow:
    """What one drill did to one backend, and what it found."""

    backend: str
    drill: str
    faults: str
    """The faults injected, counted by kind (``"3 chunk-process kills, 2 worker kills"``)."""

    followers: int | str
    lost: int | None = None
    """Feed entries (follower x feed) missing the activity; must be 0."""

    duplicated: int | None = None
    """Feed entries holding more than the one activity they should; must be 0."""

    settle: float | None = None
    """Seconds from ``add_user_activity`` until the fanout settled, under the faults."""

    baseline: float | None = None
    """Seconds the same fanout took to settle uninterrupted, same backend, same session."""

    notes: list[str] = field(default_factory=list)
    outcome: str = "running"
    """``passed``, ``FAILED`` (an assertion or error), set when the test ends."""

    def cells(self) -> list[str]:
        """The row as table cells."""
        if self.settle is None:
            timing = "-"
        elif self.baseline:
            timing = (
                f"{self.settle:.1f} s vs {self.baseline:.1f} s ({self.settle / self.baseline:.1f}x)"
            )
        else:
            timing = f"{self.settle:.1f} s"
        return [
            self.backend,
            self.drill,
            self.faults,
            f"{self.followers:,}" if isinstance(self.followers, int) else self.followers,
            "-" if self.lost is None else f"{self.lost:,}",
            "-" if self.duplicated is None else f"{self.duplicated:,}",
            timing,
            self.outcome,
            "; ".join(self.notes),
        ]


_HEADER = [
    "backend",
    "drill",
    "faults injected",
    "followers / messages",
    "lost",
    "duplicated",
    "settle vs uninterrupted",
    "outcome",
    "notes",
]


class Report:
    """Rows collected during a session (tests add them; the terminal summary prints them)."""

    def __init__(self, *, scale: str, seed: int) -> None:
        self.scale = scale
        self.seed = seed
        self.rows: list[DrillRow] = []
        self._lock = threading.Lock()

    def add(self, row: DrillRow) -> DrillRow:
        """Record ``row`` (filled in further by the drill as it goes)."""
        with self._lock:
            self.rows.append(row)
        return row

    def markdown(self) -> str:
        """The table as Markdown, the way ``docs/drills.md`` shows it."""
        lines = [
            "| " + " | ".join(_HEADER) + " |",
            "|" + "|".join("---" for _ in _HEADER) + "|",
        ]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        return "\n".join(lines)

    def text(self) -> str:
        """The table as aligned plain text, for the terminal."""
        table = [_HEADER, *[row.cells() for row in self.rows]]
        widths = [max(len(line[i]) for line in table) for i in range(len(_HEADER) - 1)]
        out = []
        for number, line in enumerate(table):
            cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
            out.append("  ".join([*cells, line[-1]]).rstrip())
            if number == 0:
                out.append("  ".join("-" * width for width in widths))
        return "\n".join(out)
