"""Celery, the reference dispatcher: real ``celery worker`` processes on Redis or RabbitMQ.

Choose it by configuration (``dispatcher = "celery"``, ``broker_url =
"redis://…"`` or ``"amqp://…"``) or in code with :class:`CeleryManager`.
feedfan builds a Celery app from its settings, or uses yours
(``CeleryManager(celery_app=app)``, or :func:`register_tasks` once in the
module ``celery -A`` imports). Workers run::

    celery -A feedfan.backends.celery:app worker -Q feedfan.high,feedfan.low \\
        --prefetch-multiplier 1 --concurrency 2 -n feedfan-high-low-1@%h

which ``feedfan worker`` prints and runs. See ``docs/celery.md``.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from celery import Celery

from feedfan.config import Settings, load_settings
from feedfan.dispatch import Delivery, Finding, TaskDispatcher, WorkerCommand
from feedfan.errors import ConfigurationError, DispatchError, FeedfanError
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.storage.base import RejectedMessage, Storage
from feedfan.storage.redis import RedisStorage
from feedfan.task import Task, decode_task

from ._celery_app import (
    TASK_NAME,
    build_app,
    check_app,
    default_app,
    end_inline,
    inline_runner,
    prepare_app,
    register_tasks,
)
from ._celery_broker import BrokerLink
from ._celery_ops import CeleryInspector

if TYPE_CHECKING:
    from feedfan.runner import TaskRunner

__all__ = [
    "TASK_NAME",
    "WORKER_APP",
    "CeleryDispatcher",
    "CeleryManager",
    "register_tasks",
    "worker_app",
]

WORKER_APP = "feedfan.backends.celery:app"
"""What ``celery -A`` takes to run feedfan's own worker app."""

_ALL_REJECTED = 10_000_000


