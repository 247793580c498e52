"""The dispatcher's link to a Celery app's broker: one connection, one producer, errors translated.

Publishing, queue lengths, raw pushes and purges all go through one kombu
connection held under a lock, so a manager shared by the threads of a web
server still sends a fanout over one connection and one producer. Driver
errors (kombu, redis-py, py-amqp) leave as feedfan's
:class:`~feedfan.errors.BrokerError`, the URL's password masked.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from celery import Celery
from kombu.exceptions import OperationalError

from feedfan.config import Settings
from feedfan.errors import BrokerError, ConfigurationError, DispatchError, FeedfanError, redact_url

from ._celery_app import TASK_NAME, app_broker_url, broker_kind

__all__ = ["FLUSH_EVERY", "BrokerLink", "Entry"]

Entry = tuple[str, str, str]
"""``(task_id, queue name, JSON body)``: one task to send."""

FLUSH_EVERY = 500
"""Tasks per Redis pipeline round trip, or per RabbitMQ transaction commit."""

_BATCH_COMMANDS = 100 * FLUSH_EVERY
"""kombu's own flush threshold, in Redis commands: far above :data:`FLUSH_EVERY` tasks
(a queue with ``x-expires`` costs several commands a message), so only our flushes count."""

_CONNECT_POLICY: dict[str, Any] = {
    "max_retries": 2,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 1.0,
}

_T = TypeVar("_T")


class BrokerLink:
    """One connection and one producer to ``app``'s broker, made on first use."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.url = app_broker_url(app)
        self.kind = broker_kind(self.url)
        self._lock = threading.RLock()
        self._connection: Any = None
        self._producer: Any = None
        self._pid = 0
        self._queues: dict[str, Any] = {}
        self._known_errors: tuple[type[BaseException], ...] | None = None
        self._lost_errors: tuple[type[BaseException], ...] | None = None
        self._tx_channel: Any = None

    def queue(self, name: str) -> Any:
        """The kombu queue ``name`` as the app declares it (Celery creates missing ones)."""
        if name not in self._queues:
            try:
                self._queues[name] = self.app.amqp.queues[name]
            except KeyError:
                raise ConfigurationError(
                    f"Celery app {self.app.main!r} has no queue {name!r} and does not create "
                    f"missing queues; add kombu.Queue({name!r}) to its task_queues."
                ) from None
        return self._queues[name]

    # Sending ---------------------------------------------------------------

    def send(self, entries: Sequence[Entry], *, declare: Sequence[str]) -> None:
        """Publish ``entries`` as ``feedfan.run`` messages; ``declare`` names every queue used.

        On Redis the messages are pipelined, :data:`FLUSH_EVERY` per round
        trip; on RabbitMQ they go in AMQP transactions of :data:`FLUSH_EVERY`,
        each taken whole when committed or not at all (unless the app asks for
        publisher confirms, which make each message count once confirmed). On
        failure :class:`DispatchError` counts only flushed or committed ones
        as accepted. A batch that fails before any of it was taken, on a
        connection the server had closed meanwhile, is sent once more.
        """
        accepted = 0
        with self._lock:
            stale = self._connection is not None and self._pid == os.getpid()
            while True:
                try:
                    producer = self._ensure_producer(declare)
                    if self.kind == "redis" and getattr(producer, "supports_batch_publish", False):
                        with producer.batch(max_size=_BATCH_COMMANDS) as batch:
                            for number, entry in enumerate(entries, 1):
                                self._publish(producer, entry, retry=False)
                                if number % FLUSH_EVERY == 0:
                                    batch.flush()
                                    accepted = number
                    elif self.kind == "redis" or self._confirms():
                        # Redis that kombu will not batch (kombu before 5.7, or a connection
                        # that retries on timeout or error): one LPUSH per task, counted as
                        # it returns. RabbitMQ with publisher confirms: each counts once
                        # confirmed, and may be retried.
                        for entry in entries:
                            self._publish(producer, entry, retry=self.kind != "redis")
                            accepted += 1
                    else:
                        for number in self._publish_committed(producer, entries):
                            accepted = number
                    return
                except Exception as e:
                    # A new connection next time: an uncommitted transaction or a half
                    # pipeline of this call must never go out with the next one.
                    self._drop()
                    if isinstance(e, FeedfanError):
                        raise
                    if stale and not accepted and isinstance(e, self._connection_errors()):
                        stale = False
                        continue
                    raise self.error(e, "did not take the tasks", accepted=accepted) from e
                except BaseException:
                    self._drop()
                    raise

    def _confirms(self) -> bool:
        options = self.app.conf.broker_transport_options or {}
        return bool(options.get("confirm_publish"))

    def _publish_committed(self, producer: Any, entries: Sequence[Entry]) -> Iterator[int]:
        """Publish in AMQP transactions of :data:`FLUSH_EVERY`; yield the count committed so far.

        Without a transaction (or confirms) a message written to a connection
        that then drops is lost unseen, and would still be counted as accepted.
        """
        channel = producer.channel
        if self._tx_channel is not channel:
            channel.tx_select()
            self._tx_channel = channel
        for number, entry in enumerate(entries, 1):
            self._publish(producer, entry, retry=False)
            if number % FLUSH_EVERY == 0 or number == len(entries):
                channel.tx_commit()
                yield number

    def _publish(self, producer: Any, entry: Entry, *, retry: bool) -> None:
        task_id, queue, body = entry
        self.app.send_task(
            TASK_NAME,
            args=(body,),
            task_id=task_id,
            producer=producer,
            queue=self.queue(queue),
            # Declared once per batch in _ensure_producer, not once per task.
            declare=[],
            # Celery would repr the whole body for logs and events; the task id
            # already names the fanout, priority and chunk.
            argsrepr=f"('<feedfan task, {len(body)} bytes of JSON>',)",
            serializer="json",
            add_to_parent=False,
            ignore_result=True,
            retry=retry,
            retry_policy=_CONNECT_POLICY,
        )

    # Administration ----------------------------------------------------------

    def run(self, what: str, action: Callable[[Any, Any], _T]) -> _T:
        """``action(channel, connection)`` on a channel of its own; errors say ``what`` failed.

        A kept connection the server has closed since (a broker restart, a
        closed vhost) still looks open until used; ``action`` then runs once
        more on a fresh one. Every action here is a read, a declare or a delete.
        """
        with self._lock:
            stale = self._connection is not None and self._pid == os.getpid()
            while True:
                try:
                    connection = self._ensure_connection()
                    with connection.channel() as channel:
                        return action(channel, connection)
                except Exception as e:
                    # A new connection next time: an uncommitted transaction or a half
                    # pipeline of this call must never go out with the next one.
                    self._drop()
                    if isinstance(e, FeedfanError):
                        raise
                    if stale and isinstance(e, self._connection_errors()):
                        stale = False
                        continue
                    raise self.error(e, what) from e

    def depth(self, name: str) -> int:
        """Messages waiting in queue ``name`` (0 if it does not exist yet)."""
        queue = self.queue(name)

        def count(channel: Any, connection: Any) -> int:
            try:
                return int(queue(channel).queue_declare(passive=True).message_count)
            except connection.channel_errors:  # no such queue
                return 0

        return self.run("could not be asked for a queue length", count)

    def push_item(self, name: str, body: bytes) -> None:
        """Put ``body`` on queue ``name`` as the whole broker message: a list item or AMQP body."""
        queue = self.queue(name)

        def push(channel: Any, connection: Any) -> None:
            if self.kind == "redis":
                channel.client.lpush(queue.name, body)
            else:
                queue(channel).declare()
                channel.basic_publish(channel.prepare_message(body), "", queue.name)

        self.run("did not take a raw message", push)

    def delete(self, names: Sequence[str]) -> None:
        """Delete queues ``names``, their messages and their exchanges."""

        def delete(channel: Any, connection: Any) -> None:
            for name in names:
                bound = self.queue(name)(channel)
                # Declared first so kombu's Redis transport knows the binding
                # it must remove along with the list.
                bound.declare()
                bound.delete()
                if bound.exchange.name:
                    bound.exchange.delete()
            # kombu remembers what this connection declared; forget it, or the
            # next publish would skip declaring the queues and RabbitMQ would
            # drop its messages.
            connection.declared_entities.clear()

        self.run("could not delete feedfan's queues", delete)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._drop()

    # Connection --------------------------------------------------------------

    def _ensure_connection(self) -> Any:
        if self._connection is None or self._pid != os.getpid():
            # A connection inherited through fork belongs to the parent.
            self._connection = self.app.connection_for_write()
            self._producer = None
            self._pid = os.getpid()
        self._connection.ensure_connection(**_CONNECT_POLICY)
        return self._connection

    def _ensure_producer(self, declare: Sequence[str]) -> Any:
        connection = self._ensure_connection()
        if self._producer is None:
            self._producer = connection.Producer(serializer="json")
        for name in declare:  # a no-op once this connection declared them
            self._producer.maybe_declare(self.queue(name), retry=True, **_CONNECT_POLICY)
        return self._producer

    def _drop(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        self._tx_channel = None
        if connection is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                connection.release()

    # Errors ------------------------------------------------------------------

    def _broker_errors(self) -> tuple[type[BaseException], ...]:
        if self._known_errors is None:
            # A connection object connects nothing until asked; it knows its
            # transport's error classes.
            probe = self.app.connection_for_write()
            self._known_errors = (
                OperationalError,
                OSError,
                *probe.connection_errors,
                *probe.channel_errors,
            )
        return self._known_errors

    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        # The broker errors that mean the connection, not just a channel, failed.
        if self._lost_errors is None:
            probe = self.app.connection_for_write()
            self._lost_errors = (OperationalError, OSError, *probe.connection_errors)
        return self._lost_errors

    def error(self, error: Exception, what: str, *, accepted: int = 0) -> DispatchError:
        """``error`` as feedfan's: a :class:`BrokerError` saying what to check, if the broker's."""
        text = f"{type(error).__name__}: {str(error).rstrip('.')}"
        cause = error.__cause__
        broker_failure = isinstance(error, self._broker_errors())
        if not broker_failure and isinstance(cause, self._broker_errors()):
            # kombu wraps a Redis pipeline's connection error in BatchPublishError
            # ("delivery is uncertain"); the cause says the broker is at fault.
            broker_failure = True
            text += f", caused by {type(cause).__name__}: {str(cause).rstrip('.')}"
        password = urlsplit(self.url).password
        if password:
            text = text.replace(password, "***")
        if not broker_failure:
            return DispatchError(
                f"Celery dispatcher at {redact_url(self.url)} {what}: {text}.", accepted=accepted
            )
        sources = self.settings.sources
        where = sources.get("broker_url") or sources.get("redis_url", "default")
        server, place = (
            ("Redis", "database") if self.kind == "redis" else ("RabbitMQ", "virtual host")
        )
        return BrokerError(
            f"the Celery broker at {redact_url(self.url)} {what} ({text}). Check that the "
            f"{server} server runs and is reachable from here, and that broker_url (from "
            f"{where}) has the right host, port, user, password and {place}.",
            accepted=accepted,
        )
