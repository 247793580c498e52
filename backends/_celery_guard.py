"""The guard that keeps malformed broker messages instead of losing them.

Celery meets garbage on a queue in two places, and handles it badly for
feedfan's purposes:

* In its consumer (``celery.worker.consumer.Consumer``): a body it cannot
  decode is logged ("Can't decode message body") and acknowledged; a pickled
  body refused by ``accept_content``, an unknown task name, or a message with
  no task at all is logged and rejected. Either way the message is gone. A
  task message whose body is not ``[args, kwargs, embed]`` is worse: it
  raises in Celery's ``Request`` and stops the worker.
  :class:`FeedfanConsumer` (installed with the ``worker_consumer`` setting)
  keeps those found on feedfan's queues in feedfan's rejected list, with the
  reason, then acknowledges them.
* Below it, in kombu's Redis transport, a list item that is not a kombu
  message (not JSON at all) raises out of the event loop and stops the worker
  ("Unrecoverable error: JSONDecodeError"), the item already popped and lost.
  :class:`GuardedRedisTransport` (the ``broker_transport`` setting) checks each
  item it takes; one kombu could not read is kept and skipped.

The same transport also closes kombu's pop window. kombu takes a message with
``BRPOP`` and records it as unacknowledged (the record its visibility timeout
restores from) in a second round trip, after reading the reply; a worker
killed in between, or whose connection drops, loses the message. Celery's
main process pops ahead while its pool runs chunks, and the reply can wait
unread in the socket, so a whole-worker ``SIGKILL`` lands there now and then.
:class:`GuardedRedisChannel` takes a waiting message and writes that record
in one script call instead; only a worker that found the queues empty waits
with ``BRPOP``, kombu's way, and the next message after the wait is taken
from the script again.

Nothing is ever unpickled: kombu refuses pickle content before decoding it
(``accept_content=['json']``), and the guard decodes nothing but JSON.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from collections import deque
from collections.abc import Callable
from queue import Empty
from time import monotonic, time
from typing import Any

from celery.worker.consumer import Consumer
from celery.worker.consumer.tasks import Tasks
from kombu.asynchronous.semaphore import LaxBoundedSemaphore
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils import json as kombu_json

from feedfan.runner import get_runner

from ._celery_app import TASK_NAME

__all__ = [
    "FeedfanConsumer",
    "GuardedRedisTransport",
    "envelope_problem",
    "high_first",
    "keep_garbage",
    "read_envelope",
]

logger = logging.getLogger("feedfan.celery")

# kombu's own decoder (with its object hooks), so "readable" means readable by kombu.
_kombu_loads: Any = kombu_json.loads


def keep_garbage(queue: str, body: bytes | str, reason: str, *, feedfan_only: bool) -> bool:
    """Keep ``body`` in feedfan's rejected list; ``False`` if it is not feedfan's or cannot be.

    With ``feedfan_only`` a message from a queue that is not one of feedfan's
    is left to Celery.
    """
    try:
        runner = get_runner()
    except Exception:
        logger.exception("feedfan cannot load its manager to keep a message from %s", queue)
        return False
    if feedfan_only and queue not in (runner.settings.queue_high, runner.settings.queue_low):
        return False
    try:
        runner.reject(body, queue=queue, reason=reason)
    except Exception:
        logger.exception("feedfan could not keep a malformed message from %s (%s)", queue, reason)
        return False
    return True


# In Celery's consumer ------------------------------------------------------


def _queue_of(message: Any) -> str:
    info = message.delivery_info or {}
    return str(info.get("routing_key") or "?")


def _shape_problem(message: Any) -> str | None:
    """Why a JSON task message is not Celery's ``[args, kwargs, embed]``, if it is not."""
    try:
        payload = message.decode()
    except Exception:  # refused or undecodable: Celery's own path reports it
        return None
    if (
        isinstance(payload, list)
        and len(payload) == 3
        and isinstance(payload[0], list)
        and isinstance(payload[1], dict)
        and (payload[2] is None or isinstance(payload[2], dict))
    ):
        return None
    return (
        f"the {TASK_NAME} message body is not Celery's [args, kwargs, embed]; "
        f"it is a {type(payload).__name__}."
    )


