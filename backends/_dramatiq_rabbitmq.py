"""The RabbitMQ side of the Dramatiq adapter.

Dramatiq's :class:`~dramatiq.brokers.rabbitmq.RabbitmqBroker` declares each
queue durable with a delay queue ``<queue>.DQ`` and a dead-letter queue
``<queue>.XQ`` (the queue's ``x-dead-letter-routing-key``), and publishes
persistent messages (``delivery_mode=2``) without publisher confirms, one
``basic_publish`` per ``send``.

Feedfan declares queues through the broker, so they have exactly Dramatiq's
arguments, and publishes a batch on one channel of its own in an AMQP
transaction: the batch is taken whole or not at all, so feedfan knows how
many tasks the broker accepted. Messages are published ``mandatory``; one
returned because its queue vanished is published again once the queue is
declared anew.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import pika
import pika.exceptions
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import dq_name, q_name, xq_name
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message

from feedfan.errors import DispatchError

from ._dramatiq_queues import BrokerQueues, DeadLetter, read_dead_letter

__all__ = ["RabbitQueues"]

_PERSISTENT = 2
_READ_CAP = 50_000
_NOT_FOUND = 404
_T = TypeVar("_T")


def _properties() -> pika.BasicProperties:
    return pika.BasicProperties(delivery_mode=_PERSISTENT)


def _header_text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _death(properties: pika.BasicProperties) -> tuple[str, float | None]:
    """The broker's reason and time of dead-lettering, from the ``x-death`` header."""
    deaths = (properties.headers or {}).get("x-death") or []
    if not deaths:
        return "published to the dead-letter queue", None
    first = deaths[0]
    when = first.get("time")
    at = when.timestamp() if isinstance(when, datetime) else None
    return _header_text(first.get("reason", "dead-lettered")), at


