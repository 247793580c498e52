"""The Redis and RabbitMQ servers a run uses, claimed for it and given back after.

Without ``--redis-url`` the run claims an empty Redis database (it refuses to
touch one that holds data) and flushes it at the end, since it was empty when
claimed. With ``--redis-url`` it writes only under its own key prefix and queue
names and deletes those at the end; the queue libraries' own bookkeeping keys
(``rq:workers``, ``_kombu.binding.*``) may remain there. On RabbitMQ it makes
a virtual host of its own when ``rabbitmqctl`` works, else it uses queue names
of its own on the vhost given.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from feedfan.errors import ConfigurationError, StorageError, redact_url

__all__ = ["DEFAULT_AMQP_URL", "DEFAULT_REDIS_BASE", "Servers", "open_servers"]

DEFAULT_REDIS_BASE = "redis://127.0.0.1:6379"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
_CLAIM_KEY = "feedfan:test-session-claim"  # the conformance plugin's key: one claim per DB


@dataclass
class Servers:
    """URLs of the servers of one run, and what to give back when it ends."""

    redis_url: str
    """The Redis that holds feeds (and is the broker of Redis-backed queues)."""

    redis_broker_url: str
    """The Redis broker URL of the queues (``--broker-url redis://…``, else ``redis_url``)."""

    amqp_url: str | None
    """A reachable RabbitMQ, or ``None``."""

    claimed_db: int | None = None
    """The Redis database claimed (and flushed at the end), if the run claimed one."""

    vhost: str | None = None
    """The RabbitMQ virtual host made for the run, deleted at the end."""

    notes: list[str] = field(default_factory=list)
    """What was claimed or is unreachable, for the report."""

    def url_for(self, broker: str) -> str | None:
        """The broker URL of ``broker`` (``"redis"``, ``"amqp"``, ``"none"``)."""
        if broker == "redis":
            return self.redis_broker_url
        if broker == "amqp":
            return self.amqp_url
        return None

    def reachable(self, broker: str) -> bool:
        """Whether a server for ``broker`` is there (``"none"`` always is)."""
        return broker == "none" or self.url_for(broker) is not None

    def describe(self) -> dict[str, object]:
        """The servers, passwords masked, for the JSON report."""
        return {
            "redis_url": redact_url(self.redis_url),
            "redis_broker_url": redact_url(self.redis_broker_url),
            "amqp_url": redact_url(self.amqp_url) if self.amqp_url else None,
            "claimed_redis_db": self.claimed_db,
            "amqp_vhost": self.vhost,
            "notes": list(self.notes),
        }

    def close(self) -> None:
        """Flush the claimed database and delete the vhost made for this run."""
        if self.claimed_db is not None:
            client = redis.Redis.from_url(self.redis_url)
            try:
                client.flushdb()
            finally:
                client.close()
            self.claimed_db = None
        if self.vhost is not None:
            _rabbitmqctl("delete_vhost", self.vhost)
            self.vhost = None


def _ping(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as e:
        client.close()
        raise StorageError(
            f"Redis at {redact_url(url)} is not reachable ({e}); start it "
            "(redis-server --daemonize yes) or pass --redis-url."
        ) from e
    return client


def _claim(base: str) -> tuple[str, int]:
    probe = _ping(base)
    try:
        databases = int(probe.config_get("databases").get("databases") or 16)
    except redis.RedisError:
        databases = 16
    finally:
        probe.close()
    parts = urlsplit(base)
    for db in range(1, databases):
        url = urlunsplit((parts.scheme, parts.netloc, f"/{db}", "", ""))
        client = redis.Redis.from_url(url)
        try:
            if client.dbsize() == 0 and client.set(
                _CLAIM_KEY, f"benchmarks:{os.getpid()}", nx=True, ex=12 * 3600
            ):
                return url, db
        finally:
            client.close()
    raise ConfigurationError(
        f"no empty Redis database at {redact_url(base)} to benchmark in (benchmarks never "
        "flush data they did not write); free one, or pass --redis-url with a database "
        "the run may write its own keys to."
    )


def _rabbitmqctl(*args: str) -> bool:
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        return False
    try:
        result = subprocess.run(
            [tool, "-q", *args], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _amqp_reachable(url: str) -> bool:
    parts = urlsplit(url)
    with (
        contextlib.suppress(OSError),
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=3),
    ):
        return True
    return False


def open_servers(
    *, redis_url: str | None, broker_urls: list[str], run_id: str, want_amqp: bool = True
) -> Servers:
    """Claim what the run needs; ``broker_urls`` are ``--broker-url`` values, by scheme."""
    redis_brokers = [u for u in broker_urls if u.split("://", 1)[0] in ("redis", "rediss", "unix")]
    amqp_brokers = [u for u in broker_urls if u.split("://", 1)[0] in ("amqp", "amqps")]
    unknown = set(broker_urls) - set(redis_brokers) - set(amqp_brokers)
    if unknown:
        raise ConfigurationError(
            f"--broker-url {redact_url(sorted(unknown)[0])!r} is neither redis:// nor amqp://."
        )
    notes: list[str] = []
    claimed = None
    if redis_url is None:
        redis_url, claimed = _claim(DEFAULT_REDIS_BASE)
        notes.append(f"claimed the empty Redis database {claimed}; flushed at the end")
    else:
        _ping(redis_url).close()
        notes.append("writes only under its own key prefix in the given Redis database")
    redis_broker = redis_brokers[-1] if redis_brokers else redis_url
    if redis_broker != redis_url:
        _ping(redis_broker).close()
    amqp_url = None
    vhost = None
    if want_amqp:
        candidate = amqp_brokers[-1] if amqp_brokers else DEFAULT_AMQP_URL
        if _amqp_reachable(candidate):
            amqp_url = candidate
            if not amqp_brokers:
                vhost = f"feedfan-bench-{run_id}"
                parts = urlsplit(candidate)
                if _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl(
                    "set_permissions", "-p", vhost, parts.username or "guest", ".*", ".*", ".*"
                ):
                    path = "/" + quote(vhost, safe="")
                    amqp_url = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
                    notes.append(f"made the RabbitMQ vhost {vhost}; deleted at the end")
                else:
                    _rabbitmqctl("delete_vhost", vhost)
                    vhost = None
                    notes.append("rabbitmqctl unusable: RabbitMQ queues of its own on the vhost")
        else:
            notes.append(f"RabbitMQ at {redact_url(candidate)} is not reachable; amqp skipped")
    return Servers(
        redis_url=redis_url,
        redis_broker_url=redis_broker,
        amqp_url=amqp_url,
        claimed_db=claimed,
        vhost=vhost,
        notes=notes,
    )
