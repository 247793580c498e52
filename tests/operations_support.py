"""What the operations tests share: every backend on its brokers, and small helpers.

The operations tests (planning, status and drain, the doctor, limits, the live
swap) run against every adapter and broker that exists, with real workers
started by :class:`feedfan.testing.Harness` the way a user starts them.
"""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from feedfan.activity import Activity
from feedfan.errors import FeedfanError
from feedfan.fanout import FanoutReceipt
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.storage.base import FanoutStatus
from feedfan.testing import Harness
from feedfan.testing.managers import follower_ids

__all__ = [
    "BACKEND_IDS",
    "BACKENDS",
    "SETTLE",
    "everyone_has",
    "namespace",
    "nobody_has",
    "open_harness",
    "pin",
    "settle",
    "timeline",
    "write_module",
]

BACKENDS = [
    ("celery", "redis"),
    ("celery", "amqp"),
    ("rq", "redis"),
    ("dramatiq", "redis"),
    ("dramatiq", "amqp"),
]
BACKEND_IDS = ["celery-redis", "celery-amqp", "rq", "dramatiq-redis", "dramatiq-amqp"]

SETTLE = 120.0
"""Seconds a fanout may take to settle here, worker start-up included (a shared machine)."""


def open_harness(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    """A harness for the backend ``request.param`` names, closed (workers stopped) after."""
    name, broker = request.param
    redis_url = request.getfixturevalue("feedfan_redis_url")
    broker_url = request.getfixturevalue("feedfan_amqp_url") if broker == "amqp" else None
    harness = Harness(
        name,
        log_dir=tmp_path_factory.mktemp(f"ops-{name}-{broker}"),
        redis_url=redis_url,
        broker_url=broker_url,
    )
    try:
        yield harness
    finally:
        harness.close()


def namespace() -> str:
    """A fresh follower namespace for :func:`feedfan.testing.managers.make_user`."""
    return f"t{uuid.uuid4().hex[:10]}"


def pin(user: str, number: int = 0, *, seconds: int = 0) -> Activity:
    """An activity of ``user`` at a fixed time (plus ``seconds``)."""
    when = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)
    return Activity(actor=user, verb="pin", object=f"pin-{number}", time=when)


def settle(
    harness: Harness, manager: Manager, receipt: FanoutReceipt | str, timeout: float = SETTLE
) -> FanoutStatus:
    """Wait for a fanout to settle; on failure show the workers' logs."""
    try:
        return manager.wait(receipt, timeout=timeout)
    except FeedfanError as e:
        raise AssertionError(f"{e}\n{harness.worker_logs()}") from None


def timeline(manager: Manager, user: object) -> list[tuple[str, int]]:
    """The entries of ``user``'s timeline, newest first."""
    return manager.get_feed(user, "timeline").entries(limit=100)  # type: ignore[arg-type]


def everyone_has(manager: Manager, user: str, activity: Activity) -> bool:
    """Whether every follower of conformance ``user`` has exactly ``activity``."""
    expected = [(activity.id, activity.sort_key)]
    return all(
        timeline(manager, follower) == expected
        for priority in FanoutPriority
        for follower in follower_ids(user, priority)
    )


def nobody_has(manager: Manager, user: str) -> bool:
    """Whether no follower of conformance ``user`` has anything in its timeline."""
    return not any(
        timeline(manager, follower)
        for priority in FanoutPriority
        for follower in follower_ids(user, priority)
    )


def write_module(directory: Path, name: str, source: str) -> Path:
    """Write a module workers can import (start them with ``PYTHONPATH=directory``)."""
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return directory