class RabbitQueues(BrokerQueues):
    """Feedfan's operations on a (user's or feedfan's) Dramatiq RabbitmqBroker."""

    errors = (pika.exceptions.AMQPError, ConnectionClosed)
    connection_errors = (pika.exceptions.AMQPConnectionError, ConnectionClosed)
    kind = "RabbitMQ"

    def __init__(self, broker: RabbitmqBroker) -> None:
        self.broker = broker
        self._lock = threading.RLock()
        self._connection: pika.BlockingConnection | None = None
        self._tx: Any = None
        self._returned: list[str] = []

    # Connection and channels, opened on first use -----------------------------

    def _connect(self) -> pika.BlockingConnection:
        if self._connection is None or not self._connection.is_open:
            self._connection = pika.BlockingConnection(parameters=self.broker.parameters)
            self._tx = None
        return self._connection

    def _tx_channel(self) -> Any:
        if self._tx is None or not self._tx.is_open:
            channel = self._connect().channel()
            channel.add_on_return_callback(
                lambda _channel, method, _props, _body: self._returned.append(method.routing_key)
            )
            channel.tx_select()
            self._tx = channel
        return self._tx

    def _reset(self) -> None:
        connection, self._connection, self._tx = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()

    def _declare(self, queues: set[str]) -> None:
        for queue in sorted(queues):
            # Through the broker, so the queue gets Dramatiq's own arguments (DLX, durability).
            self.broker.declare_queue(queue, ensure=True)

    # Sending ------------------------------------------------------------------

    def _publish_once(self, items: Sequence[tuple[str, bytes]]) -> list[str]:
        self._declare({q_name(queue) for queue, _ in items})
        channel = self._tx_channel()
        self._returned.clear()
        for routing_key, body in items:
            channel.basic_publish(
                exchange="",
                routing_key=routing_key,
                body=body,
                properties=_properties(),
                mandatory=True,
            )
        channel.tx_commit()
        # A basic.return precedes commit-ok but is dispatched by the next event pass.
        self._connect().process_data_events(0)
        return list(self._returned)

    def _run(self, operation: Callable[[], _T]) -> _T:
        """Run ``operation`` on feedfan's connection, once more on a fresh one if it was stale.

        A connection idle past its heartbeat is closed by the server. Every
        operation here is a transaction or a read, so running it again is safe.
        """
        with self._lock:
            stale = self._connection is not None and self._connection.is_open
            try:
                return operation()
            except pika.exceptions.AMQPConnectionError:
                self._reset()
                if not stale:
                    raise
            return operation()

    def _publish(self, items: Sequence[tuple[str, bytes]]) -> None:
        returned = set(self._run(lambda: self._publish_once(items)))
        if not returned:
            return
        for queue in returned:
            self.broker.queues_pending.add(q_name(queue))
        lost = [item for item in items if item[0] in returned]
        if self._run(lambda: self._publish_once(lost)):
            leading = next(i for i, item in enumerate(items) if item[0] in returned)
            raise DispatchError(
                f"RabbitMQ returned the tasks for queue(s) {sorted(returned)} twice: the "
                "queues vanish as soon as they are declared. Is something deleting them "
                "(a policy, another process)?",
                accepted=leading,
            )

    def publish(self, messages: Sequence[Message[Any]]) -> None:
        """All messages on one channel, in one transaction (one commit round trip)."""
        for message in messages:
            self.broker.emit_before("enqueue", message, None)
        self._publish([(m.queue_name, m.encode()) for m in messages])
        for message in messages:
            self.broker.emit_after("enqueue", message, None)

    def push_raw(self, queue: str, data: bytes) -> None:
        """``data`` as the whole AMQP body, persistent, on the queue's own routing key."""
        self._publish([(queue, data)])

    # Inspection ---------------------------------------------------------------

    def _counts(self, queue: str) -> tuple[int, int]:
        """``queue``'s ready messages and consumers by a passive declare; none if missing."""
        channel = self._connect().channel()
        try:
            method = channel.queue_declare(queue, passive=True).method
            return int(method.message_count), int(method.consumer_count)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != _NOT_FOUND:
                raise
            return 0, 0
        finally:
            if channel.is_open:
                channel.close()

    def _ready(self, queue: str) -> int:
        return self._counts(queue)[0]

    def ping(self) -> None:
        """Open (or reuse) feedfan's connection to RabbitMQ."""
        self._run(self._connect)

    def consumers(self, queue: str) -> int:
        """The queue's consumer count, as RabbitMQ reports it."""
        return self._run(lambda: self._counts(queue)[1])

    def depth(self, queue: str) -> int:
        """Ready messages of the queue and of its delay queue."""
        return self._run(lambda: self._ready(queue) + self._ready(dq_name(queue)))

    def _read(self, channel: Any, queue: str, visit: Callable[[DeadLetter], None]) -> None:
        for _ in range(min(self._ready(xq_name(queue)), _READ_CAP)):
            method, properties, body = channel.basic_get(xq_name(queue), auto_ack=False)
            if method is None:
                return
            reason, at = _death(properties)
            visit(
                read_dead_letter(queue, body, at=at, broker_reason=reason, ref=method.delivery_tag)
            )

    def _dead_letters(self, queue: str) -> list[DeadLetter]:
        letters: list[DeadLetter] = []
        channel = self._connect().channel()
        try:
            self._read(channel, queue, letters.append)
        finally:
            if channel.is_open:
                channel.close()  # the unacked messages go back, in their order
        return letters

    def dead_letters(self, queue: str, *, limit: int) -> list[DeadLetter]:
        """Read with ``basic_get`` and never acked: closing the channel puts them back."""
        return list(reversed(self._run(lambda: self._dead_letters(queue))))[:limit]

    def _replay(self, queue: str, prepare: Callable[[str], object], limit: int) -> int:
        replayed = 0
        self._declare({queue})
        channel = self._connect().channel()
        channel.tx_select()

        def visit(letter: DeadLetter) -> None:
            nonlocal replayed
            fresh = letter.replay_message(prepare) if replayed < limit else None
            if fresh is None:
                return
            channel.basic_publish(
                exchange="", routing_key=queue, body=fresh.encode(), properties=_properties()
            )
            channel.basic_ack(letter.ref)
            replayed += 1

        try:
            self._read(channel, queue, visit)
            channel.tx_commit()
        finally:
            if channel.is_open:
                channel.close()  # what was not acked goes back to the XQ
        return replayed

    def replay(self, queue: str, prepare: Callable[[str], object], *, limit: int) -> int:
        """Publish valid dead letters afresh and ack them, in one transaction."""
        return self._run(lambda: self._replay(queue, prepare, limit))

    # Housekeeping ---------------------------------------------------------------

    def _purge(self, queues: Sequence[str]) -> None:
        channel = self._connect().channel()
        try:
            for queue in queues:
                for name in (queue, dq_name(queue), xq_name(queue)):
                    channel.queue_delete(name)
                if queue in self.broker.queues:
                    self.broker.queues_pending.add(queue)
        finally:
            if channel.is_open:
                channel.close()

    def purge(self, queues: Sequence[str]) -> None:
        """Delete each queue with its ``.DQ`` and ``.XQ``; the broker will declare them anew."""
        self._run(lambda: self._purge(queues))

    def close(self) -> None:
        """Close feedfan's own connection (the broker's are closed by its owner)."""
        with self._lock:
            self._reset()
