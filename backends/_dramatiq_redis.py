"""The Redis side of the Dramatiq adapter.

Dramatiq's :class:`~dramatiq.brokers.redis.RedisBroker` keeps a queue as a
list of message ids (``<ns>:<queue>``) and a hash of their data
(``<ns>:<queue>.msgs``); a worker moves the ids it fetched into
``<ns>:__acks__.<worker id>.<queue>`` until it acks them, and dead letters
live in the sorted set ``<ns>:<queue>.XQ`` with their data in
``<ns>:<queue>.XQ.msgs``. Every operation is one call of its Lua script
``dispatch.lua`` (verified against Dramatiq 2.2.1), whose arguments are
``command, timestamp, queue, worker id, heartbeat timeout, dead message TTL,
do maintenance, max unpack size, *command arguments``.

Feedfan calls that script in a pipeline to enqueue a batch in one round
trip, runs its maintenance on a clock rather than by chance, and gives the
broker a consumer that dead-letters an undecodable message instead of
crashing on it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast
from uuid import uuid4

import redis
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import current_millis, dq_name, xq_name
from dramatiq.errors import ConnectionClosed, DecodeError
from dramatiq.message import Message

from feedfan.errors import ConfigurationError

from ._dramatiq_queues import (
    DEAD_AT_OPTION,
    REASON_OPTION,
    BrokerQueues,
    DeadLetter,
    decode_failure,
    read_dead_letter,
)

__all__ = ["FeedfanRedisBroker", "RedisQueues"]

logger = logging.getLogger("feedfan.dramatiq")

IDLE_POLL_MS = 100
"""Longest an idle feedfan Redis consumer sleeps between looks at its queue (Dramatiq: 1 s)."""

URGENT_POLL_MS = 10
"""The same for the HIGH queue, so a HIGH fanout is not kept waiting behind a sleep."""


_SCRIPT_LAYOUT_MARK = b"local max_unpack_size = ARGV[8]"


def _ack_set(namespace: str, worker_id: str, queue: str) -> str:
    """The key of the messages of ``queue`` that worker ``worker_id`` holds (dispatch.lua's)."""
    return f"{namespace}:__acks__.{worker_id}.{queue}"


class _KeepingConsumer(_RedisConsumer):
    """A Redis consumer that dead-letters the messages Dramatiq's own one chokes on.

    Dramatiq's consumer lets a decode error escape, which restarts the
    consumer, strands the messages it had prefetched until the worker stops,
    and meets the same message again after every restart. A decodable message
    without ``redis_message_id`` (not written by RedisBroker) could never be
    acked or nacked. Both are moved to ``<queue>.XQ`` and the worker goes on.

    It also fetches again as soon as a slot frees. Dramatiq's consumer, once
    it holds ``prefetch`` messages, sleeps a backoff that doubles on every
    look (5 ms, 10 ms, ... up to the worker timeout) however soon a worker
    thread acks one, so threads sat idle beside a full queue: at 100
    followers a chunk, a worker ran half the chunks it could. This one waits
    for the next ack or nack instead; an empty queue is still polled with
    Dramatiq's backoff.
    """

    def __init__(self, broker: Any, queue_name: str, prefetch: int, timeout: int) -> None:
        cap = broker.idle_poll_ms(queue_name)
        if cap is not None:
            timeout = min(timeout, cap)
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        self._slot_freed = threading.Event()

    def ack(self, message: Any) -> None:
        """Dramatiq's ack, then wake the consumer: it may fetch one more."""
        try:
            super().ack(message)  # type: ignore[no-untyped-call]
        finally:
            self._slot_freed.set()

    def nack(self, message: Any) -> None:
        """Dramatiq's nack, then wake the consumer: it may fetch one more."""
        try:
            super().nack(message)  # type: ignore[no-untyped-call]
        finally:
            self._slot_freed.set()

    def __next__(self) -> Any:
        if not self.message_cache and self.outstanding_message_count >= self.prefetch:
            # Full: wait for a worker thread to finish one (cleared first, then
            # checked again, so an ack in between is not missed).
            self._slot_freed.clear()
            if self.outstanding_message_count >= self.prefetch:
                self._slot_freed.wait(self.timeout / 1000)
            return None
        try:
            message = super().__next__()  # type: ignore[no-untyped-call]
        except DecodeError as e:
            raw = e.data if isinstance(e.data, bytes) else str(e.data).encode()
            reason = f"not a Dramatiq message ({decode_failure(e)})"
            self._dead_letter(lambda data: data == raw, reason)
            return None
        if message is not None and "redis_message_id" not in message.options:
            self.queued_message_ids.discard(message.message_id)
            wanted = message.message_id
            self._dead_letter(
                lambda data: _message_id(data) == wanted,
                "a message RedisBroker did not write (it has no redis_message_id)",
                annotate=message,
            )
            return None
        return message

    def _dead_letter(
        self, matches: Callable[[bytes], bool], reason: str, *, annotate: Any = None
    ) -> None:
        broker, queue = self.broker, self.queue_name
        acks = _ack_set(broker.namespace, broker.broker_id, queue)
        try:
            held = sorted(broker.client.smembers(acks))
            found = broker.client.hmget(f"{broker.namespace}:{queue}.msgs", held) if held else []
            for message_id, data in zip(held, found, strict=True):
                if data is not None and matches(data):
                    if annotate is not None:
                        annotate_held(broker, queue, message_id.decode(), annotate, reason)
                    broker.do_nack(queue, message_id.decode())
                    logger.warning(
                        "feedfan: refused a message on queue %s, %s; moved it to %s and went on",
                        queue,
                        reason,
                        xq_name(queue),
                    )
                    return
        except redis.ConnectionError as e:
            raise ConnectionClosed(e) from None  # type: ignore[no-untyped-call]
        logger.error("feedfan: could not find again a message on queue %s: %s", queue, reason)


def _message_id(data: bytes) -> str | None:
    try:
        return str(Message.decode(data).message_id)
    except DecodeError:
        return None


_ANNOTATE_HELD = """
if redis.call("sismember", KEYS[1], ARGV[1]) == 1 and redis.call("hexists", KEYS[2], ARGV[1]) == 1 then
    redis.call("hset", KEYS[2], ARGV[1], ARGV[2])
    return 1
end
return 0
"""


def annotate_held(
    broker: RedisBroker, queue: str, message_id: str, message: Any, reason: str
) -> None:
    """Write ``reason`` into the data of ``message_id``, which this worker holds on ``queue``.

    Called just before Dramatiq's nack, which moves the data as it is to
    ``<queue>.XQ.msgs`` in one script: the dead letter never shows without
    its reason. Nothing is written unless this worker still holds the
    message. Should the worker die between this write and the nack, the
    message goes back to its queue with the reason in its options and runs
    once more with no retry left; a malformed one is refused again at once.
    """
    options = {**message.options, REASON_OPTION: reason, DEAD_AT_OPTION: current_millis()}
    data = Message(**{**message.asdict(), "options": options}).encode()
    keys = [
        _ack_set(broker.namespace, broker.broker_id, queue),
        f"{broker.namespace}:{queue}.msgs",
    ]
    broker.client.register_script(_ANNOTATE_HELD)(keys=keys, args=[message_id, data])


class FeedfanRedisBroker(RedisBroker):
    """Dramatiq's RedisBroker whose consumers survive messages that do not decode.

    Its consumers also fetch again as soon as a worker thread frees a slot,
    and an idle one looks at its queue at least every :data:`IDLE_POLL_MS`
    (every :data:`URGENT_POLL_MS` for the queues named in ``urgent_queues``,
    feedfan's HIGH queue) instead of Dramatiq's ``dramatiq_worker_timeout``
    (1 s); a smaller ``dramatiq_worker_timeout`` still wins. Delay queues
    keep Dramatiq's timing.
    """

    def __init__(self, *args: Any, urgent_queues: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.urgent_queues = frozenset(urgent_queues)

    def idle_poll_ms(self, queue_name: str) -> int | None:
        """The longest idle sleep of a consumer of ``queue_name``, in ms; ``None``: Dramatiq's."""
        if queue_name.endswith(".DQ"):
            return None
        return URGENT_POLL_MS if queue_name in self.urgent_queues else IDLE_POLL_MS

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        """The consumer that dead-letters undecodable messages."""
        return _KeepingConsumer


class RedisQueues(BrokerQueues):
    """Feedfan's operations on a (user's or feedfan's) Dramatiq RedisBroker."""

    errors = (redis.RedisError, ConnectionClosed)
    connection_errors = (redis.ConnectionError, redis.TimeoutError, ConnectionClosed)
    kind = "Redis"

    def __init__(self, broker: Any) -> None:
        script = broker.scripts["dispatch"].script
        text = script if isinstance(script, bytes) else str(script).encode()
        if _SCRIPT_LAYOUT_MARK not in text:
            raise ConfigurationError(
                "the installed Dramatiq's Redis script has an argument layout feedfan does "
                "not know; install a dramatiq release feedfan supports (>=1.17,<3)."
            )
        self.broker = broker
        self.client: redis.Redis = broker.client
        self.namespace: str = broker.namespace
        self._dispatch = broker.scripts["dispatch"]

    def _key(self, queue: str) -> str:
        return f"{self.namespace}:{queue}"

    def _args(
        self, command: str, queue: str, *args: object, maintenance: bool = False
    ) -> list[Any]:
        broker: Any = self.broker
        return [
            command,
            current_millis(),
            queue,
            broker.broker_id,
            broker.heartbeat_timeout,
            broker.dead_message_ttl,
            int(maintenance),
            broker._max_unpack_size(),  # cached after its first call
            *args,
        ]

    def _enqueue(self, pipe: redis.Redis | redis.client.Pipeline, message: Message[Any]) -> None:
        message_id = str(uuid4())
        # Like RedisBroker.enqueue: every enqueued copy gets its own Redis id.
        stored = message.copy(options={"redis_message_id": message_id})
        self.broker.emit_before("enqueue", stored, None)
        self._dispatch(
            keys=[self.namespace],
            args=self._args("enqueue", message.queue_name, message_id, stored.encode()),
            client=pipe,
        )

    def publish(self, messages: Sequence[Message[Any]]) -> None:
        """One MULTI/EXEC of the enqueue script per batch: one round trip, all or none."""
        if len(messages) == 1:  # a single script call is atomic already: no MULTI needed
            self._enqueue(self.client, messages[0])
            self.broker.emit_after("enqueue", messages[0], None)
            return
        pipe = self.client.pipeline(transaction=True)
        for message in messages:
            self._enqueue(pipe, message)
        pipe.execute()
        for message in messages:
            self.broker.emit_after("enqueue", message, None)

    def push_raw(self, queue: str, data: bytes) -> None:
        """Store ``data`` as a message's whole data, the way the enqueue script does."""
        self._dispatch(keys=[self.namespace], args=self._args("enqueue", queue, str(uuid4()), data))

    def depth(self, queue: str) -> int:
        """Ids in the queue's list and in its delay queue's list."""
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self._key(queue))
        pipe.llen(self._key(dq_name(queue)))
        return sum(int(n) for n in pipe.execute())

    def dead_letters(self, queue: str, *, limit: int) -> list[DeadLetter]:
        """Newest first, from the dead-letter sorted set and its hash."""
        xq = self._key(xq_name(queue))
        rows: list[tuple[bytes, float]] = self.client.zrevrange(xq, 0, limit - 1, withscores=True)  # type: ignore[assignment]
        if not rows:
            return []
        datas: list[bytes | None] = self.client.hmget(f"{xq}.msgs", [r[0] for r in rows])  # type: ignore[assignment]
        return [
            read_dead_letter(queue, data, at=score / 1000, broker_reason="rejected", ref=message_id)
            for (message_id, score), data in zip(rows, datas, strict=True)
            if data is not None
        ]

    def replay(self, queue: str, prepare: Callable[[str], object], *, limit: int) -> int:
        """Enqueue valid dead letters afresh and drop them from the XQ, in one transaction."""
        xq = self._key(xq_name(queue))
        replayed = 0
        pipe = self.client.pipeline(transaction=True)
        for letter in reversed(self.dead_letters(queue, limit=max(limit * 4, 1000))):
            if replayed >= limit:
                break
            fresh = letter.replay_message(prepare)
            if fresh is None:
                continue
            self._enqueue(pipe, fresh)
            message_id = cast(bytes, letter.ref)
            pipe.zrem(xq, message_id)
            pipe.hdel(f"{xq}.msgs", message_id)
            replayed += 1
        if replayed:
            pipe.execute()
        return replayed

    def annotate(self, message: Any, reason: str) -> None:
        """Write ``reason`` into the data of ``message``, held by this worker, before its nack."""
        message_id = message.options.get("redis_message_id")
        if message_id:
            annotate_held(self.broker, message.queue_name, message_id, message, reason)

    def _ack_sets(self, queues: Sequence[str]) -> list[str]:
        """The ack-set keys every known worker may have for ``queues`` and their delay queues.

        Every broker call refreshes the caller's entry in the heartbeat set, and
        maintenance removes a worker from it only once it holds no ack set, so
        the heartbeat set names every worker that holds messages.
        """
        workers: list[bytes] = self.client.zrange(f"{self.namespace}:__heartbeats__", 0, -1)  # type: ignore[assignment]
        names = [name for queue in queues for name in (queue, dq_name(queue))]
        return [
            _ack_set(self.namespace, worker.decode(), name) for worker in workers for name in names
        ]

    def ping(self) -> None:
        """PING the broker's Redis."""
        self.client.ping()

    def held(self, queues: Sequence[str]) -> int:
        """Members of every worker's ack sets of ``queues`` and their delay queues."""
        pipe = self.client.pipeline(transaction=False)
        for key in self._ack_sets(queues):
            pipe.scard(key)
        return sum(int(n) for n in pipe.execute())

    def purge(self, queues: Sequence[str]) -> None:
        """Delete the lists, hashes and dead-letter sets of ``queues``, and their ack sets."""
        keys: list[str] = []
        for queue in queues:
            for name in (queue, dq_name(queue), xq_name(queue)):
                keys += [self._key(name), f"{self._key(name)}.msgs"]
        keys += self._ack_sets(queues)
        self.client.delete(*keys)

    def maintain(self, queues: Sequence[str]) -> None:
        """Run the script's maintenance on each queue and its delay queue.

        Maintenance puts the messages held by workers whose heartbeat is older
        than the heartbeat timeout back on their queue, and expires old dead
        letters; ``qsize`` is a read-only command to carry it.
        """
        for queue in queues:
            for name in (queue, dq_name(queue)):
                self._dispatch(
                    keys=[self.namespace], args=self._args("qsize", name, maintenance=True)
                )