class CeleryDispatcher(TaskDispatcher):
    """Sends fanout tasks to Celery: one named queue per priority, JSON only.

    ``app`` is your Celery app (checked, and given feedfan's task and guard
    as by :func:`register_tasks`); without it, the app given to
    :func:`register_tasks` in this process, else one feedfan builds from
    ``settings``. Nothing connects until the first task is sent. Publishing
    goes over one connection and one producer held by the dispatcher (a
    lock makes it safe to share between threads); on Redis a batch goes in
    one pipelined round trip per 500 tasks.

    With ``task_always_eager`` set in the app's configuration (or the old
    ``CELERY_ALWAYS_EAGER``), chunks run inline in the caller, through
    Celery's eager path and feedfan's JSON codec.
    """

    name = "celery"
    supports_bulk_enqueue = True
    rejected_location = (
        "feedfan's rejected list in Redis (<key_prefix>rejected): read it with "
        "failed_messages(), send valid tasks back with replay_failed()"
    )

    def __init__(
        self,
        settings: Settings,
        *,
        runner: TaskRunner | None = None,
        app: Celery | None = None,
    ) -> None:
        super().__init__(settings, runner=runner)
        chosen = app if app is not None else default_app()
        self._owns_app = chosen is None
        if chosen is None:
            chosen = build_app(settings)
        else:
            check_app(chosen, settings)
            prepare_app(chosen, settings)
        self.app: Celery = chosen
        self.link = BrokerLink(self.app, settings)
        self.broker = self.link.kind
        options = self.app.conf.broker_transport_options or {}
        if self.broker == "amqp" or options.get("queue_order_strategy") != "priority":
            # RabbitMQ pushes from both queues a worker consumes, and kombu's
            # Redis transport round-robins unless told otherwise; then only a
            # dedicated HIGH worker guarantees HIGH is never behind LOW.
            self.strict_priority = False
        if self.eager:
            self.delivery = Delivery.INLINE
            self.runs_in_process = True
            self.has_queues = False
            self.redelivers_lost_tasks = False
        self._storage: Storage | None = None
        self.inspector = CeleryInspector(self.app, self.link, settings)

    @property
    def eager(self) -> bool:
        """Whether the app runs tasks inline (``task_always_eager``)."""
        return bool(self.app.conf.task_always_eager)

    # Sending -------------------------------------------------------------

    def publish(self, task: Task, body: str) -> None:
        """Send one task to the queue of its priority (or run it, when eager)."""
        self._send([(task.task_id, task.priority, body)])

    def publish_many(self, items: Sequence[tuple[Task, str]]) -> None:
        """Send a batch over the dispatcher's one connection and producer."""
        self._send([(task.task_id, task.priority, body) for task, body in items])

    def _send(self, entries: Sequence[tuple[str, FanoutPriority, str]]) -> None:
        if self.eager:
            for task_id, priority, body in entries:
                self._run_inline(task_id, priority, body)
            return
        self.link.send(
            [(task_id, self.queue_name(priority), body) for task_id, priority, body in entries],
            declare=self.queue_names(list(FanoutPriority)),
        )

    def _run_inline(self, task_id: str, priority: FanoutPriority, body: str) -> None:
        runner = self._require_runner()
        # The round trip a broker would make: arguments travel as JSON.
        args = json.loads(json.dumps([body]))
        token = inline_runner(runner, self.queue_name(priority))
        try:
            self.app.tasks[TASK_NAME].apply(args=args, task_id=task_id, throw=True)
        finally:
            end_inline(token)

    def _require_runner(self) -> TaskRunner:
        if self.runner is None:
            raise ConfigurationError(
                "the celery dispatcher runs chunks inline (task_always_eager is set) and needs "
                "a manager; build it through Manager(...) or CeleryManager(...)."
            )
        return self.runner

    # Queues and workers -----------------------------------------------------

    def redelivery_bound(self) -> float | None:
        """Seconds within which a chunk held by a dead worker runs again.

        Redis: the visibility timeout, plus one sweep of the transport's
        restore timer (kombu restores unacknowledged messages older than the
        timeout when a worker starts and then every ``unacked_restore_interval``
        x ``unacked_restore_throttle`` seconds). RabbitMQ: a closed connection
        returns its messages at once; a host that vanished is noticed after
        missing heartbeats, so two heartbeat intervals.
        """
        if self.eager:
            return None
        conf = self.app.conf
        if self.broker == "redis":
            options = conf.broker_transport_options or {}
            sweep = options.get("unacked_restore_interval", 10) * max(
                1, options.get("unacked_restore_throttle", 10)
            )
            return float(options.get("visibility_timeout", 3600) + sweep)
        heartbeat = conf.broker_heartbeat
        if not heartbeat:
            return None
        return float(2 * heartbeat)

    def worker_command(
        self, priorities: Sequence[FanoutPriority], *, concurrency: int | None = None
    ) -> WorkerCommand:
        """``celery -A feedfan.backends.celery:app worker -Q <high>,<low> …``, HIGH first."""
        queues = self.queue_names(priorities)
        label = "-".join(p.value for p in FanoutPriority if p in priorities)
        argv = [
            *_celery_program(),
            "-A",
            WORKER_APP,
            "worker",
            "-Q",
            ",".join(queues),
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency or self.settings.worker_concurrency),
            "--prefetch-multiplier",
            "1",
            "-n",
            f"feedfan-{label}-{uuid.uuid4().hex[:8]}@%h",
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
        ]
        return WorkerCommand(argv)

    # Inspection --------------------------------------------------------------

    def queue_depth(self, priority: FanoutPriority) -> int | None:
        """Tasks waiting in the broker queue of ``priority`` (not those held by workers)."""
        if self.eager:
            return None
        return self.link.depth(self.queue_name(priority))

    def in_flight(self) -> int | None:
        """Chunks workers hold, unacknowledged: Redis from kombu's unacked hash, RabbitMQ from the workers."""
        if self.eager:
            return None
        return self.inspector.in_flight(self.queue_names(list(FanoutPriority)))

    def consumer_count(self, priority: FanoutPriority) -> int | None:
        """Consumers of the priority's queue: RabbitMQ's count, or on Redis the workers' answers."""
        if self.eager:
            return None
        return self.inspector.consumer_count(self.queue_name(priority))

    def ping(self) -> None:
        """Raise :class:`~feedfan.errors.BrokerError` if the broker cannot be reached."""
        if not self.eager:
            self.inspector.ping()

    def check(self) -> list[Finding]:
        """Findings about the Celery app this dispatcher publishes through, and its live workers."""
        if self.eager:
            return []
        return self.inspector.findings(self.queue_names(list(FanoutPriority)))

    def _rejected_storage(self) -> Storage:
        if self.runner is not None:
            return self.runner.manager.storage
        if self._storage is None:
            self._storage = RedisStorage(
                url=self.settings.effective_redis_url,
                key_prefix=self.settings.key_prefix,
                status_ttl=self.settings.status_ttl,
            )
        return self._storage

    def failed_messages(self, *, limit: int = 100) -> list[RejectedMessage]:
        """Messages workers refused or gave up on, newest first, from feedfan's rejected list."""
        return self._rejected_storage().rejected(limit=limit)

    def replay_failed(self, *, limit: int | None = None) -> int:
        """Send kept messages that are valid tasks back to their queues; return how many.

        The others are kept again, after the newer ones (their ``at`` becomes
        the replay's time). If the broker fails midway, what it did not take
        is kept again too, and the :class:`~feedfan.errors.DispatchError` is raised.
        """
        storage = self._rejected_storage()
        waiting = len(storage.rejected(limit=_ALL_REJECTED))
        replay: list[tuple[RejectedMessage, Task, str]] = []
        keep: list[RejectedMessage] = []
        for _ in range(waiting):
            if limit is not None and len(replay) >= limit:
                break
            message = storage.pop_rejected()
            if message is None:
                break
            try:
                task = decode_task(message.body, max_bytes=self.settings.max_task_bytes)
                replay.append((message, task, self.encode(task)))
            except FeedfanError:
                keep.append(message)
        try:
            if replay:
                self.publish_many([(task, body) for _, task, body in replay])
        except DispatchError as e:
            keep.extend(message for message, _, _ in replay[e.accepted :])
            raise
        finally:
            for message in keep:
                storage.keep_rejected(message.queue, message.body, message.reason)
        return len(replay)

    def push_raw(self, priority: FanoutPriority, body: bytes, *, envelope: bool = True) -> None:
        """Put ``body`` on the queue of ``priority`` unchecked (tests and drills only).

        With ``envelope``, a well-formed ``feedfan.run`` message whose argument
        is ``body`` as text (undecodable bytes escaped); without it, ``body``
        is the raw Redis list item or AMQP message body.
        """
        text = body.decode("utf-8", "backslashreplace") if isinstance(body, bytes) else body
        if self.eager:
            self._run_inline(f"raw-{uuid.uuid4().hex}", priority, text)
            return
        if envelope:
            self._send([(f"raw-{uuid.uuid4().hex}", priority, text)])
            return
        self.link.push_item(self.queue_name(priority), body)

    def purge(self) -> None:
        """Delete feedfan's two queues, their waiting tasks and their exchanges."""
        if not self.eager:
            self.link.delete(self.queue_names(list(FanoutPriority)))

    def close(self) -> None:
        """Close the dispatcher's connection (and the app it built)."""
        self.link.close()
        if self._storage is not None:
            self._storage.close()
            self._storage = None
        if self._owns_app:
            self.app.close()


