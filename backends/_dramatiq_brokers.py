"""Building the Dramatiq broker from feedfan's settings, and the timings that follow.

``broker_url`` chooses the broker: ``redis://`` (``rediss://``, ``unix://``)
builds feedfan's :class:`~feedfan.backends._dramatiq_redis.FeedfanRedisBroker`,
``amqp://`` (``amqps://``) Dramatiq's ``RabbitmqBroker``. Neither connects
until it is used.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import redis
from dramatiq.broker import Broker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.encoder import JSONEncoder
from dramatiq.message import get_encoder

from feedfan.config import Settings
from feedfan.dispatch import Finding
from feedfan.errors import ConfigurationError, MissingDependencyError, redact_url

from ._dramatiq_queues import BrokerQueues
from ._dramatiq_redis import FeedfanRedisBroker, RedisQueues

__all__ = [
    "amqp_heartbeat",
    "build_broker",
    "check_encoder",
    "dramatiq_findings",
    "maintenance_interval",
    "queues_for",
    "redelivery_bound",
]

_REDIS_SCHEMES = ("redis", "rediss", "unix")
_AMQP_SCHEMES = ("amqp", "amqps")
_POLL_SECONDS = 1.0
"""An idle Dramatiq consumer fetches at least this often, refreshing its heartbeat."""


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def amqp_heartbeat(settings: Settings) -> int:
    """The AMQP heartbeat feedfan asks for: half of ``redelivery_timeout``, 2 to 60 s.

    RabbitMQ gives a dead consumer's unacked messages back when its
    connection closes: at once when the process dies (its socket closes),
    after about two missed heartbeats when its host vanishes.
    """
    return max(2, min(60, settings.redelivery_timeout // 2))


def maintenance_interval(settings: Settings) -> float:
    """Seconds between the Redis maintenance rounds of a ``feedfan worker``: 1 to 15."""
    return float(max(1, min(15, settings.redelivery_timeout // 10)))


def _url_heartbeat(url: str) -> int | None:
    values = parse_qs(urlsplit(url).query).get("heartbeat")
    return int(values[-1]) if values else None


def redelivery_bound(settings: Settings, broker: Any) -> float | None:
    """Seconds within which a SIGKILLed worker's messages are on their queue again.

    Redis: the worker's last heartbeat is at most ``_POLL_SECONDS`` old when
    it dies; it counts as dead ``heartbeat_timeout`` later, and the next
    maintenance round (``maintenance_interval``) requeues its messages.
    RabbitMQ: two heartbeats (the process's own death closes its socket at
    once; this bounds a vanished host too). ``None`` when heartbeats are off.
    """
    if isinstance(broker, RedisBroker):
        timeout = float(broker.heartbeat_timeout) / 1000
        return timeout + _POLL_SECONDS + maintenance_interval(settings) + _POLL_SECONDS
    parameters = broker.parameters
    first = parameters[0] if isinstance(parameters, (list, tuple)) else parameters
    heartbeat = first.heartbeat
    if not isinstance(heartbeat, int) or heartbeat <= 0:
        return None
    return 2.0 * heartbeat + _POLL_SECONDS


def dramatiq_findings(settings: Settings, broker: Any) -> list[Finding]:
    """What ``feedfan check`` should say about the Dramatiq broker's setup."""
    bound = redelivery_bound(settings, broker)
    if bound is None:
        return [
            Finding(
                "warning",
                "dramatiq.heartbeat-off",
                "AMQP heartbeats are off: the chunks of a worker whose host vanishes wait "
                "until TCP notices, which may take hours.",
                "remove heartbeat=0 from broker_url; feedfan then asks for "
                f"{amqp_heartbeat(settings)} s (half of redelivery_timeout).",
            )
        ]
    findings = [
        Finding(
            "ok",
            "dramatiq.redelivery",
            f"a killed worker's chunks are back on their queue within about {bound:g} s.",
        )
    ]
    shared = settings.effective_broker_url == settings.effective_redis_url
    if isinstance(broker, RedisBroker) and shared:
        findings.append(
            Finding(
                "warning",
                "dramatiq.shared-redis",
                "Dramatiq's queues share the feed Redis database; when it requeues a dead "
                "worker's messages its Lua script runs KEYS over the whole database, which "
                "blocks Redis while the feeds are large.",
                "give the broker a database of its own: broker_url=redis://host:6379/<n>.",
            )
        )
    return findings


