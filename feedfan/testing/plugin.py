"""pytest plugin of the conformance suite: live Redis and RabbitMQ for tests.

Opt in from a ``conftest.py``, as with Celery's plugin::

    pytest_plugins = ("feedfan.testing.plugin",)

``feedfan_redis_url`` is an empty Redis database claimed for the session and
flushed at its end (it was empty when claimed, so only test data goes);
``feedfan_amqp_url`` is a RabbitMQ virtual host made for the session and
deleted at its end when ``rabbitmqctl`` is at hand, else the default vhost
with the suite's own queue names. An unreachable server skips the tests that
need it locally and fails them when ``CI`` is set.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit

import pytest
import redis

from feedfan.testing.rabbit import rabbitmqctl

__all__ = ["feedfan_amqp_url", "feedfan_redis_url", "in_ci", "unreachable"]

_CLAIM_KEY = "feedfan:test-session-claim"


def in_ci() -> bool:
    """Whether this run is CI (``CI`` set to a true value), where no server may be missing."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def unreachable(what: str, how_to_start: str) -> None:
    """Fail (in CI) or skip (locally) because a server the test needs is down."""
    message = f"{what} is not reachable; start it with: {how_to_start}"
    if in_ci():
        pytest.fail(f"{message} (CI is set, so a missing server fails the run)", pytrace=False)
    pytest.skip(f"{message} (skipped locally; CI=true makes this a failure)")


def _claim_empty_database(base: str) -> tuple[redis.Redis, int]:
    probe = redis.Redis.from_url(base, socket_connect_timeout=2)
    try:
        probe.ping()
        databases = int(probe.config_get("databases").get("databases") or 16)
    except redis.RedisError:
        unreachable(f"Redis at {base}", "redis-server --daemonize yes --port 6379 --save ''")
    finally:
        probe.close()
    for db in range(databases - 1, 0, -1):
        client = redis.Redis.from_url(base, db=db)
        if client.dbsize() == 0 and client.set(_CLAIM_KEY, str(os.getpid()), nx=True, ex=6 * 3600):
            return client, db
        client.close()
    pytest.fail(
        f"no empty Redis database at {base} to run tests in; free one (tests never flush data)."
    )
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def feedfan_redis_url() -> Iterator[str]:
    """A redis:// URL of an empty database, claimed for this test session."""
    base = os.environ.get("FEEDFAN_TEST_REDIS_URL", "redis://127.0.0.1:6379")
    client, db = _claim_empty_database(base)
    parts = urlsplit(base)
    url = f"{parts.scheme}://{parts.netloc}/{db}"
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def _rabbitmqctl(*args: str) -> bool:
    result = rabbitmqctl(*args)
    return result is not None and result.returncode == 0


@pytest.fixture(scope="session")
def feedfan_amqp_url() -> Iterator[str]:
    """An amqp:// URL of a virtual host of this session's own."""
    base = os.environ.get("FEEDFAN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    parts = urlsplit(base)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 5672), timeout=3
        ):
            pass
    except OSError:
        unreachable(
            f"RabbitMQ at {parts.hostname}:{parts.port or 5672}", "rabbitmq-server -detached"
        )
    vhost = f"feedfan-test-{uuid.uuid4().hex[:10]}"
    user = parts.username or "guest"
    made = _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl(
        "set_permissions", "-p", vhost, user, ".*", ".*", ".*"
    )
    if made:
        yield f"{parts.scheme}://{parts.netloc}/{quote(vhost, safe='')}"
        _rabbitmqctl("delete_vhost", vhost)
    else:
        yield base
