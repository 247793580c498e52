"""The wire format of fanout tasks: small, versioned JSON, checked field by field.

A chunk task tells a worker to add activities to (or remove them from) the
feeds of a list of followers::

    {"v": 1, "kind": "chunk", "op": "add", "feeds": ["timeline"],
     "acts": [["1732390000000000a1b2c3d4e5", 1732390000000000]],
     "to": [17, 42, 99], "fanout": "f3c0…", "prio": "high", "idx": 0}

A plan task (background planning) tells a worker to read a user's followers
itself and enqueue the chunk tasks. Nothing else is ever accepted: no pickled
objects, no class paths, no code. Feeds are named, and a worker writes only to
feeds its own manager registered.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from feedfan.activity import (
    ACTIVITY_ID_PATTERN,
    CODEC_VERSION,
    MAX_SORT_KEY,
    ObjectId,
    check_object_id,
    check_object_ids,
)
from feedfan.errors import PayloadError
from feedfan.feeds import FEED_NAME_PATTERN
from feedfan.priority import FanoutPriority

__all__ = [
    "FANOUT_ID_PATTERN",
    "ChunkTask",
    "Operation",
    "PlanTask",
    "Task",
    "decode_task",
    "make_fanout_id",
]

Operation = Literal["add", "remove"]
FANOUT_ID_PATTERN = re.compile(r"^[0-9a-f]{24}$")
_MAX_FEEDS = 64
_MAX_ENTRIES = 100_000
_MAX_FOLLOWERS = 100_000


def make_fanout_id(
    op: str, user_id: ObjectId, activity_ids: Sequence[str], feeds: Sequence[str]
) -> str:
    """Return the deterministic id of a fanout.

    The same operation on the same activities by the same user always gets the
    same id, so a retried ``add_user_activity`` produces the same chunk ids and
    its progress is counted once.
    """
    identity = json.dumps([op, user_id, sorted(activity_ids), sorted(feeds)])
    return hashlib.blake2b(identity.encode(), digest_size=12).hexdigest()


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ChunkTask:
    """One batched write: ``entries`` added to or removed from ``feeds`` of ``followers``."""

    op: Operation
    feeds: tuple[str, ...]
    entries: tuple[tuple[str, int], ...]
    followers: tuple[ObjectId, ...]
    fanout_id: str
    priority: FanoutPriority
    index: int

    @property
    def chunk_key(self) -> str:
        """The chunk's name within its fanout: ``"high:3"``."""
        return f"{self.priority.value}:{self.index}"

    @property
    def task_id(self) -> str:
        """Deterministic task id: ``(fanout_id, priority, index)`` joined."""
        return f"feedfan-{self.fanout_id}-{self.priority.value}-{self.index}"

    def to_json(self) -> str:
        """Encode for the wire."""
        return _dumps(
            {
                "v": CODEC_VERSION,
                "kind": "chunk",
                "op": self.op,
                "feeds": list(self.feeds),
                "acts": [list(entry) for entry in self.entries],
                "to": list(self.followers),
                "fanout": self.fanout_id,
                "prio": self.priority.value,
                "idx": self.index,
            }
        )


@dataclass(frozen=True)
class PlanTask:
    """Read ``user_id``'s followers in a worker and enqueue the chunk tasks.

    A planning task plans one page: the followers of its own ``priority``
    group from chunk ``start`` on, at most ``planning_page`` chunk tasks (the
    worker's setting), sent behind the task of the next page, or of the LOW
    group's first page once the HIGH group is cut; each goes to the queue of
    the group it plans. ``before`` counts the chunk tasks of the HIGH group
    when the LOW group is planned, so the last page can record the fanout's
    total.
    """

    op: Operation
    feeds: tuple[str, ...]
    entries: tuple[tuple[str, int], ...]
    user_id: ObjectId
    fanout_id: str
    priority: FanoutPriority
    chunk_size: int = 100
    """Followers per chunk task, as the producer's ``fanout_chunk_size`` said."""
    start: int = 0
    """Index of the first chunk of the ``priority`` group this page plans."""
    before: int = 0
    """Chunk tasks planned for the groups before this one (HIGH, when planning LOW)."""
    paged: bool = True
    """False for a message without ``from`` and ``base`` (feedfan before planning pages):
    it plans every group in one task."""

    @property
    def task_id(self) -> str:
        """Deterministic task id of the planning task (one per page)."""
        if not self.paged:
            return f"feedfan-{self.fanout_id}-plan"
        return f"feedfan-{self.fanout_id}-plan-{self.priority.value}-{self.start}"

    def to_json(self) -> str:
        """Encode for the wire."""
        body: dict[str, Any] = {
            "v": CODEC_VERSION,
            "kind": "plan",
            "op": self.op,
            "feeds": list(self.feeds),
            "acts": [list(entry) for entry in self.entries],
            "user": self.user_id,
            "fanout": self.fanout_id,
            "prio": self.priority.value,
            "size": self.chunk_size,
        }
        if self.paged:
            body["from"] = self.start
            body["base"] = self.before
        return _dumps(body)


Task = Union[ChunkTask, PlanTask]  # noqa: UP007 - a runtime alias, usable on 3.10

_CHUNK_KEYS = frozenset({"v", "kind", "op", "feeds", "acts", "to", "fanout", "prio", "idx"})
_PLAN_KEYS = frozenset({"v", "kind", "op", "feeds", "acts", "user", "fanout", "prio", "size"})
_PAGED_PLAN_KEYS = _PLAN_KEYS | {"from", "base"}


