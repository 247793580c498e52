"""The conformance suite, importable by third-party dispatchers.

Opt in to the fixtures from a ``conftest.py``::

    pytest_plugins = ("feedfan.testing.plugin",)

then subclass :class:`DispatcherConformance` (see :mod:`feedfan.testing.suite`).
The suite needs pytest; the harness and the managers do not, and the
benchmarks use them where only the ``bench`` dependencies are installed, so
the suite is imported when it is first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from feedfan.testing.harness import Harness, WorkerProcess, wait_for
from feedfan.testing.managers import ConformanceManager, MyStreamManager, follower_ids, make_user

if TYPE_CHECKING:
    from feedfan.testing.suite import DispatcherConformance

__all__ = [
    "ConformanceManager",
    "DispatcherConformance",
    "Harness",
    "MyStreamManager",
    "WorkerProcess",
    "follower_ids",
    "make_user",
    "wait_for",
]


if not TYPE_CHECKING:  # mypy sees the import above, and still flags unknown names

    def __getattr__(name: str) -> Any:
        if name == "DispatcherConformance":
            from feedfan.testing.suite import DispatcherConformance

            return DispatcherConformance
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
