"""Planning a fanout (followers into chunks) and running one chunk (one batched write)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from feedfan.activity import ObjectId, check_object_ids
from feedfan.errors import ActivityError, PayloadError
from feedfan.feeds import Feed
from feedfan.priority import FanoutPriority
from feedfan.storage.base import Storage, WriteBatch
from feedfan.task import ChunkTask, Operation

__all__ = [
    "PLAN_CHUNK",
    "FanoutReceipt",
    "check_registered",
    "group_followers",
    "plan_chunks",
    "plan_group",
    "run_chunk",
]

_PRIORITY_ORDER = (FanoutPriority.HIGH, FanoutPriority.LOW)

PLAN_CHUNK = "plan"
"""The chunk key under which a fanout's planning is counted as failed, when it fails."""


@dataclass(frozen=True)
class FanoutReceipt:
    """What ``add_user_activity`` and friends hand back.

    ``chunks`` tasks were accepted by the queue (``high_chunks`` + ``low_chunks``)
    for ``followers`` followers; with background planning only the planning
    task was sent, and ``planned_in_background`` is true. Pass ``fanout_id`` to
    ``manager.fanout_status`` to follow progress.
    """

    fanout_id: str
    activity_ids: tuple[str, ...]
    chunks: int
    high_chunks: int
    low_chunks: int
    followers: int
    planned_in_background: bool = False


def group_followers(result: object) -> dict[FanoutPriority, Iterable[ObjectId]]:
    """Check what ``get_user_follower_ids`` returned and key it by :class:`FanoutPriority`.

    The id iterables are passed through untouched, so a generator or a database
    cursor is streamed, never copied whole into memory.
    """
    if not isinstance(result, Mapping):
        raise ActivityError(
            "get_user_follower_ids() must return {FanoutPriority.HIGH: ids, "
            f"FanoutPriority.LOW: ids}}, got {type(result).__name__}."
        )
    groups: dict[FanoutPriority, Iterable[ObjectId]] = {}
    for key, ids in result.items():
        try:
            priority = FanoutPriority.parse(key)
        except ValueError:
            raise ActivityError(
                f"get_user_follower_ids() returned the key {key!r}; use FanoutPriority.HIGH "
                "or FanoutPriority.LOW."
            ) from None
        if ids is None:
            continue
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise ActivityError(
                f"get_user_follower_ids()[{priority.name}] must be an iterable of ids, "
                f"got {type(ids).__name__}."
            )
        groups[priority] = ids
    return groups


def plan_chunks(
    *,
    op: Operation,
    feeds: Sequence[str],
    entries: Sequence[tuple[str, int]],
    followers: Mapping[FanoutPriority, Iterable[ObjectId]],
    chunk_size: int,
    fanout_id: str,
) -> Iterator[ChunkTask]:
    """Cut followers into chunk tasks of ``chunk_size``, HIGH before LOW.

    Ids are read lazily, one chunk at a time. Chunk ids are deterministic:
    ``(fanout_id, priority, index)``, so planning the same fanout twice gives
    the same tasks.
    """
    for priority in _PRIORITY_ORDER:
        yield from plan_group(
            op=op,
            feeds=feeds,
            entries=entries,
            priority=priority,
            followers=followers.get(priority, ()),
            chunk_size=chunk_size,
            fanout_id=fanout_id,
        )


def plan_group(
    *,
    op: Operation,
    feeds: Sequence[str],
    entries: Sequence[tuple[str, int]],
    priority: FanoutPriority,
    followers: Iterable[ObjectId],
    chunk_size: int,
    fanout_id: str,
    first_index: int = 0,
) -> Iterator[ChunkTask]:
    """Cut one priority group into chunk tasks, numbered from ``first_index``.

    ``followers`` starts at follower ``first_index x chunk_size`` of the group
    when a planning page resumes it (see :meth:`Manager.plan_in_worker`).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    feed_names = tuple(feeds)
    frozen_entries = tuple(entries)
    ids = iter(followers)
    index = first_index
    while True:
        batch = check_object_ids(
            f"follower id of priority {priority.name}", islice(ids, chunk_size)
        )
        if not batch:
            break
        yield ChunkTask(
            op=op,
            feeds=feed_names,
            entries=frozen_entries,
            followers=batch,
            fanout_id=fanout_id,
            priority=priority,
            index=index,
        )
        index += 1


def check_registered(names: Sequence[str], feed_classes: Mapping[str, type[Feed]]) -> None:
    """Raise :class:`PayloadError` unless every feed in ``names`` is registered."""
    unknown = [name for name in names if name not in feed_classes]
    if unknown:
        raise PayloadError(
            f"task names feed(s) {unknown} not registered with this worker's manager "
            f"(registered: {sorted(feed_classes)}); start the worker with the right --app."
        )


def run_chunk(task: ChunkTask, *, storage: Storage, feed_classes: Mapping[str, type[Feed]]) -> int:
    """Write one chunk as one batched write and record it as done; return feed writes.

    Every feed the task names must be registered (``feed_classes`` maps
    names to classes); a task naming any other feed is refused whole.
    Running the same chunk twice leaves every feed as running it once.
    """
    check_registered(task.feeds, feed_classes)
    targets: list[tuple[str, int]] = []
    for name in task.feeds:
        max_length = feed_classes[name].max_length
        targets.extend((storage.feed_key(name, user), max_length) for user in task.followers)
    storage.apply(
        WriteBatch(
            op=task.op,
            feeds=targets,
            entries=task.entries,
            chunk=(task.fanout_id, task.chunk_key),
        )
    )
    return len(targets)


def describe_fanout(op: str, user_id: ObjectId, activity_ids: Sequence[str]) -> dict[str, Any]:
    """The descriptive fields stored with a fanout's progress."""
    return {"op": op, "user": str(user_id), "activities": ",".join(activity_ids[:5])}