def _per_consumer_prefetch(consumer: Any) -> bool:
    """``Tasks.qos_global`` for feedfan's consumer: never the channel-wide limit."""
    return False


def _routing_key(waiter: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> str | None:
    args = waiter[1]
    info = getattr(args[0], "delivery_info", None) if args else None
    return info.get("routing_key") if isinstance(info, dict) else None


class _Waiting(tuple):  # type: ignore[type-arg]
    """A request from a queue other than HIGH, with how many HIGH ones went ahead of it."""

    passed = 0


class _HighFirst:
    """The waiting line of a worker's pool: requests from the HIGH queue go ahead of the rest.

    Celery's prefork worker keeps the requests it received while every
    process was busy in the pool semaphore's line, first come first served,
    so a HIGH chunk that arrives after a reserved LOW one runs after it.
    Installed as the semaphore's ``_add_waiter``; HIGH requests keep their
    order among themselves, as do the others. A waiting request goes behind
    at most twice the process count of HIGH ones: under a steady flow of
    HIGH chunks a LOW chunk the worker holds still runs, instead of sitting
    unacknowledged until the broker's consumer timeout.
    """

    def __init__(self, semaphore: Any, high_queue: str) -> None:
        self.semaphore = semaphore
        self.waiting: deque[Any] = semaphore._waiting
        self.high_queue = high_queue

    @property
    def overtakes(self) -> int:
        """How many HIGH requests may go ahead of one other request."""
        return max(1, 2 * int(self.semaphore.initial_value))

    def __call__(self, waiter: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> None:
        if _routing_key(waiter) != self.high_queue:
            self.waiting.append(_Waiting(waiter))
            return
        limit = self.overtakes
        index = len(self.waiting)
        while index > 0:
            before = self.waiting[index - 1]
            if not isinstance(before, _Waiting) or before.passed >= limit:
                break  # behind the HIGH requests, and those passed over enough
            index -= 1
        for index_passed in range(index, len(self.waiting)):
            self.waiting[index_passed].passed += 1
        self.waiting.insert(index, waiter)


def high_first(semaphore: Any, high_queue: str) -> bool:
    """Make ``semaphore`` (Celery's pool semaphore) run HIGH requests first; ``False`` if it cannot."""
    waiting = getattr(semaphore, "_waiting", None)
    if not isinstance(semaphore, LaxBoundedSemaphore) or not isinstance(waiting, deque):
        return False
    if not isinstance(semaphore._add_waiter, _HighFirst):
        semaphore._add_waiter = _HighFirst(semaphore, high_queue)
    return True


def _reserve_more_high(c: Any, high_queue: str) -> None:
    """On RabbitMQ, let a worker of both queues hold two HIGH chunks per process, not one.

    With a limit of one per process the broker sends the next HIGH chunk only
    once one is acknowledged, and by then the freed process has taken a
    reserved LOW chunk. RabbitMQ applies a per-consumer limit to consumers
    made after it is set, so it is raised for the HIGH queue's subscription
    alone and put back for the others.
    """
    consumer = c.task_consumer
    if consumer is None or c.connection.transport.driver_type != "amqp":
        return
    if len(getattr(consumer, "queues", None) or ()) < 2:
        return  # a worker of the HIGH queue alone has no LOW chunk to run first
    original = getattr(consumer, "_basic_consume", None)
    if original is None or not isinstance(getattr(consumer, "_active_tags", None), dict):
        logger.warning(
            "feedfan: this kombu's Consumer has no _basic_consume; the HIGH queue keeps "
            "Celery's limit of one chunk per process"
        )
        return
    if getattr(original, "feedfan_high_reserve", False):
        return

    def basic_consume(queue: Any, *args: Any, **kwargs: Any) -> Any:
        if queue.name != high_queue or queue.name in consumer._active_tags:
            return original(queue, *args, **kwargs)
        limit = c.qos.value if c.qos is not None else c.initial_prefetch_count
        channel = consumer.channel
        channel.basic_qos(0, 2 * limit, False)
        try:
            return original(queue, *args, **kwargs)
        finally:
            channel.basic_qos(0, limit, False)

    basic_consume.feedfan_high_reserve = True  # type: ignore[attr-defined]
    consumer._basic_consume = basic_consume


class FeedfanConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, keeping malformed messages on feedfan's queues instead of dropping them.

    Set it as ``worker_consumer`` (feedfan's own app and
    :func:`~feedfan.backends.celery.register_tasks` do). Messages on other
    queues get Celery's usual treatment.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A worker that cannot load feedfan's settings and app (the module is not on the
        # path, a setting is wrong) would take chunks only to fail each one: it does not
        # start. The error names the setting and the fix.
        get_runner()
        super().__init__(*args, **kwargs)
        # Celery asks RabbitMQ 3.3 to 3.13 for a prefetch limit shared by the
        # channel's consumers ("global" QoS), so a worker of both queues gets
        # one credit for both: each LOW chunk it finishes may fetch the next
        # LOW chunk while a HIGH one waits on the broker. A limit for each
        # consumer (what RabbitMQ 4 does anyway) lets a HIGH chunk through
        # to the worker whatever the LOW queue holds.
        tasks = self.blueprint.steps.get(Tasks.name)
        if tasks is not None:
            tasks.qos_global = _per_consumer_prefetch
            tasks.start = functools.partial(self._start_tasks, tasks.start)

    def _start_tasks(self, start: Callable[[Any], None], c: Any) -> None:
        """Celery's ``Tasks.start``, then HIGH chunks first wherever they wait in this worker."""
        start(c)
        high_queue = getattr(self.app.tasks.get(TASK_NAME), "high_queue", None)
        if not isinstance(high_queue, str):
            return
        controller = self.controller
        if controller is not None:
            high_first(getattr(controller, "semaphore", None), high_queue)
        _reserve_more_high(c, high_queue)

    def _keep(self, message: Any, reason: str) -> bool:
        kept = keep_garbage(_queue_of(message), message.body, reason, feedfan_only=True)
        if kept:
            message.ack_log_error(logger, self.connection_errors)
        return kept

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """Keep a body Celery cannot decode (wrong content type or encoding)."""
        reason = f"Celery cannot decode it (content type {message.content_type!r}): {exc}"
        if not self._keep(message, reason):
            super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """Keep a message that names no task."""
        if not self._keep(message, "it is not a Celery task message: it names no task."):
            super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Keep a message for a task this worker does not have."""
        name = (message.headers or {}).get("task")
        reason = f"task {name!r} is not registered on this worker; feedfan's is {TASK_NAME!r}."
        if not self._keep(message, reason):
            super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Keep a message Celery refused, such as pickled content."""
        if not self._keep(message, f"Celery refused it: {exc}"):
            super().on_invalid_task(body, message, exc)

    def update_strategies(self) -> None:
        """Check the shape of feedfan's task messages before Celery builds a request."""
        super().update_strategies()
        strategy = self.strategies.get(TASK_NAME)
        if strategy is not None:
            self.strategies[TASK_NAME] = self._checked(strategy)

    def _checked(self, strategy: Callable[..., Any]) -> Callable[..., Any]:
        # A protocol-2 body of the wrong shape raises in Celery's Request,
        # which stops the worker; on Redis the message is then restored and
        # stops the next worker too.
        def checked(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
            if body is None:
                problem = _shape_problem(message)
                if problem is not None and self._keep(message, problem):
                    return None
            return strategy(message, body, *args, **kwargs)

        return checked


# In kombu's Redis transport --------------------------------------------------


def envelope_problem(item: bytes | str) -> str | None:
    """Why kombu's Redis transport could not read ``item`` as a message, or ``None``."""
    return read_envelope(item)[1]


def read_envelope(item: bytes | str) -> tuple[Any, str | None]:
    """``item`` decoded as kombu decodes it, and :func:`envelope_problem`'s verdict on it."""
    if isinstance(item, bytes):
        try:
            item = item.decode("utf-8")
        except UnicodeDecodeError:
            return None, "not a kombu message: not UTF-8 text (is it pickled?)."
    try:
        payload = _kombu_loads(item)
    except ValueError as e:
        return None, f"not a kombu message: not JSON ({e})."
    except RecursionError:
        # Raised out of BRPOP's reply, it would stop the worker like any other error.
        return None, "not a kombu message: JSON nested too deeply to read."
    return payload, _payload_problem(payload)


def _payload_problem(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return f"not a kombu message: a JSON {type(payload).__name__}, not an object."
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "not a kombu message: it has no 'properties' object."
    tag = properties.get("delivery_tag")
    if isinstance(tag, bool) or not isinstance(tag, (str, int)):
        return "not a kombu message: it has no delivery tag."
    info = properties.get("delivery_info")
    if not (isinstance(info, dict) and "exchange" in info and "routing_key" in info):
        return "not a kombu message: it has no delivery_info with exchange and routing_key."
    for field in ("headers",):
        if payload.get(field) is not None and not isinstance(payload.get(field), dict):
            return f"not a kombu message: {field!r} is not an object."
    for field in ("content-type", "content-encoding"):
        if payload.get(field) is not None and not isinstance(payload.get(field), str):
            return f"not a kombu message: {field!r} is not a string."
    body = payload.get("body")
    if body:
        if not isinstance(body, str):
            return "not a kombu message: its body is not a string."
        encoding = str(properties.get("body_encoding") or "utf-8").lower()
        if encoding == "base64":
            try:
                base64.b64decode(body)
            except (binascii.Error, ValueError):
                return "not a kombu message: its body is not valid base64."
        elif encoding != "utf-8":
            return f"not a kombu message: unknown body encoding {encoding!r}."
    return None


def _keep_unreadable(queue: str, item: bytes, problem: str) -> None:
    if not keep_garbage(queue, item, problem, feedfan_only=False):
        logger.critical(
            "feedfan dropped a message from %s that it could not keep (%s): %r",
            queue,
            problem,
            item[:200],
        )


class _BRPOPGuard:
    """Mixed into kombu's Redis client: BRPOP replies kombu cannot read are kept, not returned."""

    def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any:
        reply = super().parse_response(connection, command_name, **options)  # type: ignore[misc]
        if command_name == "BRPOP" and reply:
            key, item = reply
            problem = envelope_problem(item)
            if problem is not None:
                name = key.decode() if isinstance(key, bytes) else str(key)
                _keep_unreadable(name.rsplit(kombu_redis.Channel.sep, 1)[0], item, problem)
                # kombu treats an empty reply as a BRPOP timeout and polls again.
                return None
        return reply


@functools.cache
def _guarded(client_class: type) -> type:
    return type(f"Guarded{client_class.__name__}", (_BRPOPGuard, client_class), {})


# KEYS: the queue lists in kombu's order, then kombu's unacked hash and index.
# ARGV[1]: the time to index the message at (the client's, as kombu's own).
# Replies {n, item, tag} when it took and recorded the item of the nth list;
# {n, item} when the item has no delivery tag and exchange kombu could record
# (the caller checks it); false when every list is empty.
# kombu writes "properties" last: decoding only that object, when it is found
# there, spares decoding the body (a third of the script's time at 16 kB).
_TAKE_SCRIPT = """
local function properties_of(item)
  local at = string.find(item, '"properties": {', 1, true)
  if at then
    local read, properties = pcall(cjson.decode, string.sub(item, at + 14, -2))
    if read and type(properties) == 'table' then return properties end
  end
  local read, message = pcall(cjson.decode, item)
  if read and type(message) == 'table' and type(message.properties) == 'table' then
    return message.properties
  end
end
local lists = #KEYS - 2
for n = 1, lists do
  local item = redis.call('RPOP', KEYS[n])
  if item then
    local properties = properties_of(item)
    if properties then
      local tag = properties.delivery_tag
      local info = properties.delivery_info
      if type(tag) == 'string' and type(info) == 'table'
          and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
        redis.call('ZADD', KEYS[lists + 2], ARGV[1], tag)
        redis.call('HSET', KEYS[lists + 1], tag, '[' .. item .. ',' ..
          cjson.encode(info.exchange) .. ',' .. cjson.encode(info.routing_key) .. ']')
        return {n, item, tag}
      end
    end
    return {n, item}
  end
end
return false
"""


# kombu's classes, to call their methods without mypy's untyped-call checks.
_RedisQoS: Any = kombu_redis.QoS
_VirtualQoS: Any = kombu_virtual.QoS
_RedisChannel: Any = kombu_redis.Channel


class _TakenQoS(kombu_redis.QoS):
    """kombu's Redis QoS, which does not record again a message the take already recorded."""

    channel: GuardedRedisChannel

    def append(self, message: Any, delivery_tag: Any) -> None:
        if delivery_tag is not None and delivery_tag == self.channel.taken_tag:
            self.channel.taken_tag = None
            _VirtualQoS.append(self, message, delivery_tag)
        else:
            _RedisQoS.append(self, message, delivery_tag)


class GuardedRedisChannel(kombu_redis.Channel):
    """kombu's Redis channel: a take records the message it pops, and unreadable items are kept."""

    QoS = _TakenQoS

    taken_tag: str | None = None
    """The delivery tag of the message being delivered, if the take recorded it."""

    _taking: list[str] | None = None  # the queues of a take in flight, key by key
    _waiting = False  # the last take found nothing: wait for the next message with BRPOP

    def _brpop_start(self, timeout: Any = None) -> None:
        channel: Any = self  # kombu's attributes, untyped
        if self._waiting or not channel.ack_emulation:
            self._taking = None
            _RedisChannel._brpop_start(self, timeout)
            return
        queues = channel._queue_cycle.consume(len(channel.active_queues))
        if not queues:
            return
        steps = [(queue, pri) for pri in channel.priority_steps for queue in queues]
        prefix = channel.global_keyprefix or ""
        keys = [prefix + channel._q_for_pri(queue, pri) for queue, pri in steps]
        keys += [prefix + channel.unacked_key, prefix + channel.unacked_index_key]
        self._taking = [queue for queue, _ in steps]
        channel._in_poll = channel.client.connection
        channel._brpop_sent_at = monotonic()
        channel.client.connection.send_command("EVAL", _TAKE_SCRIPT, len(keys), *keys, repr(time()))

    def _brpop_read(self, **options: Any) -> Any:
        channel: Any = self  # kombu's attributes, untyped
        taking, self._taking = self._taking, None
        if taking is None:
            delivered = _RedisChannel._brpop_read(self, **options)  # Empty after a timeout
            self._waiting = False
            return delivered
        try:
            try:
                reply = channel.client.parse_response(channel.client.connection, "EVAL", **options)
            except channel.connection_errors:
                channel.client.connection.disconnect()
                raise
        finally:
            channel._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush is not None:
                flush()
        if not reply:
            self._waiting = True
            raise Empty()
        number, item, *recorded = reply
        queue = taking[int(number) - 1]
        tag = recorded[0].decode() if recorded else None
        channel._queue_cycle.rotate(queue)
        payload, problem = read_envelope(item)
        if problem is not None:
            _keep_unreadable(queue, item, problem)
            if tag is not None:
                channel.qos._remove_from_indices(tag).execute()
            raise Empty()
        self.taken_tag = tag
        try:
            channel.connection._deliver(payload, queue)
        finally:
            # A consumer that does not acknowledge leaves the record unused.
            unused, self.taken_tag = self.taken_tag, None
            if unused is not None:
                channel.qos._remove_from_indices(unused).execute()
        return True

    def _poll_error(self, type: Any, **options: Any) -> Any:
        if type == "BRPOP" and self._taking is not None:
            # A take's reply: its message is recorded, and comes back after the timeout.
            self._taking = None
            channel: Any = self
            return channel.client.parse_response(channel.client.connection, "EVAL")
        return _RedisChannel._poll_error(self, type, **options)

    def _get_client(self) -> Any:
        parent: Any = super()
        client = parent._get_client()
        if isinstance(client, functools.partial):  # the global_keyprefix client
            return functools.partial(_guarded(client.func), *client.args, **client.keywords)
        return _guarded(client)


class GuardedRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, except that a queue item it cannot read never stops the worker."""

    Channel = GuardedRedisChannel
