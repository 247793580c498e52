"""Activities, their ids and their JSON codec.

An activity is "actor verb object (target)" at a time, with a small JSON
``extra``. Its id is stable (the same fields give the same id) and sorts by
time: the first sixteen digits are the time in microseconds since the epoch,
which is also the activity's sort key. Sixteen digits stay below 2**53, so the
key is exact as a Redis score, a double; Stream Framework's 26-digit ids are
not, and two activities in the same second could swap places in a feed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Union, cast

from feedfan.errors import ActivityError, PayloadError

__all__ = [
    "ACTIVITY_ID_PATTERN",
    "CODEC_VERSION",
    "MAX_SORT_KEY",
    "Activity",
    "ObjectId",
    "check_object_id",
    "check_object_ids",
    "decode_activity",
    "encode_activity",
    "sort_key_of",
]

ObjectId = Union[str, int]  # noqa: UP007 - a runtime alias, usable on 3.10
"""Users, objects and targets are named by a string or an integer."""

CODEC_VERSION = 1
"""The version written as ``"v"`` into every encoded activity and task."""

MAX_SORT_KEY = 2**53
"""Sort keys are below this bound so a Redis score (a double) holds them exactly."""

_SORT_KEY_DIGITS = 16
_DIGEST_CHARS = 10
ACTIVITY_ID_PATTERN = re.compile(r"^[0-9]{16}[0-9a-f]{10}$")
"""What every activity id looks like: 16 digits of time, 10 hex digits of digest."""

_MAX_ID_CHARS = 256
_MAX_INT_ID = 2**63
_MAX_EXTRA_DEPTH = 32
# Control characters, and lone surrogates: no valid text (nor a Redis key) holds one.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class _Required:
    """Marks an Activity field that has no default, so leaving it out is a feedfan error."""

    def __repr__(self) -> str:
        return "<required>"


_REQUIRED: Any = _Required()


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def check_object_id(
    name: str, value: object, *, error: type[Exception] = ActivityError
) -> ObjectId:
    """Return ``value`` if it can name a user or object, else raise ``error``.

    An id is a non-empty string of at most 256 printable characters, or an
    integer (not a bool) whose magnitude is below 2**63.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise error(
            f"{name} must be a str or int id, got {_describe(value)}; "
            "pass the primary key of the user or object."
        )
    if isinstance(value, int):
        if abs(value) >= _MAX_INT_ID:
            raise error(f"{name} must be an int id below 2**63 in magnitude, got {value}.")
        return value
    if not value or len(value) > _MAX_ID_CHARS or _CONTROL.search(value):
        raise error(
            f"{name} must be a non-empty string of at most {_MAX_ID_CHARS} printable "
            f"characters, got {_describe(value)}."
        )
    return value


def check_object_ids(
    name: str, values: Iterable[object], *, error: type[Exception] = ActivityError
) -> tuple[ObjectId, ...]:
    """:func:`check_object_id` on every value, as a tuple; the first bad one raises.

    A batch of ids of one type (the usual case: a chunk of followers) is
    checked as a whole, at C speed: types, then the extremes, then, for
    strings, control characters in all of them joined.
    """
    batch = tuple(values)
    kinds = set(map(type, batch))
    if kinds == {int}:
        ints = cast("tuple[int, ...]", batch)
        if min(ints) > -_MAX_INT_ID and max(ints) < _MAX_INT_ID:
            return ints
    elif kinds == {str}:
        strings = cast("tuple[str, ...]", batch)
        lengths = list(map(len, strings))
        joined = "".join(strings)
        if min(lengths) > 0 and max(lengths) <= _MAX_ID_CHARS and not _CONTROL.search(joined):
            return strings
    elif not kinds:
        return ()
    # Mixed, or something is wrong: one at a time, for the first bad id's own message.
    return tuple(check_object_id(name, value, error=error) for value in batch)


