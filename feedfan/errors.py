"""The exceptions feedfan raises.

Every error derives from :class:`FeedfanError`, so one ``except`` clause catches
them all; errors from redis-py, kombu, pika or a queue library are translated
into one of these before they reach user code, with the original chained as
``__cause__``.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "ActivityError",
    "BrokerError",
    "ConfigurationError",
    "DispatchError",
    "FeedfanError",
    "LimitExceededError",
    "MissingDependencyError",
    "PayloadError",
    "StorageError",
    "UnknownDispatcherError",
    "redact_url",
]


class FeedfanError(Exception):
    """The root of every error feedfan raises."""


class ConfigurationError(FeedfanError, ValueError):
    """A setting has a value feedfan cannot use.

    The message names the setting, where its value came from (a file, an
    environment variable, an argument), the value, and the allowed values.
    """


class UnknownDispatcherError(ConfigurationError):
    """The configured dispatcher is neither built in, registered, nor importable."""


class MissingDependencyError(ConfigurationError):
    """A known dispatcher was chosen but its queue library is not installed."""


class ActivityError(FeedfanError, ValueError):
    """An activity or one of its fields is invalid; raised where it is built."""


class LimitExceededError(FeedfanError, ValueError):
    """A chunk, a task or an activity's ``extra`` is larger than the configured limit.

    Raised while a fanout's chunks are being sent, ``accepted`` says how many
    of them the queue took before the one over the limit; none after it is sent.
    """

    def __init__(self, message: str, *, accepted: int = 0) -> None:
        super().__init__(message)
        self.accepted = accepted


class PayloadError(FeedfanError, ValueError):
    """A task read from a queue is malformed: not JSON, wrong version, wrong types.

    Workers reject such a task, keep it where a person can see it, and go on.
    """


class StorageError(FeedfanError):
    """The feed storage (Redis) could not be reached or refused a command."""


class DispatchError(FeedfanError):
    """Tasks could not be handed to the job queue.

    ``accepted`` says how many tasks of the batch the queue took before the
    failure; a retry of the same activity completes the fanout, and since task
    ids are deterministic and writes idempotent, nothing is written twice.
    """

    def __init__(self, message: str, *, accepted: int = 0) -> None:
        super().__init__(message)
        self.accepted = accepted


class BrokerError(DispatchError):
    """The broker could not be reached; the message names the URL, password masked."""


def redact_url(url: str | None) -> str:
    """Return ``url`` with any password replaced by ``***``, for messages and logs."""
    if not url:
        return str(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
