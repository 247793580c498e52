"""The conformance suite, importable by third-party dispatchers.

Opt in to the fixtures from a ``conftest.py``::

    pytest_plugins = ("feedfan.testing.plugin",)

then subclass :class:`DispatcherConformance` (see :mod:`feedfan.testing.suite`).
"""

from feedfan.testing.harness import Harness, WorkerProcess, wait_for
from feedfan.testing.managers import ConformanceManager, MyStreamManager, follower_ids, make_user
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
