"""Feedfan on Dramatiq, with Redis or RabbitMQ as its broker.

Select it with ``dispatcher = "dramatiq"`` and a ``broker_url`` (``redis://``
or ``amqp://``; without one, the feeds' ``redis_url``), or bind it in code
with :class:`DramatiqManager`. Each priority has its queue
(``queue_high``, ``queue_low``) and its actor (``feedfan_high``, Dramatiq
priority 0; ``feedfan_low``, priority 10); both run the task body through
:func:`feedfan.runner.get_runner`. Start workers with ``feedfan worker``,
which runs::

    dramatiq feedfan.backends.dramatiq:setup_worker -Q feedfan.high feedfan.low \\
        -p 1 -t 2 -f feedfan.backends.dramatiq:maintenance_loop \\
        --worker-shutdown-timeout 130000

See ``docs/dramatiq.md`` for retries, dead letters and redelivery.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dramatiq.broker import Broker
from dramatiq.brokers.redis import RedisBroker

from feedfan.config import Settings
from feedfan.dispatch import Finding, TaskDispatcher, WorkerCommand
from feedfan.errors import BrokerError, ConfigurationError, DispatchError, redact_url
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.storage.base import RejectedMessage
from feedfan.task import ChunkTask, Task, decode_task

from ._dramatiq_brokers import (
    build_broker,
    check_encoder,
    dramatiq_findings,
    queues_for,
    redelivery_bound,
)
from ._dramatiq_queues import body_text, task_message
from ._dramatiq_redis import FeedfanRedisBroker
from ._dramatiq_worker import (
    MAX_BACKOFF_MS,
    MIN_BACKOFF_MS,
    declare_actors,
    maintenance_loop,
    setup_worker,
)

if TYPE_CHECKING:
    from feedfan.runner import TaskRunner

__all__ = [
    "MAINTENANCE_FORK",
    "MAX_BACKOFF_MS",
    "MIN_BACKOFF_MS",
    "WORKER_BROKER",
    "DramatiqDispatcher",
    "DramatiqManager",
    "FeedfanRedisBroker",
    "declare_actors",
    "maintenance_loop",
    "setup_worker",
]

WORKER_BROKER = "feedfan.backends.dramatiq:setup_worker"
"""What ``dramatiq`` is told to load: the callable that sets up a worker process."""

MAINTENANCE_FORK = "feedfan.backends.dramatiq:maintenance_loop"
"""The ``--fork-function`` feedfan's worker command runs beside the workers."""

_QUEUE_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9._-]*")
_SHUTDOWN_MARGIN_SECONDS = 10


def _check_queue_names(settings: Settings) -> None:
    for setting in ("queue_high", "queue_low"):
        name = getattr(settings, setting)
        if not _QUEUE_NAME.fullmatch(name) or name.endswith((".DQ", ".XQ")):
            raise ConfigurationError(
                f"{setting}={name!r} (from {settings.sources.get(setting, 'default')}) is not "
                "a Dramatiq queue name: use letters, digits, '.', '_' and '-', starting with a "
                "letter or '_', and not ending in .DQ or .XQ (Dramatiq's delay and dead-letter "
                "queues)."
            )


def _dramatiq_executable() -> str:
    beside = Path(sys.executable).with_name("dramatiq")
    if beside.exists():
        return str(beside)
    return shutil.which("dramatiq") or "dramatiq"


def _describe_broker(broker: Any) -> str:
    """Where a broker points, password masked."""
    if isinstance(broker, RedisBroker):
        kwargs = broker.client.connection_pool.connection_kwargs
        if "path" in kwargs:
            return f"unix://{kwargs['path']}"
        return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
    parameters = getattr(broker, "parameters", None)
    first = parameters[0] if isinstance(parameters, (list, tuple)) else parameters
    if first is None:
        return repr(broker)
    return f"amqp://{first.host}:{first.port}/{first.virtual_host}"