def _celery_program() -> list[str]:
    # The `celery` script beside this interpreter, so the worker runs in the
    # same environment whatever PATH says.
    script = Path(sys.executable).with_name("celery")
    return [str(script)] if script.exists() else [sys.executable, "-m", "celery"]


class CeleryManager(Manager):
    """A :class:`~feedfan.manager.Manager` bound to Celery in code, as in Stream Framework.

    ``celery_app`` (an argument, or a class attribute of your subclass) is
    your Celery app; feedfan's task is registered on it. Without one,
    feedfan's own app is used.
    """

    bound_dispatcher = "celery"
    celery_app: ClassVar[Celery | None] = None

    def __init__(self, *, celery_app: Celery | None = None, **kwargs: Any) -> None:
        self._celery_app = celery_app if celery_app is not None else type(self).celery_app
        super().__init__(**kwargs)

    def make_dispatcher(self, settings: Settings) -> TaskDispatcher:
        """A :class:`CeleryDispatcher` on ``celery_app`` (unless settings chose another queue)."""
        if settings.dispatcher != self.bound_dispatcher:
            return super().make_dispatcher(settings)
        return CeleryDispatcher(settings, runner=self.runner, app=self._celery_app)


_worker_app: Celery | None = None
_worker_lock = threading.Lock()


def worker_app() -> Celery:
    """feedfan's own app for ``celery -A feedfan.backends.celery:app worker``.

    Built once, from :func:`~feedfan.config.load_settings` (the ``FEEDFAN_*``
    variables ``feedfan worker`` sets, or your ``feedfan.toml``).
    """
    global _worker_app
    with _worker_lock:
        if _worker_app is None:
            _worker_app = build_app(load_settings())
        return _worker_app


def __getattr__(name: str) -> Any:
    # `app` is built on first use, so importing this module reads no settings.
    if name == "app":
        return worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