def _check_json(path: str, value: object, depth: int) -> None:
    if depth > _MAX_EXTRA_DEPTH:
        raise ActivityError(f"{path} is nested deeper than {_MAX_EXTRA_DEPTH} levels.")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ActivityError(
                f"{path} must be JSON, got {value!r}; NaN and infinity are not JSON numbers."
            )
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json(f"{path}[{index}]", item, depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ActivityError(
                    f"{path} keys must be str, got {_describe(key)}; JSON objects have string keys."
                )
            _check_json(f"{path}[{key!r}]", item, depth + 1)
        return
    raise ActivityError(
        f"{path} must be a JSON value (None, bool, int, float, str, list, dict), "
        f"got {_describe(value)}; convert it first, e.g. str() or .isoformat()."
    )


def sort_key_of(when: datetime) -> int:
    """Return the sort key of ``when``: whole microseconds since the Unix epoch."""
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Activity:
    """One thing that happened: ``actor`` did ``verb`` to ``object`` (at ``target``).

    ``time`` must be timezone-aware and defaults to now; ``extra`` holds any
    JSON-compatible context (a pin's image URL, a comment's text). Fields are
    checked when the activity is built, so a bad one fails in the code that
    made it, not later in a worker.
    """

    actor: ObjectId = _REQUIRED
    verb: str = _REQUIRED
    object: ObjectId = _REQUIRED
    target: ObjectId | None = None
    time: datetime = field(default_factory=_now)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [name for name in ("actor", "verb", "object") if getattr(self, name) is _REQUIRED]
        if missing:
            raise ActivityError(
                f"Activity is missing required field(s) {', '.join(missing)}; build it as "
                "Activity(actor=user_id, verb='pin', object=object_id)."
            )
        check_object_id("Activity.actor", self.actor)
        check_object_id("Activity.object", self.object)
        if self.target is not None:
            check_object_id("Activity.target", self.target)
        if not isinstance(self.verb, str) or not self.verb or len(self.verb) > 64:
            raise ActivityError(
                f"Activity.verb must be a non-empty str of at most 64 characters, "
                f"got {_describe(self.verb)}; e.g. verb='pin'."
            )
        if not isinstance(self.time, datetime):
            raise ActivityError(
                f"Activity.time must be a timezone-aware datetime, got {_describe(self.time)}."
            )
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ActivityError(
                f"Activity.time must be timezone-aware, got naive {self.time!r}; "
                "use datetime.now(timezone.utc) or attach a tzinfo."
            )
        key = sort_key_of(self.time)
        if not 0 <= key < MAX_SORT_KEY:
            raise ActivityError(
                f"Activity.time must lie between 1970-01-01 and 2255-06-05 UTC so its sort "
                f"key is exact in a Redis score, got {self.time.isoformat()}."
            )
        if not isinstance(self.extra, Mapping):
            raise ActivityError(f"Activity.extra must be a dict, got {_describe(self.extra)}.")
        _check_json("Activity.extra", self.extra, 0)

    @property
    def sort_key(self) -> int:
        """Microseconds since the epoch; the Redis score of this activity in every feed."""
        return sort_key_of(self.time)

    @property
    def id(self) -> str:
        """A stable, time-sortable id: the sort key, then a digest of the fields."""
        identity = json.dumps([self.actor, self.verb, self.object, self.target])
        digest = hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()[:_DIGEST_CHARS]
        return f"{self.sort_key:0{_SORT_KEY_DIGITS}d}{digest}"


def encode_activity(activity: Activity) -> str:
    """Encode ``activity`` as compact, versioned JSON."""
    body = {
        "v": CODEC_VERSION,
        "id": activity.id,
        "actor": activity.actor,
        "verb": activity.verb,
        "object": activity.object,
        "target": activity.target,
        "time": activity.time.isoformat(),
        "extra": dict(activity.extra),
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def decode_activity(text: str | bytes) -> Activity:
    """Decode what :func:`encode_activity` wrote; raise :class:`PayloadError` if it is not."""
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise PayloadError(f"activity body is not JSON: {e}") from None
    except RecursionError:
        raise PayloadError("activity body is JSON nested too deeply to read.") from None
    if not isinstance(body, dict):
        raise PayloadError(f"activity body must be a JSON object, got {type(body).__name__}.")
    if body.get("v") != CODEC_VERSION:
        raise PayloadError(
            f"activity body has version {body.get('v')!r}, this feedfan reads version "
            f"{CODEC_VERSION}; upgrade feedfan on this side."
        )
    missing = {"actor", "verb", "object", "time"} - body.keys()
    if missing:
        raise PayloadError(f"activity body lacks field(s) {sorted(missing)}.")
    try:
        when = datetime.fromisoformat(body["time"])
        activity = Activity(
            actor=body["actor"],
            verb=body["verb"],
            object=body["object"],
            target=body.get("target"),
            time=when,
            extra=body.get("extra") or {},
        )
    except (ActivityError, TypeError, ValueError) as e:
        raise PayloadError(f"activity body is invalid: {e}") from None
    if "id" in body and body["id"] != activity.id:
        raise PayloadError(
            f"activity body id {body['id']!r} does not match its fields (expected {activity.id!r})."
        )
    return activity
