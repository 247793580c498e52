"""What feedfan puts on Dramatiq's queues, and what it finds in their dead-letter queues.

Shared by the Redis and RabbitMQ sides of the Dramatiq adapter: the two
actors' names, the message that carries one task, and :class:`DeadLetter`, a
message read back from ``<queue>.XQ`` with the reason it is there.
:class:`BrokerQueues` is the interface both sides implement.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dramatiq.errors import DecodeError
from dramatiq.message import Message

from feedfan.errors import PayloadError
from feedfan.priority import FanoutPriority

__all__ = [
    "ACTOR_NAMES",
    "ACTOR_PRIORITIES",
    "DEAD_AT_OPTION",
    "REASON_OPTION",
    "BrokerQueues",
    "DeadLetter",
    "body_text",
    "decode_failure",
    "read_dead_letter",
    "task_message",
]

ACTOR_NAMES = {FanoutPriority.HIGH: "feedfan_high", FanoutPriority.LOW: "feedfan_low"}
"""The actor of each priority's queue; both run the same function."""

ACTOR_PRIORITIES = {FanoutPriority.HIGH: 0, FanoutPriority.LOW: 10}
"""Dramatiq actor priorities: lower runs first among messages a worker has fetched."""

REASON_OPTION = "feedfan_reason"
"""Message option holding why feedfan dead-lettered a message."""

DEAD_AT_OPTION = "feedfan_dead_lettered_at"
"""Message option holding when (UNIX milliseconds) feedfan dead-lettered it."""


def body_text(raw: bytes | str) -> str:
    """``raw`` as text for a message argument; bytes that are not UTF-8 survive exactly."""
    if isinstance(raw, str):
        return raw
    return bytes(raw).decode("utf-8", "surrogateescape")


def _printable(text: str) -> str:
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in text)


def task_message(queue_name: str, priority: FanoutPriority, body: str) -> Message[Any]:
    """The Dramatiq message that asks feedfan's actor of ``priority`` to run ``body``."""
    return Message(
        queue_name=queue_name,
        actor_name=ACTOR_NAMES[priority],
        args=(body,),
        kwargs={},
        options={},
    )


@dataclass(frozen=True)
class DeadLetter:
    """One message in a dead-letter queue, read without removing it."""

    queue: str
    """The queue the message was meant for (its dead letters are in ``<queue>.XQ``)."""

    body: str
    """The task body, or the raw message when it is not one of feedfan's messages."""

    reason: str
    """Why it is there."""

    at: float
    """When it was dead-lettered (UNIX seconds), as well as the broker records it."""

    message: Message[Any] | None
    """The decoded Dramatiq message, ``None`` when it does not decode."""

    ref: object = None
    """The broker's handle of the message (a Redis id, an AMQP delivery tag)."""

    @property
    def shown_body(self) -> str:
        """The body, printable whatever bytes it holds."""
        return _printable(self.body)

    def replay_message(self, prepare: Callable[[str], object]) -> Message[Any] | None:
        """A fresh message running this task again, or ``None`` if it is not a valid task.

        ``prepare`` decodes a body, raising :class:`PayloadError` when it is
        malformed, and readies the task's progress for its second run.
        """
        message = self.message
        if message is None or message.actor_name not in ACTOR_NAMES.values():
            return None
        if len(message.args) != 1 or message.kwargs or not isinstance(message.args[0], str):
            return None
        try:
            prepare(message.args[0])
        except PayloadError:
            return None
        return Message(
            queue_name=self.queue,
            actor_name=message.actor_name,
            args=(message.args[0],),
            kwargs={},
            options={},
        )


def decode_failure(error: DecodeError) -> str:
    """Why Dramatiq could not decode a message, from the innermost error it wraps."""
    root: BaseException = error
    while isinstance(root, DecodeError) and isinstance(root.error, BaseException):
        root = root.error
    text = f"{type(root).__name__}: {root}"
    return text if len(text) <= 160 else text[:157] + "..."


