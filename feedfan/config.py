"""Settings, and where each value came from.

Sources, later ones winning: the defaults below < ``feedfan.toml`` or
``[tool.feedfan]`` in ``pyproject.toml`` (the nearest one at or above the
working directory, or the file named by ``FEEDFAN_CONFIG``) < Django's
``settings.FEEDFAN`` when that integration is used < environment variables
``FEEDFAN_<NAME>`` < arguments passed in code. A bad value is reported with the
setting's name, the source that set it, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedfan.errors import ConfigurationError, redact_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "BUILTIN_DISPATCHERS",
    "DEFAULT_REDIS_URL",
    "ENV_PREFIX",
    "IN_PROCESS_DISPATCHERS",
    "SETTINGS_DOC",
    "Settings",
    "find_config_file",
    "load_settings",
]

ENV_PREFIX = "FEEDFAN_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
BUILTIN_DISPATCHERS = ("celery", "rq", "dramatiq", "local", "eager")
IN_PROCESS_DISPATCHERS = ("local", "eager")
_SECRET_FIELDS = ("broker_url", "redis_url")


def _positive(low: int, high: int) -> Callable[[str, object, str], int]:
    def parse(name: str, value: object, source: str) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigurationError(
                f"{name}={value!r} (from {source}) must be an integer from {low:,} to {high:,}."
            )
        return value

    return parse


def _choice(*allowed: str) -> Callable[[str, object, str], str]:
    def parse(name: str, value: object, source: str) -> str:
        if not isinstance(value, str) or value.strip().lower() not in allowed:
            raise ConfigurationError(
                f"{name}={value!r} (from {source}) must be one of: {', '.join(allowed)}."
            )
        return value.strip().lower()

    return parse


def _text(name: str, value: object, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{name}={value!r} (from {source}) must be a non-empty string.")
    return value.strip()


def _optional_text(name: str, value: object, source: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _text(name, value, source)


def _url(*schemes: str) -> Callable[[str, object, str], str | None]:
    def parse(name: str, value: object, source: str) -> str | None:
        text = _optional_text(name, value, source)
        if text is not None and text.split("://", 1)[0].lower() not in schemes:
            raise ConfigurationError(
                f"{name}={redact_url(text)!r} (from {source}) must be a URL with scheme "
                f"{', '.join(s + '://' for s in schemes)}."
            )
        return text

    return parse


def _dispatcher(name: str, value: object, source: str) -> str:
    text = _text(name, value, source)
    lowered = text.lower()
    if lowered in BUILTIN_DISPATCHERS:
        return lowered
    return text


def _prefix(name: str, value: object, source: str) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ConfigurationError(
            f"{name}={value!r} (from {source}) must be a non-empty string without spaces, "
            "e.g. 'feedfan:'; an empty prefix would mix feedfan's keys with other data."
        )
    return value


@dataclass(frozen=True)
class _Spec:
    default: Any
    parse: Callable[[str, object, str], Any]
    doc: str


_SPECS: dict[str, _Spec] = {
    "dispatcher": _Spec(
        "local",
        _dispatcher,
        "Job queue that runs chunks: celery, rq, dramatiq, local, eager, or a dotted path.",
    ),
    "broker_url": _Spec(
        None,
        _url("redis", "rediss", "amqp", "amqps", "unix"),
        "Broker of the job queue (redis:// or amqp://); defaults to redis_url.",
    ),
    "redis_url": _Spec(
        None,
        _url("redis", "rediss", "unix"),
        f"Redis holding the feeds; {DEFAULT_REDIS_URL} when a real queue is used.",
    ),
    "storage": _Spec(
        "auto",
        _choice("auto", "memory", "redis"),
        "Feed storage; auto = memory for local/eager without redis_url, else redis.",
    ),
    "key_prefix": _Spec("feedfan:", _prefix, "Prefix of every Redis key feedfan writes."),
    "write_mode": _Spec(
        "script",
        _choice("script", "pipeline"),
        "How a chunk is written to Redis in one round trip: a Lua script or a pipeline.",
    ),
    "fanout_chunk_size": _Spec(
        100, _positive(1, 100_000), "Followers per fanout task (Stream Framework's default: 100)."
    ),
    "max_chunk_size": _Spec(
        10_000, _positive(1, 100_000), "Largest fanout_chunk_size accepted (a task-size guard)."
    ),
    "max_task_bytes": _Spec(
        1_048_576, _positive(1024, 64 * 1_048_576), "Largest encoded task accepted, in bytes."
    ),
    "max_extra_bytes": _Spec(
        16_384, _positive(0, 1_048_576), "Largest encoded Activity.extra accepted, in bytes."
    ),
    "queue_high": _Spec("feedfan.high", _text, "Queue name of HIGH priority chunks."),
    "queue_low": _Spec("feedfan.low", _text, "Queue name of LOW priority chunks."),
    "app": _Spec(
        None,
        _optional_text,
        "The manager workers use, as 'package.module:attribute' (instance or class).",
    ),
    "local_workers": _Spec(2, _positive(1, 256), "Threads of the in-process 'local' dispatcher."),
    "worker_concurrency": _Spec(
        2, _positive(1, 512), "Processes or threads a `feedfan worker` starts."
    ),
    "chunk_time_limit": _Spec(
        120, _positive(1, 86_400), "Seconds one chunk may run before its worker gives up on it."
    ),
    "redelivery_timeout": _Spec(
        600,
        _positive(1, 7 * 86_400),
        "Seconds before a chunk held by a dead worker is delivered again "
        "(Celery on Redis: visibility timeout; Dramatiq on Redis: heartbeat timeout).",
    ),
    "max_retries": _Spec(
        3, _positive(0, 100), "Retries of a chunk whose write failed, before it is dead-lettered."
    ),
    "planning": _Spec(
        "auto",
        _choice("inline", "background", "auto"),
        "Where followers are cut into chunks: in add_user_activity (inline), in a worker "
        "(background), or a worker from planning_threshold followers on (auto).",
    ),
    "planning_threshold": _Spec(
        10_000,
        _positive(0, 10**9),
        "With planning=auto, follower count from which planning moves to a worker "
        "(inline planning passes 50 ms from about 17,000 followers; see docs/operations.md).",
    ),
    "planning_page": _Spec(
        20,
        _positive(1, 100_000),
        "Chunk tasks one background planning task sends before the next page, a task of "
        "its own, goes on: planning holds a worker about as long as a chunk does.",
    ),
    "status_ttl": _Spec(
        7 * 86_400, _positive(60, 365 * 86_400), "Seconds fanout progress is kept in Redis."
    ),
}

SETTINGS_DOC: dict[str, str] = {name: spec.doc for name, spec in _SPECS.items()}
"""One line of documentation per setting, for ``feedfan config`` and the README."""


@dataclass(frozen=True)
class Settings:
    """The effective configuration; see :data:`SETTINGS_DOC` for each field.

    Build it with :func:`load_settings`, which records in ``sources`` where
    every value came from.
    """

    dispatcher: str = "local"
    broker_url: str | None = None
    redis_url: str | None = None
    storage: str = "auto"
    key_prefix: str = "feedfan:"
    write_mode: str = "script"
    fanout_chunk_size: int = 100
    max_chunk_size: int = 10_000
    max_task_bytes: int = 1_048_576
    max_extra_bytes: int = 16_384
    queue_high: str = "feedfan.high"
    queue_low: str = "feedfan.low"
    app: str | None = None
    local_workers: int = 2
    worker_concurrency: int = 2
    chunk_time_limit: int = 120
    redelivery_timeout: int = 600
    max_retries: int = 3
    planning: str = "auto"
    planning_threshold: int = 10_000
    planning_page: int = 20
    status_ttl: int = 7 * 86_400
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name, spec in _SPECS.items():
            source = self.sources.get(name, "default")
            value = getattr(self, name)
            if value != spec.default or source != "default":
                object.__setattr__(self, name, spec.parse(name, value, source))
        self._check_consistency()

    def _where(self, name: str) -> str:
        return self.sources.get(name, "default")

    def _check_consistency(self) -> None:
        if self.fanout_chunk_size > self.max_chunk_size:
            raise ConfigurationError(
                f"fanout_chunk_size={self.fanout_chunk_size} (from "
                f"{self._where('fanout_chunk_size')}) is above max_chunk_size="
                f"{self.max_chunk_size} (from {self._where('max_chunk_size')}); lower the "
                "chunk size or raise the limit."
            )
        if self.queue_high == self.queue_low:
            raise ConfigurationError(
                f"queue_high and queue_low are both {self.queue_high!r} (from "
                f"{self._where('queue_high')} and {self._where('queue_low')}); HIGH and LOW "
                "chunks need different queues."
            )
        if self.storage == "memory" and self.dispatcher not in IN_PROCESS_DISPATCHERS:
            raise ConfigurationError(
                f"storage='memory' (from {self._where('storage')}) cannot be used with "
                f"dispatcher={self.dispatcher!r} (from {self._where('dispatcher')}): its "
                "worker processes would not see the feeds. Set storage='redis' and redis_url."
            )
        if self.redelivery_timeout <= self.chunk_time_limit:
            raise ConfigurationError(
                f"redelivery_timeout={self.redelivery_timeout} (from "
                f"{self._where('redelivery_timeout')}) must exceed chunk_time_limit="
                f"{self.chunk_time_limit} (from {self._where('chunk_time_limit')}), or a chunk "
                "still running would be delivered to a second worker."
            )

    @property
    def effective_storage(self) -> str:
        """``"memory"`` or ``"redis"``, with ``storage="auto"`` resolved."""
        if self.storage != "auto":
            return self.storage
        in_process = self.dispatcher in IN_PROCESS_DISPATCHERS
        return "memory" if in_process and self.redis_url is None else "redis"

    @property
    def effective_redis_url(self) -> str:
        """The Redis URL of the feed storage, with the default filled in."""
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def effective_broker_url(self) -> str:
        """The broker URL, falling back to the storage's Redis."""
        return self.broker_url or self.effective_redis_url

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied and recorded as arguments."""
        return self.with_values(changes, source="argument")

    def with_values(self, changes: Mapping[str, Any], *, source: str) -> Settings:
        """Return a copy with ``changes`` applied, recording ``source`` as their origin."""
        sources = dict(self.sources)
        for name in changes:
            if name not in _SPECS:
                raise ConfigurationError(_unknown_message(name, source))
            sources[name] = source
        values = {name: getattr(self, name) for name in _SPECS}
        values.update(changes)
        return Settings(**values, sources=sources)

    def to_env(self) -> dict[str, str]:
        """Environment variables that reproduce these settings in a child process."""
        env = {}
        for name in _SPECS:
            value = getattr(self, name)
            if value is not None:
                env[ENV_PREFIX + name.upper()] = str(value)
        return env

    def describe(self) -> list[tuple[str, str, str]]:
        """Rows ``(name, value, source)`` with secrets masked, for display."""
        rows = []
        for name in _SPECS:
            value = getattr(self, name)
            shown = redact_url(value) if name in _SECRET_FIELDS and value else repr(value)
            rows.append((name, shown, self.sources.get(name, "default")))
        return rows


def _unknown_message(name: str, source: str) -> str:
    close = difflib.get_close_matches(name, list(_SPECS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown setting {name!r} (from {source}).{hint} Known settings: {', '.join(_SPECS)}."


def _warn_near_misses(environment: Mapping[str, str]) -> None:
    """Warn of a ``FEEDFAN_`` variable that is no setting's but nearly one's: a typo.

    Not an error, as an unknown key in a file is: other ``FEEDFAN_`` variables
    exist (``FEEDFAN_CONFIG``, the drills' and benchmarks' own), and a stray
    variable must not stop a service. One close to no setting is left alone.
    """
    variables = {ENV_PREFIX + name.upper(): name for name in _SPECS}
    for variable in environment:
        if not variable.startswith(ENV_PREFIX) or variable in variables:
            continue
        close = difflib.get_close_matches(variable, list(variables), n=1, cutoff=0.9)
        if close:
            warnings.warn(
                f"environment variable {variable} is not a feedfan setting and is ignored; "
                f"did you mean {close[0]}? (settings: feedfan config)",
                UserWarning,
                stacklevel=3,
            )


def find_config_file(start: Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """Find the nearest ``feedfan.toml`` or ``pyproject.toml`` with ``[tool.feedfan]``.

    ``FEEDFAN_CONFIG`` names a file explicitly. Returns the file and its
    feedfan table, or ``None``.
    """
    explicit = os.environ.get(ENV_PREFIX + "CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigurationError(
                f"FEEDFAN_CONFIG={explicit!r} (from environment) names no file; fix the path."
            )
        table = _read_toml(path)
        if path.name == "pyproject.toml":
            table = table.get("tool", {}).get("feedfan", {})
        return path, table
    directory = (start or Path.cwd()).resolve()
    for folder in (directory, *directory.parents):
        candidate = folder / "feedfan.toml"
        if candidate.is_file():
            return candidate, _read_toml(candidate)
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            section = _read_toml(candidate).get("tool", {}).get("feedfan")
            if section is not None:
                return candidate, section
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"{path} is not valid TOML: {e}.") from e


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    start: Path | None = None,
    extra_layers: tuple[tuple[str, Mapping[str, Any]], ...] = (),
    read_files: bool = True,
) -> Settings:
    """Build the effective :class:`Settings` from every source, recording each value's origin.

    ``extra_layers`` are ``(source name, mapping)`` pairs placed between the
    file and the environment (the Django integration passes ``settings.FEEDFAN``).
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def layer(mapping: Mapping[str, Any], describe: Callable[[str], str]) -> None:
        for raw_name, value in mapping.items():
            name = raw_name.lower().replace("-", "_")
            if name not in _SPECS:
                raise ConfigurationError(_unknown_message(raw_name, describe(raw_name)))
            values[name] = value
            sources[name] = describe(raw_name)

    if read_files:
        found = find_config_file(start)
        if found is not None:
            path, table = found
            where = f"{path} [tool.feedfan]" if path.name == "pyproject.toml" else str(path)
            layer(table, lambda key: f"{where} key {key!r}")
    for source_name, mapping in extra_layers:
        layer(mapping, functools.partial("{0}[{1!r}]".format, source_name))
    environment = os.environ if env is None else env
    for name in _SPECS:
        variable = ENV_PREFIX + name.upper()
        if variable in environment:
            values[name] = environment[variable]
            sources[name] = f"environment variable {variable}"
    _warn_near_misses(environment)
    layer(overrides or {}, lambda key: f"argument {key}")
    for name, spec in _SPECS.items():
        values.setdefault(name, spec.default)
    return Settings(**values, sources=sources)