class DramatiqDispatcher(TaskDispatcher):
    """Sends tasks to Dramatiq's queues on Redis or RabbitMQ; ``dramatiq`` runs them.

    ``broker`` may be a ``RedisBroker`` or ``RabbitmqBroker`` of your own;
    otherwise one is built from ``broker_url``. Nothing connects until the
    first task is sent. Dramatiq's global broker is left alone.
    """

    name = "dramatiq"
    supports_bulk_enqueue = True
    strict_priority = False
    """A worker takes HIGH messages first among those it has fetched (actor priority), but
    it fetches each queue separately (``2 x threads`` at a time), so a LOW message may run
    while more HIGH ones still wait in the broker. Give HIGH its own workers for strict order."""
    rejected_location = (
        "Dramatiq's dead-letter queues (<queue>.XQ) and feedfan's rejected list (feedfan status)"
    )

    def __init__(
        self,
        settings: Settings,
        *,
        runner: TaskRunner | None = None,
        broker: Broker | None = None,
    ) -> None:
        super().__init__(settings, runner=runner)
        check_encoder()
        _check_queue_names(settings)
        self._owns_broker = broker is None
        self.broker: Broker = build_broker(settings) if broker is None else broker
        self.queues = queues_for(self.broker)
        self.where = (
            redact_url(settings.effective_broker_url)
            if self._owns_broker
            else _describe_broker(self.broker)
        )

    @contextmanager
    def _translated(self, action: str, *, accepted: int = 0) -> Iterator[None]:
        try:
            yield
        except self.queues.connection_errors as e:
            source = self.settings.sources.get("broker_url", "default")
            pointer = (
                f"broker_url (FEEDFAN_BROKER_URL, from {source})"
                if self._owns_broker
                else "the broker you passed to feedfan"
            )
            raise BrokerError(
                f"could not {action}: Dramatiq's {self.queues.kind} broker at {self.where} is "
                f"unreachable ({e!r}). Check that {self.queues.kind} is running and that "
                f"{pointer} points at it.",
                accepted=accepted,
            ) from e
        except self.queues.errors as e:
            raise DispatchError(
                f"could not {action}: Dramatiq's {self.queues.kind} broker at {self.where} "
                f"refused it ({e!r}).",
                accepted=accepted,
            ) from e

    # Sending ---------------------------------------------------------------

    def publish(self, task: Task, body: str) -> None:
        """Send one task to its priority's queue."""
        self.publish_many([(task, body)])

    def publish_many(self, items: Sequence[tuple[Task, str]]) -> None:
        """Send a batch whole or not at all: one Redis MULTI/EXEC, or one AMQP transaction."""
        messages = [
            task_message(self.queue_name(task.priority), task.priority, body)
            for task, body in items
        ]
        with self._translated(f"send {len(messages)} task(s)"):
            self.queues.publish(messages)

    def push_raw(self, priority: FanoutPriority, body: bytes, *, envelope: bool = True) -> None:
        """Put ``body`` on a queue unchecked: as the actor's argument, or as the whole message."""
        queue = self.queue_name(priority)
        with self._translated(f"push a raw message to {queue}"):
            if envelope:
                self.queues.publish([task_message(queue, priority, body_text(body))])
            else:
                self.queues.push_raw(queue, bytes(body))

    # Queues and workers ----------------------------------------------------------

    def redelivery_bound(self) -> float | None:
        """Seconds until a SIGKILLed worker's messages are back on their queue.

        Redis: ``redelivery_timeout`` (the heartbeat timeout) plus a maintenance
        round and two consumer polls; RabbitMQ: two AMQP heartbeats.
        """
        bound = redelivery_bound(self.settings, self.broker)
        return None if bound is None else float(bound)

    def worker_command(
        self, priorities: Sequence[FanoutPriority], *, concurrency: int | None = None
    ) -> WorkerCommand:
        """``dramatiq`` with one process of ``concurrency`` threads for ``priorities``, HIGH first.

        One process, because fanout is I/O-bound and because Dramatiq's main
        process exits when one of its worker processes dies: run more
        ``feedfan worker`` commands (under a supervisor) to use more cores.
        """
        threads = concurrency or self.settings.worker_concurrency
        shutdown_ms = (self.settings.chunk_time_limit + _SHUTDOWN_MARGIN_SECONDS) * 1000
        return WorkerCommand(
            [
                _dramatiq_executable(),
                WORKER_BROKER,
                "-Q",
                *self.queue_names(priorities),
                "-p",
                "1",
                "-t",
                str(threads),
                "-f",
                MAINTENANCE_FORK,
                "--worker-shutdown-timeout",
                str(shutdown_ms),
            ]
        )

    # Inspection -------------------------------------------------------------------

    def queue_depth(self, priority: FanoutPriority) -> int:
        """Messages waiting in the priority's queue and its delay queue (retries)."""
        queue = self.queue_name(priority)
        with self._translated(f"read the depth of {queue}"):
            return int(self.queues.depth(queue))

    def in_flight(self) -> int | None:
        """Messages workers hold (Redis: their ack sets); ``None`` on RabbitMQ, which cannot say."""
        with self._translated("count the messages workers hold"):
            return self.queues.held(self.queue_names(list(FanoutPriority)))

    def consumer_count(self, priority: FanoutPriority) -> int | None:
        """Consumers of the priority's queue (RabbitMQ); ``None`` on Redis, which keeps no count."""
        queue = self.queue_name(priority)
        with self._translated(f"count the consumers of {queue}"):
            return self.queues.consumers(queue)

    def ping(self) -> None:
        """Raise :class:`~feedfan.errors.BrokerError` if the broker cannot be reached."""
        with self._translated("reach the broker"):
            self.queues.ping()

    def check(self) -> list[Finding]:
        """Dramatiq findings: heartbeats, and maintenance on a shared Redis."""
        return dramatiq_findings(self.settings, self.broker)

    def failed_messages(self, *, limit: int = 100) -> list[RejectedMessage]:
        """Dead letters of both queues, then feedfan's rejected list; newest first.

        Entries of the rejected list saying a chunk was given up on are left
        out: on Dramatiq such a chunk is in its dead-letter queue, with the
        same reason, until it is replayed.
        """
        found: list[RejectedMessage] = []
        for priority in FanoutPriority:
            queue = self.queue_name(priority)
            with self._translated(f"read the dead letters of {queue}"):
                letters = self.queues.dead_letters(queue, limit=limit)
            found += [
                RejectedMessage(queue, letter.reason, letter.shown_body, letter.at)
                for letter in letters
            ]
        if self.runner is not None:
            mine = set(self.queue_names(list(FanoutPriority)))
            found += [
                kept
                for kept in self.runner.manager.storage.rejected(limit=limit)
                if not (kept.queue in mine and kept.reason.startswith("gave up:"))
            ]
        found.sort(key=lambda message: message.at, reverse=True)
        return found[:limit]

    def _prepare_replay(self, body: str) -> Task:
        """Decode a dead letter's task; a chunk given up on counts as pending again."""
        if self.runner is None:
            return decode_task(body, max_bytes=self.settings.max_task_bytes)
        task = self.runner.decode(body)
        if isinstance(task, ChunkTask):
            self.runner.manager.storage.clear_chunk_failure(task.fanout_id, task.chunk_key)
        return task

    def replay_failed(self, *, limit: int | None = None) -> int:
        """Send the dead letters that are valid tasks back to their queues, retries reset."""
        remaining = 10**9 if limit is None else limit
        replayed = 0
        for priority in FanoutPriority:
            queue = self.queue_name(priority)
            with self._translated(f"replay the dead letters of {queue}", accepted=replayed):
                replayed += self.queues.replay(
                    queue, self._prepare_replay, limit=remaining - replayed
                )
        return replayed

    def purge(self) -> None:
        """Delete both queues with their ``.DQ`` and ``.XQ`` (and, on Redis, their ack sets)."""
        with self._translated("purge feedfan's queues"):
            self.queues.purge(self.queue_names(list(FanoutPriority)))

    def close(self) -> None:
        """Close feedfan's connections, and the broker when feedfan built it."""
        self.queues.close()
        if self._owns_broker:
            self.broker.close()
            if isinstance(self.broker, RedisBroker):
                self.broker.client.close()


class DramatiqManager(Manager):
    """A :class:`~feedfan.manager.Manager` bound to Dramatiq in code.

    ``broker`` is an optional ``RedisBroker`` or ``RabbitmqBroker`` of yours,
    used to send tasks; workers still build theirs from ``broker_url``.
    """

    bound_dispatcher = "dramatiq"

    def __init__(self, *, broker: Broker | None = None, **kwargs: Any) -> None:
        self._broker = broker
        super().__init__(**kwargs)

    def make_dispatcher(self, settings: Settings) -> TaskDispatcher:
        """A :class:`DramatiqDispatcher` on the given broker, unless configured otherwise."""
        if settings.dispatcher != DramatiqDispatcher.name:
            return super().make_dispatcher(settings)
        return DramatiqDispatcher(settings, runner=self.runner, broker=self._broker)