def check_encoder() -> None:
    """Refuse to run with an encoder other than Dramatiq's JSON one (it may unpickle)."""
    encoder = get_encoder()
    if not isinstance(encoder, JSONEncoder):
        raise ConfigurationError(
            f"Dramatiq's global encoder is {type(encoder).__name__}; feedfan only runs with "
            "dramatiq.encoder.JSONEncoder (the default), so that nothing read from the broker "
            "is ever unpickled. Remove the dramatiq.set_encoder(...) call."
        )


def _redis_broker(settings: Settings, url: str) -> Broker:
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30
        )
    except ValueError as e:
        raise ConfigurationError(
            f"broker_url {redact_url(url)!r} (from {settings.sources.get('broker_url', 'default')})"
            f" is not a Redis URL ({e}); expected redis://[:password@]host:port/db."
        ) from e
    timeout_ms = settings.redelivery_timeout * 1000
    return FeedfanRedisBroker(
        client=client, heartbeat_timeout=timeout_ms, urgent_queues=[settings.queue_high]
    )


def _rabbitmq_broker(settings: Settings, url: str) -> Broker:
    try:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker
    except ImportError as e:
        raise MissingDependencyError(
            f"broker_url {redact_url(url)!r} is a RabbitMQ URL, and Dramatiq needs the "
            f"{e.name or 'pika'!r} package for it: pip install 'feedfan[dramatiq]'"
        ) from e
    try:
        broker: Any = RabbitmqBroker(url=url)
    except ValueError as e:
        raise ConfigurationError(
            f"broker_url {redact_url(url)!r} (from {settings.sources.get('broker_url', 'default')})"
            f" is not an AMQP URL ({e}); expected amqp://user:password@host:port/vhost."
        ) from e
    if _url_heartbeat(url) is None:
        broker.parameters.heartbeat = amqp_heartbeat(settings)
    return cast(Broker, broker)


def build_broker(settings: Settings) -> Broker:
    """The broker ``settings.effective_broker_url`` names; nothing connects yet."""
    url = settings.effective_broker_url
    scheme = _scheme(url)
    if scheme in _REDIS_SCHEMES:
        return _redis_broker(settings, url)
    if scheme in _AMQP_SCHEMES:
        return _rabbitmq_broker(settings, url)
    source = settings.sources.get("broker_url", "default")
    raise ConfigurationError(
        f"broker_url {redact_url(url)!r} (from {source}) has scheme {scheme!r}; Dramatiq "
        "runs on redis:// or amqp:// brokers."
    )


def _is_rabbitmq(broker: object) -> bool:
    try:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker
    except ImportError:  # without pika no broker can be one
        return False
    return isinstance(broker, RabbitmqBroker)


def queues_for(broker: Any) -> BrokerQueues:
    """Feedfan's queue operations for ``broker``, a RedisBroker or a RabbitmqBroker."""
    if isinstance(broker, RedisBroker):
        return RedisQueues(broker)
    if _is_rabbitmq(broker):
        from ._dramatiq_rabbitmq import RabbitQueues

        return RabbitQueues(broker)
    raise ConfigurationError(
        f"broker={broker!r} is a {type(broker).__name__}; feedfan's Dramatiq adapter works "
        "with dramatiq.brokers.redis.RedisBroker or dramatiq.brokers.rabbitmq.RabbitmqBroker."
    )
