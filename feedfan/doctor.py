"""`feedfan check`: what in the configuration or on the brokers silently breaks fanout.

The checks look at the app workers would use (the ``app`` setting: your
manager, and through it your Celery app if it has one), the feed Redis, the
broker, the queues and, through the dispatcher's :meth:`check`, the queue
library's own configuration and live workers. Each finding says what was
found and how to fix it; the command exits non-zero when any is an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis

from feedfan.config import Settings
from feedfan.dispatch import Finding, TaskDispatcher, create_dispatcher
from feedfan.errors import FeedfanError, StorageError, redact_url
from feedfan.priority import FanoutPriority
from feedfan.runner import TaskRunner, load_app
from feedfan.storage.redis import RedisStorage

__all__ = ["run_checks"]

# Keys the queue libraries keep in a shared Redis; not "other data".
_QUEUE_LIBRARY_KEYS = ("rq:", "_kombu", "unacked", "celery", "dramatiq", "_celery")
_QUEUE_LIBRARY_SUFFIXES = (".celery.pidbox", ".reply.celery.pidbox")
_DEFAULT_PREFIX = "feedfan:"
_SCAN_BUDGET = 5000
"""Keys looked at for other data: enough to find it, bounded on a database of millions."""


def _is_other_data(name: str, settings: Settings) -> bool:
    if name.startswith(settings.key_prefix) or name.startswith(_QUEUE_LIBRARY_KEYS):
        return False
    if name.endswith(_QUEUE_LIBRARY_SUFFIXES):
        return False
    return not any(queue in name for queue in (settings.queue_high, settings.queue_low))


def _shared_finding(storage: RedisStorage, settings: Settings, url: str) -> Finding:
    others: list[str] = []
    for looked, key in enumerate(storage.client.scan_iter(count=500)):
        name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
        if _is_other_data(name, settings):
            others.append(name)
        if len(others) >= 3 or looked >= _SCAN_BUDGET:
            break
    if not others:
        return Finding(
            "ok",
            "storage.reachable",
            f"feed Redis {url} is reachable and holds only feedfan's data.",
        )
    shown = ", ".join(repr(o) for o in others)
    default = settings.key_prefix == _DEFAULT_PREFIX
    return Finding(
        "error" if default else "warning",
        "storage.shared",
        f"the feed Redis {url} also holds other data ({shown}, …); feedfan's keys are only "
        f"told apart by the prefix {settings.key_prefix!r}"
        + (
            ", the default, which another feedfan deployment on this database would share."
            if default
            else "."
        ),
        "give feedfan a database of its own (redis://host:6379/<n>) or a distinctive "
        "key_prefix (FEEDFAN_KEY_PREFIX), so a flush or eviction of one does not hit the other.",
    )


def _eviction_finding(client: redis.Redis, what: str, url: str, code: str) -> Finding | None:
    """An error when Redis may evict keys feedfan cannot lose (``None`` if it will not)."""
    try:
        config: dict[str, Any] = client.config_get("maxmemory*")  # type: ignore[assignment]
    except redis.ResponseError:  # CONFIG is disabled on some managed Redis services
        return Finding(
            "ok", code, f"{what} {url} does not say its eviction policy (CONFIG is disabled)."
        )
    limit = int(config.get("maxmemory") or 0)
    policy = str(config.get("maxmemory-policy") or "noeviction")
    if not limit or policy == "noeviction":
        return None
    everything = policy.startswith("allkeys")
    keys = "any key" if everything else "keys with an expiry (fanout progress, kept failures)"
    return Finding(
        "error" if everything else "warning",
        code,
        f"{what} {url} has maxmemory {limit:,} bytes with maxmemory-policy {policy}: when it "
        f"is full it deletes {keys} without telling anyone"
        + (", feed entries and queued chunks included." if everything else "."),
        "set maxmemory-policy noeviction on it (CONFIG SET maxmemory-policy noeviction, and in "
        "redis.conf), or give it the memory it needs.",
    )


def _storage_findings(settings: Settings) -> Iterator[Finding]:
    if settings.effective_storage == "memory":
        yield Finding(
            "ok", "storage.memory", "feeds are kept in this process's memory (embedded default)."
        )
        return
    url = redact_url(settings.effective_redis_url)
    # One attempt, no retries: a check should answer at once.
    storage = RedisStorage(
        url=settings.effective_redis_url,
        key_prefix=settings.key_prefix,
        connection_options={"retry": None, "retry_on_error": [], "socket_connect_timeout": 3},
    )
    try:
        storage.ping()
    except StorageError as e:
        yield Finding(
            "error",
            "storage.unreachable",
            str(e),
            "start Redis or fix redis_url (FEEDFAN_REDIS_URL).",
        )
        return
    try:
        yield _shared_finding(storage, settings, url)
        eviction = _eviction_finding(storage.client, "the feed Redis", url, "storage.eviction")
        if eviction is not None:
            yield eviction
    except redis.RedisError as e:
        yield Finding(
            "error",
            "storage.unreachable",
            f"feed Redis {url} failed: {e}.",
            "start Redis or fix redis_url (FEEDFAN_REDIS_URL); workers cannot write feeds.",
        )
    finally:
        storage.close()


def _broker_redis_findings(settings: Settings) -> Iterator[Finding]:
    """The eviction policy of a Redis broker that is not the feed Redis (checked there already)."""
    url = settings.effective_broker_url
    if url.split("://", 1)[0].lower() not in ("redis", "rediss", "unix"):
        return
    if settings.effective_storage == "redis" and url == settings.effective_redis_url:
        return
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            eviction = _eviction_finding(
                client, "the broker Redis", redact_url(url), "broker.eviction"
            )
            if eviction is not None:
                yield eviction
    finally:
        client.close()


def _queue_findings(dispatcher: TaskDispatcher) -> Iterator[Finding]:
    for priority in FanoutPriority:
        queue = dispatcher.queue_name(priority)
        consumers = dispatcher.consumer_count(priority)
        waiting = dispatcher.queue_depth(priority)
        if consumers is None:
            yield Finding(
                "ok",
                "queue.consumers-unknown",
                f"the {dispatcher.name} broker cannot say who consumes {queue!r} "
                f"({waiting or 0:,} waiting).",
            )
        elif consumers == 0:
            backlog = f" while {waiting:,} task(s) wait" if waiting else ""
            yield Finding(
                "error",
                "queue.no-consumer",
                f"no worker consumes {queue!r}{backlog}; its fanouts will not happen.",
                f"start one: feedfan worker --priority {priority.value} (or --priority all).",
            )
        else:
            yield Finding(
                "ok",
                "queue.consumed",
                f"{queue!r} has {consumers} consumer(s), {waiting or 0:,} waiting.",
            )


def _timeouts_finding(settings: Settings) -> Finding:
    return Finding(
        "ok",
        "timeouts",
        f"a chunk may run {settings.chunk_time_limit} s (chunk_time_limit); one held by a dead "
        f"worker runs again after {settings.redelivery_timeout} s (redelivery_timeout).",
    )


def _app_dispatcher(settings: Settings, findings: list[Finding]) -> tuple[TaskDispatcher, bool]:
    """The dispatcher of the app workers would use; ``(fallback, False)`` if the app fails."""
    try:
        manager = load_app(settings.app, settings)
        return manager.dispatcher, True
    except FeedfanError as e:
        findings.append(
            Finding(
                "error",
                "app.unusable",
                f"the app {settings.app or '(feedfan.Manager)'} cannot be built: {e}",
                "fix what the message names; producers and workers fail the same way.",
            )
        )
    return create_dispatcher(settings, runner=None), False


def run_checks(settings: Settings) -> list[Finding]:
    """Inspect ``settings``, the app and the live brokers; return every finding, errors first."""
    findings: list[Finding] = list(_storage_findings(settings))
    try:
        dispatcher, from_app = _app_dispatcher(settings, findings)
    except FeedfanError as e:
        findings.append(Finding("error", "dispatcher.unavailable", str(e), "see the message."))
        return _ordered(findings)
    # The app's settings: a manager bound in code (RQManager, ...) names its own dispatcher.
    settings = dispatcher.settings
    if settings.dispatcher == "local" and settings.effective_storage == "redis":
        findings.append(
            Finding(
                "warning",
                "dispatcher.local",
                "the 'local' dispatcher keeps queued chunks in this process's memory; they "
                "are lost if the process dies.",
                "use celery, rq or dramatiq for fanout that must survive restarts.",
            )
        )
    try:
        if not dispatcher.runs_in_process:
            try:
                dispatcher.ping()
            except FeedfanError as e:
                findings.append(
                    Finding(
                        "error",
                        "broker.unreachable",
                        str(e),
                        "start the broker or fix broker_url (FEEDFAN_BROKER_URL).",
                    )
                )
                return _ordered(findings)
            findings.append(
                Finding(
                    "ok",
                    "broker.reachable",
                    f"broker {redact_url(settings.effective_broker_url)} is reachable.",
                )
            )
            findings.extend(_broker_redis_findings(settings))
            findings.extend(_queue_findings(dispatcher))
            findings.append(_timeouts_finding(settings))
        if from_app:
            findings.extend(dispatcher.check())
    except FeedfanError as e:
        findings.append(
            Finding("error", "broker.failed", str(e), "see the message; then run the check again.")
        )
    finally:
        dispatcher.close()
        if from_app and isinstance(dispatcher.runner, TaskRunner):
            with contextlib.suppress(Exception):
                dispatcher.runner.manager.storage.close()
    return _ordered(findings)


def _ordered(findings: list[Finding]) -> list[Finding]:
    rank = {"error": 0, "warning": 1, "ok": 2}
    return sorted(findings, key=lambda f: rank.get(f.level, 3))
