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
  item BRPOP returns; one kombu could not read is kept and skipped.

Nothing is ever unpickled: kombu refuses pickle content before decoding it
(``accept_content=['json']``), and the guard decodes nothing but JSON.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer
from kombu.transport import redis as kombu_redis
from kombu.utils import json as kombu_json

from feedfan.runner import get_runner

from ._celery_app import TASK_NAME

__all__ = ["FeedfanConsumer", "GuardedRedisTransport", "envelope_problem", "keep_garbage"]

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


class FeedfanConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, keeping malformed messages on feedfan's queues instead of dropping them.

    Set it as ``worker_consumer`` (feedfan's own app and
    :func:`~feedfan.backends.celery.register_tasks` do). Messages on other
    queues get Celery's usual treatment.
    """

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
    if isinstance(item, bytes):
        try:
            item = item.decode("utf-8")
        except UnicodeDecodeError:
            return "not a kombu message: not UTF-8 text (is it pickled?)."
    try:
        payload = _kombu_loads(item)
    except ValueError as e:
        return f"not a kombu message: not JSON ({e})."
    except RecursionError:
        # Raised out of BRPOP's reply, it would stop the worker like any other error.
        return "not a kombu message: JSON nested too deeply to read."
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


class _BRPOPGuard:
    """Mixed into kombu's Redis client: BRPOP replies kombu cannot read are kept, not returned."""

    def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any:
        reply = super().parse_response(connection, command_name, **options)  # type: ignore[misc]
        if command_name == "BRPOP" and reply:
            key, item = reply
            problem = envelope_problem(item)
            if problem is not None:
                name = key.decode() if isinstance(key, bytes) else str(key)
                queue = name.rsplit(kombu_redis.Channel.sep, 1)[0]
                if not keep_garbage(queue, item, problem, feedfan_only=False):
                    logger.critical(
                        "feedfan dropped a message from %s that it could not keep (%s): %r",
                        queue,
                        problem,
                        item[:200],
                    )
                # kombu treats an empty reply as a BRPOP timeout and polls again.
                return None
        return reply


@functools.cache
def _guarded(client_class: type) -> type:
    return type(f"Guarded{client_class.__name__}", (_BRPOPGuard, client_class), {})


class GuardedRedisChannel(kombu_redis.Channel):
    """kombu's Redis channel whose client keeps unreadable queue items."""

    def _get_client(self) -> Any:
        parent: Any = super()
        client = parent._get_client()
        if isinstance(client, functools.partial):  # the global_keyprefix client
            return functools.partial(_guarded(client.func), *client.args, **client.keywords)
        return _guarded(client)


class GuardedRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, except that a queue item it cannot read never stops the worker."""

    Channel = GuardedRedisChannel
