"""`feedfan status` and `feedfan drain`: what waits, what runs, what failed.

Status looks at every queue library that is installed and has feedfan queues on
the configured brokers, so during a move from one library to another both show.
Fanout progress comes from feedfan's own counters in Redis (chunks done and
failed against the total planned), not from a result backend.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from feedfan.config import IN_PROCESS_DISPATCHERS, Settings
from feedfan.dispatch import TaskDispatcher, create_dispatcher
from feedfan.errors import FeedfanError, redact_url
from feedfan.priority import FanoutPriority
from feedfan.runner import TaskRunner, load_app
from feedfan.storage.base import FanoutStatus, RejectedMessage, Storage

__all__ = [
    "BackendStatus",
    "DrainResult",
    "StatusReport",
    "backend_status",
    "drain",
    "fanouts_in_flight",
    "gather_status",
    "recent_fanouts",
    "render_status",
    "status_json",
    "status_report",
]

_REAL_BACKENDS = ("celery", "rq", "dramatiq")
_IN_FLIGHT_SCAN = 1000
"""Newest fanouts looked at for those still in flight."""


@dataclass(frozen=True)
class BackendStatus:
    """The queues of one dispatcher: waiting, held by workers, consumers, failed."""

    dispatcher: str
    waiting: dict[str, int | None]
    in_flight: int | None
    consumers: dict[str, int | None]
    failed: list[RejectedMessage] = field(default_factory=list)
    error: str | None = None
    where: str = ""
    """The broker, password masked."""

    own_failed: int | None = None
    """Failed messages kept by the queue library itself (not feedfan's shared rejected list)."""

    @property
    def idle(self) -> bool:
        """Nothing waits, nothing runs, nothing consumes, nothing of its own failed."""
        own = len(self.failed) if self.own_failed is None else self.own_failed
        return (
            self.error is None
            and not any(self.waiting.values())
            and not self.in_flight
            and not any(self.consumers.values())
            and not own
        )


def _key(message: RejectedMessage) -> tuple[str, str, float]:
    return (message.queue, message.body, message.at)


def backend_status(
    dispatcher: TaskDispatcher,
    *,
    failed_limit: int = 100,
    where: str = "",
    shared_rejected: list[RejectedMessage] | None = None,
) -> BackendStatus:
    """Read one dispatcher's queues; a broker that cannot be reached is reported, not raised.

    ``shared_rejected`` is feedfan's own rejected list: failures found in it
    are not counted as the dispatcher's own (every dispatcher can see it).
    """
    try:
        dispatcher.ping()
        failed = dispatcher.failed_messages(limit=failed_limit)
        shared = {_key(m) for m in shared_rejected or ()}
        return BackendStatus(
            dispatcher=dispatcher.name,
            waiting={dispatcher.queue_name(p): dispatcher.queue_depth(p) for p in FanoutPriority},
            in_flight=dispatcher.in_flight(),
            consumers={
                dispatcher.queue_name(p): dispatcher.consumer_count(p) for p in FanoutPriority
            },
            failed=failed,
            where=where,
            own_failed=sum(_key(m) not in shared for m in failed),
        )
    except FeedfanError as e:
        return BackendStatus(dispatcher.name, {}, None, {}, error=str(e), where=where)


def _runner(settings: Settings) -> TaskRunner:
    return TaskRunner(load_app(settings.app, settings))


def _close(runner: TaskRunner) -> None:
    """Close the manager if it was built here (not a module-level instance of the user's)."""
    if runner.manager.settings.app:
        module_name, _, attribute = str(runner.manager.settings.app).partition(":")
        if getattr(sys.modules.get(module_name), attribute, None) is runner.manager:
            return
    with contextlib.suppress(Exception):  # best effort; the answer is already read
        runner.manager.close()


def gather_status(settings: Settings, *, every_backend: bool = True) -> list[BackendStatus]:
    """Status of the configured dispatcher, and of every other installed one with feedfan queues."""
    runner = _runner(settings)
    try:
        return _gather(settings, runner, every_backend=every_backend)
    finally:
        _close(runner)


def _gather(settings: Settings, runner: TaskRunner, *, every_backend: bool) -> list[BackendStatus]:
    names = [settings.dispatcher]
    if every_backend and settings.effective_storage == "redis":
        names += [name for name in _REAL_BACKENDS if name != settings.dispatcher]
    storage = runner.manager.storage
    shared = storage.rejected(limit=10_000)
    found = []
    for name in names:
        try:
            dispatcher = create_dispatcher(settings.replace(dispatcher=name), runner=runner)
        except (FeedfanError, ImportError):
            continue  # not installed, or cannot use this broker: nothing of it can be waiting
        try:
            if name in IN_PROCESS_DISPATCHERS:
                if name == settings.dispatcher:
                    found.append(
                        BackendStatus(name, {}, None, {}, failed=dispatcher.failed_messages())
                    )
                continue
            where = redact_url(settings.effective_broker_url)
            status = backend_status(dispatcher, where=where, shared_rejected=shared)
            if name == settings.dispatcher or not status.idle:
                found.append(status)
        finally:
            dispatcher.close()
    return found


def recent_fanouts(settings: Settings, *, limit: int = 10) -> list[FanoutStatus]:
    """Progress of the most recently started fanouts, newest first."""
    runner = _runner(settings)
    try:
        return _recent(runner.manager.storage, limit)
    finally:
        _close(runner)


def _recent(storage: Storage, limit: int) -> list[FanoutStatus]:
    statuses = (
        storage.fanout_status(fanout_id) for fanout_id in storage.recent_fanouts(limit=limit)
    )
    return [status for status in statuses if status is not None]


def fanouts_in_flight(settings: Settings, *, limit: int = 20) -> list[FanoutStatus]:
    """Fanouts not settled yet (chunks pending, or still being planned), newest first."""
    runner = _runner(settings)
    try:
        return _in_flight(runner.manager.storage, limit)
    finally:
        _close(runner)


def _in_flight(storage: Storage, limit: int) -> list[FanoutStatus]:
    return [s for s in _recent(storage, _IN_FLIGHT_SCAN) if not s.settled][:limit]


@dataclass(frozen=True)
class StatusReport:
    """Everything ``feedfan status`` shows."""

    backends: list[BackendStatus]
    in_flight: list[FanoutStatus]
    recent: list[FanoutStatus]


def status_report(
    settings: Settings, *, recent: int = 10, in_flight: int = 20, every_backend: bool = True
) -> StatusReport:
    """Queues of every backend with feedfan queues, fanouts in flight, the newest fanouts."""
    runner = _runner(settings)
    try:
        storage = runner.manager.storage
        return StatusReport(
            backends=_gather(settings, runner, every_backend=every_backend),
            in_flight=_in_flight(storage, in_flight),
            recent=_recent(storage, recent),
        )
    finally:
        _close(runner)


def _shown(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _state(status: FanoutStatus) -> str:
    if status.complete:
        return "done"
    if status.settled:
        return "settled"
    if status.total is None:
        return "planning"
    return "running"


def _bar(status: FanoutStatus, width: int = 20) -> str:
    if status.total is None or status.total == 0:
        return "[" + "?" * width + "]"
    done = min(status.done / status.total, 1.0)
    failed = min(status.failed / status.total, 1.0 - done)
    filled, broken = int(done * width), int(failed * width)
    return "[" + "#" * filled + "x" * broken + "-" * (width - filled - broken) + "]"


def _fanout_line(status: FanoutStatus, *, bar: bool = False) -> str:
    total = "?" if status.total is None else f"{status.total:,}"
    meta = status.meta
    head = f"  {status.fanout_id}  {meta.get('op', '?'):<10} user {meta.get('user', '?'):<12} "
    progress = f"{_bar(status)} " if bar else ""
    return (
        f"{head}{progress}{status.done:,}/{total} chunks, {status.failed:,} failed  "
        f"{_state(status)}"
    )


def render_status(report: StatusReport, *, failed: int = 5) -> str:
    """The text ``feedfan status`` prints."""
    lines = []
    for backend in report.backends:
        where = f" on {backend.where}" if backend.where else ""
        lines.append(f"dispatcher {backend.dispatcher}{where}")
        if backend.error:
            lines.append(f"  unreachable: {backend.error}")
            continue
        if backend.waiting:
            lines.append(f"  {'queue':<28} {'waiting':>9} {'consumers':>10}")
            for queue, waiting in backend.waiting.items():
                consumers = _shown(backend.consumers.get(queue))
                lines.append(f"  {queue:<28} {_shown(waiting):>9} {consumers:>10}")
            lines.append(f"  held by workers now: {_shown(backend.in_flight)}")
        lines.append(f"  failed or rejected, kept: {len(backend.failed)}")
        lines += [f"    [{m.queue}] {m.reason[:110]}" for m in backend.failed[:failed]]
    lines.append(f"fanouts in flight ({len(report.in_flight)}):")
    lines += [_fanout_line(status, bar=True) for status in report.in_flight]
    lines.append(f"recent fanouts ({len(report.recent)}):")
    lines += [_fanout_line(status) for status in report.recent]
    return "\n".join(lines)


def _fanout_json(status: FanoutStatus) -> dict[str, Any]:
    return {
        "id": status.fanout_id,
        "total": status.total,
        "done": status.done,
        "failed": status.failed,
        "pending": status.pending,
        "state": _state(status),
        **dict(status.meta),
    }


def status_json(report: StatusReport) -> dict[str, Any]:
    """What ``feedfan status --json`` prints."""
    return {
        "backends": [
            {
                "dispatcher": b.dispatcher,
                "broker": b.where,
                "error": b.error,
                "waiting": b.waiting,
                "in_flight": b.in_flight,
                "consumers": b.consumers,
                "failed": [
                    {"queue": m.queue, "reason": m.reason, "body": m.body, "at": m.at}
                    for m in b.failed
                ],
            }
            for b in report.backends
        ],
        "in_flight": [_fanout_json(f) for f in report.in_flight],
        "fanouts": [_fanout_json(f) for f in report.recent],
    }


@dataclass(frozen=True)
class DrainResult:
    """How a drain ended: empty or not, how long it took, what failed meanwhile."""

    empty: bool
    seconds: float
    new_failures: list[RejectedMessage]
    waiting: int = 0
    """Tasks still waiting in the queues when the drain ended."""

    held: int | None = 0
    """Tasks workers still held when it ended; ``None`` when the broker cannot tell."""


def _settled(storage: Storage, fanout_id: str) -> bool:
    status = storage.fanout_status(fanout_id)
    return status is None or status.settled


def _unconsumed(dispatcher: TaskDispatcher) -> list[str]:
    empty = []
    for priority in FanoutPriority:
        if dispatcher.queue_depth(priority) and dispatcher.consumer_count(priority) == 0:
            empty.append(dispatcher.queue_name(priority))
    return empty


def drain(
    settings: Settings,
    dispatcher_name: str,
    *,
    timeout: float = 3600.0,
    interval: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
    notice: Callable[[str], None] | None = None,
) -> DrainResult:
    """Wait until the queues of ``dispatcher_name`` are empty and no task is held.

    ``progress(done, total)`` is called as tasks leave the queues; ``notice``
    receives one-line warnings (a queue with tasks and no consumer). The
    drain ends once two polls in a row find nothing waiting and nothing held.
    Where the broker cannot tell what workers hold (``in_flight`` is
    ``None``: Dramatiq on RabbitMQ), it also waits for the fanouts that were
    in flight when it started to settle, by feedfan's own progress counters.
    Workers keep running; stop them after a drain that ended empty.
    """
    runner = _runner(settings)
    dispatcher = create_dispatcher(settings.replace(dispatcher=dispatcher_name), runner=runner)
    storage = runner.manager.storage
    try:
        dispatcher.ping()
        blind = dispatcher.in_flight() is None
        watched = {s.fanout_id for s in _in_flight(storage, _IN_FLIGHT_SCAN)} if blind else set()
        if notice is not None:
            for queue in _unconsumed(dispatcher):
                notice(
                    f"no worker consumes {queue!r} of {dispatcher_name}: the drain cannot "
                    "progress until one is started."
                )
            if blind:
                notice(
                    f"the {dispatcher_name} broker cannot tell what workers hold; once its "
                    f"queues are empty the drain waits for the {len(watched)} fanout(s) in "
                    "flight now to settle."
                )
        before = {_key(m) for m in dispatcher.failed_messages(limit=10_000)}
        start = time.monotonic()
        initial: int | None = None
        quiet_polls = 0
        while True:
            waiting = sum(dispatcher.queue_depth(p) or 0 for p in FanoutPriority)
            held = dispatcher.in_flight()
            if watched and not waiting:
                watched = {f for f in watched if not _settled(storage, f)}
            remaining = waiting + (held or 0)
            initial = remaining if initial is None else max(initial, remaining)
            if progress is not None:
                progress(initial - remaining, initial)
            quiet_polls = quiet_polls + 1 if remaining == 0 and not watched else 0
            elapsed = time.monotonic() - start
            if quiet_polls >= 2 or elapsed > timeout:
                failures = [
                    m for m in dispatcher.failed_messages(limit=10_000) if _key(m) not in before
                ]
                return DrainResult(
                    empty=quiet_polls >= 2,
                    seconds=elapsed,
                    new_failures=failures,
                    waiting=waiting,
                    held=held,
                )
            time.sleep(interval)
    finally:
        dispatcher.close()
        _close(runner)
