"""What runs inside a ``dramatiq`` worker started by ``feedfan worker``.

``dramatiq feedfan.backends.dramatiq:setup_worker`` calls :func:`setup_worker`
in each worker process: it reads feedfan's settings (the ``FEEDFAN_*``
variables ``feedfan worker`` sets), builds the broker, declares the two
actors and feedfan's failure middleware, and makes that broker Dramatiq's
global one. ``--fork-function feedfan.backends.dramatiq:maintenance_loop``
runs :func:`maintenance_loop` beside them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import dramatiq
from dramatiq.broker import Broker, MessageProxy
from dramatiq.common import current_millis, q_name, xq_name
from dramatiq.message import Message
from dramatiq.middleware import Middleware, Retries, TimeLimitExceeded

from feedfan.config import Settings, load_settings
from feedfan.errors import PayloadError
from feedfan.priority import FanoutPriority
from feedfan.runner import get_runner

from ._dramatiq_brokers import (
    build_broker,
    check_encoder,
    maintenance_interval,
    queues_for,
)
from ._dramatiq_queues import (
    ACTOR_NAMES,
    ACTOR_PRIORITIES,
    DEAD_AT_OPTION,
    REASON_OPTION,
    BrokerQueues,
)
from ._dramatiq_redis import RedisQueues

__all__ = [
    "MAX_BACKOFF_MS",
    "MIN_BACKOFF_MS",
    "FeedfanFailures",
    "declare_actors",
    "maintenance_loop",
    "run_task",
    "setup_worker",
]

logger = logging.getLogger("feedfan.dramatiq")

MIN_BACKOFF_MS = 1_000
"""First retry after 1-2 s; each further one waits twice as long (Dramatiq: 15 s)."""

MAX_BACKOFF_MS = 60_000
"""No retry waits more than a minute (Dramatiq: 7 days)."""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def run_task(*args: Any, **kwargs: Any) -> None:
    """The function behind both actors: run one task body with this process's runner."""
    if kwargs or len(args) != 1 or not isinstance(args[0], str):
        raise PayloadError(
            "feedfan's actor takes one argument, the task's JSON text; got "
            f"args={_short(args)} kwargs={_short(kwargs)}."
        )
    get_runner().handle(args[0])


def _describe(exception: BaseException, settings: Settings) -> str:
    if isinstance(exception, TimeLimitExceeded):
        return (
            f"ran longer than chunk_time_limit={settings.chunk_time_limit} s "
            f"(from {settings.sources.get('chunk_time_limit', 'default')})"
        )
    return repr(exception)


class FeedfanFailures(Middleware):
    """Dead-letters feedfan's failed messages with their reason, and counts given-up chunks.

    It runs after Dramatiq's ``Retries`` (which marks a message failed when
    it raised a :class:`PayloadError`, declared in the actors' ``throws``, or
    ran out of retries). The reason goes into the dead letter's options
    (``feedfan_reason``). On RabbitMQ the annotated copy is published to
    ``<queue>.XQ`` in a transaction and the original acked; on Redis the
    reason is written into the held message's data, which Dramatiq's nack
    then moves to ``<queue>.XQ`` as it is, so no dead letter is ever seen
    without its reason. If writing the reason fails, Dramatiq's plain
    dead-lettering still happens.
    """

    def __init__(self, settings: Settings, queues: BrokerQueues) -> None:
        self.settings = settings
        self.queues = queues

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        """Record why a message of feedfan's failed for good, and keep it."""
        if (
            exception is None
            or not message.failed
            or message.actor_name not in ACTOR_NAMES.values()
        ):
            return
        queue = q_name(message.queue_name)
        if isinstance(exception, PayloadError):
            reason = f"malformed task: {exception}"
            logger.warning("feedfan rejected a message from queue %s: %s", queue, reason)
        else:
            attempts = message.options.get("retries", 1)
            reason = f"failed {attempts} time(s); last error: {_describe(exception, self.settings)}"
            try:
                get_runner().give_up(message.args[0], queue=queue, reason=reason)
            except Exception:  # the dead letter below must be kept even so
                logger.exception("feedfan could not record a given-up task of queue %s", queue)
        if isinstance(self.queues, RedisQueues):
            try:
                self.queues.annotate(message, reason)  # Dramatiq's nack then moves it as written
            except self.queues.errors:
                logger.exception("feedfan could not write the reason of a dead letter of %s", queue)
            return
        message.options[REASON_OPTION] = reason
        message.options[DEAD_AT_OPTION] = current_millis()
        try:
            dead: Message[Any] = Message(**{**message.asdict(), "queue_name": queue})
            self.queues.push_raw(xq_name(queue), dead.encode())
        except self.queues.errors:
            logger.exception("feedfan could not write the reason of a dead letter of %s", queue)
            return
        message.failed = False  # kept in the XQ with its reason: ack the original


def declare_actors(broker: Broker, settings: Settings) -> None:
    """Add feedfan's failure middleware and its two actors to ``broker``.

    For a worker module of your own that builds its own broker::

        broker = RedisBroker(url=...)
        declare_actors(broker, load_settings())
        dramatiq.set_broker(broker)
    """
    check_encoder()
    broker.add_middleware(FeedfanFailures(settings, queues_for(broker)), before=Retries)
    for priority in FanoutPriority:
        queue = settings.queue_high if priority is FanoutPriority.HIGH else settings.queue_low
        options: dict[str, Any] = {
            "max_retries": settings.max_retries,
            "min_backoff": MIN_BACKOFF_MS,
            "max_backoff": MAX_BACKOFF_MS,
            "time_limit": settings.chunk_time_limit * 1000,
            "throws": (PayloadError,),
        }
        declare = dramatiq.actor(
            broker=broker,
            actor_name=ACTOR_NAMES[priority],
            queue_name=queue,
            priority=ACTOR_PRIORITIES[priority],
            **options,
        )
        declare(run_task)


def setup_worker() -> None:
    """Set up this worker process: broker from settings, actors, global broker."""
    settings = load_settings()
    broker = build_broker(settings)
    declare_actors(broker, settings)
    dramatiq.set_broker(broker)
    get_runner()  # a wrong `app` fails here, at boot, not on the first chunk


def maintenance_loop() -> int:
    """Run beside the workers (``--fork-function``) until Dramatiq stops it.

    On Redis, every ``maintenance_interval`` seconds it gives the messages of
    workers whose heartbeat stopped back to feedfan's queues (Dramatiq
    otherwise does so by chance, on 1 in 1,000 broker calls). On RabbitMQ the
    broker does that itself and this process only waits. Either way, since
    Dramatiq's main process stops its fork processes when a worker process
    dies, their exit also wakes the main process so it exits at once and a
    supervisor can restart it.
    """
    settings = load_settings()
    queues = queues_for(build_broker(settings))
    interval = maintenance_interval(settings)
    names = [settings.queue_high, settings.queue_low]
    while True:
        try:
            queues.maintain(names)
        except queues.errors as e:
            logger.warning("feedfan maintenance of %s failed, will try again: %s", names, e)
        time.sleep(interval)