def _list(body: dict[str, Any], key: str, limit: int) -> list[Any]:
    value = body[key]
    if not isinstance(value, list) or not value:
        raise PayloadError(f"task field {key!r} must be a non-empty list, got {_short(value)}.")
    if len(value) > limit:
        raise PayloadError(
            f"task field {key!r} has {len(value):,} items; at most {limit:,} are allowed."
        )
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _feeds(body: dict[str, Any]) -> tuple[str, ...]:
    feeds = _list(body, "feeds", _MAX_FEEDS)
    for name in feeds:
        if not isinstance(name, str) or not FEED_NAME_PATTERN.match(name):
            raise PayloadError(
                f"task field 'feeds' holds {_short(name)}, which is not a feed name."
            )
    if len(set(feeds)) != len(feeds):
        raise PayloadError("task field 'feeds' names a feed twice.")
    return tuple(feeds)


def _entries(body: dict[str, Any], op: str) -> tuple[tuple[str, int], ...]:
    entries = []
    for entry in _list(body, "acts", _MAX_ENTRIES):
        if not (isinstance(entry, list) and len(entry) == 2):
            raise PayloadError(
                f"task field 'acts' holds {_short(entry)}; expected [activity_id, sort_key]."
            )
        activity_id, score = entry
        if not isinstance(activity_id, str) or not ACTIVITY_ID_PATTERN.match(activity_id):
            raise PayloadError(
                f"task field 'acts' holds id {_short(activity_id)}, which is not an activity id."
            )
        if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score < MAX_SORT_KEY:
            raise PayloadError(
                f"task field 'acts' holds sort key {_short(score)}; expected an int below 2**53."
            )
        if int(activity_id[:16]) != score:
            raise PayloadError(
                f"task field 'acts' pairs id {activity_id!r} with sort key {score}, not its own."
            )
        entries.append((activity_id, score))
    return tuple(entries)


def _count(body: dict[str, Any], key: str, what: str) -> int:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise PayloadError(f"{what} {_short(value)} must be an int from 0 to 2**31.")
    return value


def decode_task(raw: str | bytes, *, max_bytes: int = 1_048_576) -> Task:
    """Decode and check a task from the wire; raise :class:`PayloadError` saying why not.

    Only JSON is read: nothing in a payload can name code to run.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        if len(raw) > max_bytes:
            raise PayloadError(f"task is {len(raw):,} bytes; max_task_bytes is {max_bytes:,}.")
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise PayloadError(f"task is not UTF-8 text (is it pickled?): {e}.") from None
    elif isinstance(raw, str):
        text = raw
        if len(text) > max_bytes:
            raise PayloadError(
                f"task is {len(text):,} characters; max_task_bytes is {max_bytes:,}."
            )
    else:
        raise PayloadError(f"task must be JSON text, got {type(raw).__name__}.")
    try:
        body = json.loads(text)
    except ValueError as e:
        raise PayloadError(f"task is not JSON: {e}.") from None
    except RecursionError:
        raise PayloadError("task is JSON nested too deeply to read; no task is.") from None
    if not isinstance(body, dict):
        raise PayloadError(f"task must be a JSON object, got {type(body).__name__}.")
    version = body.get("v")
    if version != CODEC_VERSION:
        raise PayloadError(
            f"task has version {_short(version)}; this worker reads version {CODEC_VERSION}. "
            "Run the same feedfan version on producers and workers."
        )
    kind = body.get("kind")
    expected = (
        {"chunk": _CHUNK_KEYS, "plan": _PLAN_KEYS}.get(kind) if isinstance(kind, str) else None
    )
    if expected is None:
        raise PayloadError(f"task kind {_short(kind)} is unknown; expected 'chunk' or 'plan'.")
    keys = set(body)
    if kind == "plan" and keys & {"from", "base"}:
        expected = _PAGED_PLAN_KEYS  # a planning page; neither key: an older whole-fanout plan
    if keys != expected:
        problems = []
        if expected - keys:
            problems.append(f"lacks {sorted(expected - keys)}")
        if keys - expected:
            problems.append(f"has unknown {sorted(keys - expected)}")
        raise PayloadError(f"{kind} task {' and '.join(problems)}.")
    op = body["op"]
    if op not in ("add", "remove"):
        raise PayloadError(f"task operation {_short(op)} is unknown; expected 'add' or 'remove'.")
    fanout_id = body["fanout"]
    if not isinstance(fanout_id, str) or not FANOUT_ID_PATTERN.match(fanout_id):
        raise PayloadError(f"task fanout id {_short(fanout_id)} is not 24 hex digits.")
    try:
        priority = FanoutPriority.parse(body["prio"])
    except ValueError as e:
        raise PayloadError(f"task {e}") from None
    feeds = _feeds(body)
    entries = _entries(body, op)
    if kind == "plan":
        user_id = check_object_id("plan task field 'user'", body["user"], error=PayloadError)
        size = body["size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= _MAX_FOLLOWERS:
            raise PayloadError(
                f"plan task chunk size {_short(size)} must be an int from 1 to {_MAX_FOLLOWERS:,}."
            )
        if keys == _PLAN_KEYS:
            return PlanTask(op, feeds, entries, user_id, fanout_id, priority, size, paged=False)
        start, before = (_count(body, key, f"plan task field {key!r}") for key in ("from", "base"))
        return PlanTask(op, feeds, entries, user_id, fanout_id, priority, size, start, before)
    index = _count(body, "idx", "task index")
    followers = check_object_ids(
        "task field 'to' item", _list(body, "to", _MAX_FOLLOWERS), error=PayloadError
    )
    return ChunkTask(op, feeds, entries, followers, fanout_id, priority, index)
