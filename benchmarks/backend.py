"""Which backends a run covers: a dispatcher on a broker, and whether it can run here.

A backend is named ``<dispatcher>-<broker>`` (``celery-redis``, ``dramatiq-amqp``)
or just ``<dispatcher>`` (every broker it supports that is reachable; ``rq``
is ``rq-redis``). In-process dispatchers (``local``) have no broker: their
threads write to the same Redis feeds. With no ``--backend``, every dispatcher
feedfan knows (built-ins and the ``feedfan.dispatchers`` entry points) is
tried; those that do not import or cannot be built are listed with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.manager import APP
from benchmarks.servers import Servers
from feedfan.config import Settings, load_settings
from feedfan.dispatch import TaskDispatcher, available_dispatchers, resolve_dispatcher_class
from feedfan.priority import FanoutPriority

__all__ = ["Backend", "Skipped", "discover_backends", "needs_amqp", "parse_backend_name"]

_BROKERS = ("redis", "amqp")
_KNOWN_BROKERS: dict[str, tuple[str, ...]] = {
    "celery": ("redis", "amqp"),
    "rq": ("redis",),
    "dramatiq": ("redis", "amqp"),
    "local": ("none",),
}
_NOT_BENCHMARKED = ("eager",)  # runs every chunk inline in the producer: nothing to measure


@dataclass(frozen=True)
class Skipped:
    """A backend that was asked for (or found) but cannot run here, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Backend:
    """One dispatcher on one broker."""

    dispatcher: str
    broker: str
    """``"redis"``, ``"amqp"`` or ``"none"`` (in-process)."""
    broker_url: str | None
    dispatcher_class: type[TaskDispatcher]

    @property
    def label(self) -> str:
        """The name used in tables and on the command line: ``celery-redis``."""
        return self.dispatcher if self.broker == "none" else f"{self.dispatcher}-{self.broker}"

    @property
    def in_process(self) -> bool:
        """Whether chunks run in the producer's own threads (no worker processes)."""
        return self.dispatcher_class.runs_in_process

    def settings(self, redis_url: str, namespace: str, **overrides: Any) -> Settings:
        """Settings with a key prefix and queue names of ``namespace``'s own.

        Files and ``FEEDFAN_*`` variables are read first, so a user's own
        ``chunk_time_limit``, ``redelivery_timeout`` or ``write_mode`` are
        what the benchmark measures and reasons against.
        """
        values: dict[str, Any] = {
            "dispatcher": self.dispatcher,
            "redis_url": redis_url,
            "storage": "redis",
            "key_prefix": f"ffbench:{namespace}:",
            "queue_high": f"ffbench.{namespace}.high",
            "queue_low": f"ffbench.{namespace}.low",
            "app": APP,
        }
        if self.broker_url is not None:
            values["broker_url"] = self.broker_url
        values.update(overrides)
        return load_settings(values)

    def describe(self) -> dict[str, Any]:
        """The backend for the JSON report."""
        return {
            "label": self.label,
            "dispatcher": self.dispatcher,
            "broker": self.broker,
            "class": f"{self.dispatcher_class.__module__}.{self.dispatcher_class.__qualname__}",
            "supports_bulk_enqueue": self.dispatcher_class.supports_bulk_enqueue,
            "in_process": self.in_process,
        }


def parse_backend_name(name: str) -> tuple[str, str | None]:
    """Split ``celery-redis`` into ``("celery", "redis")``; ``rq`` gives ``("rq", None)``."""
    base, sep, broker = name.strip().rpartition("-")
    if sep and broker in _BROKERS and base:
        return base, broker
    return name.strip(), None


def needs_amqp(requested: list[str] | None) -> bool:
    """Whether any backend asked for (all of them, without ``--backend``) may use RabbitMQ."""
    if not requested:
        return True
    for name in requested:
        dispatcher, broker = parse_backend_name(name)
        if broker == "amqp" or (
            broker is None and "amqp" in _KNOWN_BROKERS.get(dispatcher, _BROKERS)
        ):
            return True
    return False


def _probe(backend: Backend, redis_url: str) -> None:
    """Build the dispatcher and its worker command once, so a broken adapter is found early."""
    settings = backend.settings(redis_url, "probe")
    dispatcher = backend.dispatcher_class(settings)
    try:
        if not backend.in_process:
            dispatcher.worker_command(list(FanoutPriority), concurrency=2)
    finally:
        dispatcher.close()


def discover_backends(
    requested: list[str] | None, servers: Servers
) -> tuple[list[Backend], list[Skipped]]:
    """The backends to run, and those that cannot run here with the reason."""
    wanted: list[tuple[str, str | None]] = (
        [parse_backend_name(n) for n in requested]
        if requested
        else [(n, None) for n in available_dispatchers() if n not in _NOT_BENCHMARKED]
    )
    found: list[Backend] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for dispatcher, broker in wanted:
        try:
            cls = resolve_dispatcher_class(dispatcher)
        except Exception as e:  # an adapter being written may fail in any way
            skipped.append(Skipped(dispatcher, f"does not import: {e}"))
            continue
        if cls.runs_in_process:
            brokers: tuple[str, ...] = ("none",)
        elif broker is not None:
            brokers = (broker,)
        else:
            brokers = _KNOWN_BROKERS.get(dispatcher, _BROKERS)
        for name in brokers:
            url = servers.url_for(name)
            backend = Backend(dispatcher, name, url, cls)
            if backend.label in seen:
                continue
            seen.add(backend.label)
            if not servers.reachable(name):
                skipped.append(Skipped(backend.label, f"no reachable {name} broker"))
                continue
            try:
                _probe(backend, servers.redis_url)
            except Exception as e:
                skipped.append(Skipped(backend.label, f"cannot be set up: {e}"))
                continue
            found.append(backend)
    return found, skipped