def _last_line(text: object) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def read_dead_letter(
    queue: str, raw: bytes, *, at: float | None, broker_reason: str, ref: object = None
) -> DeadLetter:
    """Interpret ``raw``, a message found in ``queue``'s dead-letter queue.

    ``broker_reason`` is what the broker itself says (``"rejected"``), used
    when the message carries no reason of feedfan's.
    """
    try:
        message = Message.decode(raw)
    except DecodeError as e:
        return DeadLetter(
            queue=queue,
            body=body_text(raw),
            reason=f"not a Dramatiq message ({decode_failure(e)}); the worker refused it "
            f"({broker_reason}) and went on",
            at=at if at is not None else time.time(),
            message=None,
            ref=ref,
        )
    options = message.options
    marked = options.get(DEAD_AT_OPTION)
    if isinstance(marked, (int, float)):
        at = marked / 1000
    elif at is None:
        at = message.message_timestamp / 1000
    ours = message.actor_name in ACTOR_NAMES.values()
    reason = str(options.get(REASON_OPTION) or "")
    if not reason and not ours:
        reason = (
            f"for actor {message.actor_name!r}, which feedfan's worker does not define "
            f"({broker_reason})"
        )
    elif not reason:
        last = _last_line(options.get("traceback", ""))
        reason = f"dead-lettered by Dramatiq ({broker_reason})" + (
            f" after {options.get('retries', 0)} attempt(s): {last}" if last else ""
        )
    args = message.args
    ours_body = ours and len(args) == 1 and isinstance(args[0], str)
    body = args[0] if ours_body else body_text(raw)
    return DeadLetter(
        queue=queue,
        body=body,
        reason=reason,
        at=float(at),
        message=message,
        ref=ref,
    )


class BrokerQueues(ABC):
    """Feedfan's operations on one Dramatiq broker's queues.

    Methods raise the driver's own errors; the dispatcher translates the
    ones listed in :attr:`errors` into feedfan's.
    """

    errors: tuple[type[BaseException], ...] = ()
    """Driver exceptions that mean the broker failed (translated by the dispatcher)."""

    connection_errors: tuple[type[BaseException], ...] = ()
    """The subset of :attr:`errors` that mean the broker could not be reached."""

    kind: str = ""
    """``"Redis"`` or ``"RabbitMQ"``, for messages."""

    @abstractmethod
    def publish(self, messages: Sequence[Message[Any]]) -> None:
        """Send ``messages`` in as few round trips as the broker allows; all or none."""

    @abstractmethod
    def push_raw(self, queue: str, data: bytes) -> None:
        """Put ``data`` on ``queue`` as the whole broker message, unchecked (tests)."""

    @abstractmethod
    def depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` and its delay queue, not yet taken by a worker."""

    @abstractmethod
    def dead_letters(self, queue: str, *, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` messages of ``<queue>.XQ``, newest first, left in place."""

    @abstractmethod
    def replay(self, queue: str, prepare: Callable[[str], object], *, limit: int) -> int:
        """Move up to ``limit`` valid tasks from ``<queue>.XQ`` back to ``queue``.

        ``prepare`` is :meth:`DeadLetter.replay_message`'s.
        """

    @abstractmethod
    def ping(self) -> None:
        """Reach the broker, raising the driver's error if it cannot be reached."""

    def held(self, queues: Sequence[str]) -> int | None:
        """Messages of ``queues`` that workers hold (fetched, not acked); ``None``: unknown."""
        return None

    def consumers(self, queue: str) -> int | None:
        """Consumers of ``queue``; ``None`` when the broker keeps no such count."""
        return None

    @abstractmethod
    def purge(self, queues: Sequence[str]) -> None:
        """Delete ``queues`` with their delay and dead-letter queues and bookkeeping."""

    def maintain(self, queues: Sequence[str]) -> None:  # noqa: B027 - only Redis needs it
        """Give back to their queues the messages held by workers that died."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release the connections this object opened itself."""
