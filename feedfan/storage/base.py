"""The storage contract: timelines, activity bodies and fanout progress."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from feedfan.activity import Activity, ObjectId

__all__ = ["FanoutStatus", "RejectedMessage", "Storage", "WriteBatch"]

Operation = Literal["add", "remove"]


@dataclass(frozen=True)
class WriteBatch:
    """Everything one chunk writes, applied in one round trip.

    ``op`` adds ``entries`` (``(activity_id, sort_key)``) to, or removes them
    from, every feed in ``feeds`` (``(key, max_length)``); after an add each
    feed is trimmed to its ``max_length``. ``chunk`` names the chunk as
    ``(fanout_id, chunk_key)`` so its completion is recorded in the same round
    trip. Applying a batch twice leaves storage as applying it once.
    """

    op: Operation
    feeds: Sequence[tuple[str, int]]
    entries: Sequence[tuple[str, int]]
    chunk: tuple[str, str] | None = None


@dataclass(frozen=True)
class FanoutStatus:
    """How far one fanout has got, counted in chunks.

    ``total`` is ``None`` while the planner is still cutting chunks (it is
    known once planning ends); ``pending`` is then a lower bound.
    """

    fanout_id: str
    total: int | None
    done: int
    failed: int
    meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        """Chunks neither done nor failed (of those planned so far)."""
        planned = self.total if self.total is not None else self.done + self.failed
        return max(planned - self.done - self.failed, 0)

    @property
    def complete(self) -> bool:
        """Every planned chunk is done."""
        return self.total is not None and self.done >= self.total

    @property
    def settled(self) -> bool:
        """Every planned chunk is done or failed; nothing more will happen by itself."""
        return self.total is not None and self.done + self.failed >= self.total


@dataclass(frozen=True)
class RejectedMessage:
    """A message a worker refused, kept as it arrived, with the reason."""

    queue: str
    reason: str
    body: str
    at: float


class Storage(ABC):
    """Where feeds, activity bodies and fanout progress live.

    Feeds are sorted sets (member: activity id, score: sort key); bodies are
    stored once, however many feeds hold the activity. Every method is safe to
    call from several threads and, for shared storages, several processes.
    """

    shared: bool = True
    """Whether other processes (workers) see what this storage writes."""

    def __init__(self, *, key_prefix: str = "feedfan:") -> None:
        self.key_prefix = key_prefix

    def feed_key(self, feed_name: str, user_id: ObjectId) -> str:
        """The key of ``user_id``'s feed called ``feed_name``."""
        return f"{self.key_prefix}feed:{feed_name}:{user_id}"

    # Activity bodies ---------------------------------------------------

    @abstractmethod
    def store_activities(self, activities: Iterable[Activity]) -> None:
        """Store the bodies of ``activities``, once each (idempotent)."""

    @abstractmethod
    def get_activities(self, activity_ids: Sequence[str]) -> dict[str, Activity]:
        """Return the stored bodies of those ids that have one."""

    # Feeds ---------------------------------------------------------------

    @abstractmethod
    def apply(self, batch: WriteBatch) -> None:
        """Apply ``batch`` in one round trip; see :class:`WriteBatch`."""

    @abstractmethod
    def read_feed(self, key: str, *, offset: int, limit: int) -> list[tuple[str, int]]:
        """Return up to ``limit`` ``(activity_id, sort_key)`` pairs, newest first."""

    @abstractmethod
    def feed_length(self, key: str) -> int:
        """How many entries the feed at ``key`` holds."""

    # Fanout progress -------------------------------------------------------

    @abstractmethod
    def begin_fanout(self, fanout_id: str, meta: Mapping[str, str]) -> None:
        """Record that a fanout started planning, with a few descriptive fields."""

    def start_fanout(
        self,
        fanout_id: str,
        meta: Mapping[str, str],
        *,
        activities: Iterable[Activity] = (),
        writes: Iterable[WriteBatch] = (),
        clear_failure: str | None = None,
    ) -> None:
        """All a producer writes before it sends a fanout's tasks, in one step.

        Stores ``activities``, applies ``writes`` (the author's own feed),
        records the fanout as begun (:meth:`begin_fanout`) and, with
        ``clear_failure``, counts that failed chunk as pending again
        (:meth:`clear_chunk_failure`). Each part is idempotent, so a step
        that fails partway is completed by running it again. This default
        makes the calls in turn and stops at the first that fails;
        :class:`~feedfan.storage.redis.RedisStorage` sends them in one round
        trip, where the parts after a failed one are still applied (the
        error is raised all the same).
        """
        self.store_activities(activities)
        for batch in writes:
            self.apply(batch)
        self.begin_fanout(fanout_id, meta)
        if clear_failure is not None:
            self.clear_chunk_failure(fanout_id, clear_failure)

    @abstractmethod
    def end_planning(self, fanout_id: str, total_chunks: int) -> None:
        """Record how many chunks the fanout has, now that planning is over."""

    @abstractmethod
    def reopen_planning(self, fanout_id: str, failed_key: str) -> bool:
        """Take back a recorded total and the planning failure kept under ``failed_key``.

        Background planning calls this before each page, so that a page run
        again after a failed planning recorded a total does not leave the
        fanout settled before its last page. Returns ``False``, changing
        nothing, when every chunk is done and no planning failure is kept: the
        fanout is complete. A total written with a planning failure is never
        final. Atomic: a chunk finishing meanwhile cannot make it look open.
        """

    @abstractmethod
    def mark_chunk_failed(self, fanout_id: str, chunk_key: str, reason: str) -> None:
        """Record that a chunk failed for good (it was dead-lettered)."""

    @abstractmethod
    def clear_chunk_failure(self, fanout_id: str, chunk_key: str) -> None:
        """Count a failed chunk as pending again (it is being replayed)."""

    @abstractmethod
    def fanout_status(self, fanout_id: str) -> FanoutStatus | None:
        """Return the progress of a fanout, or ``None`` if none is recorded."""

    @abstractmethod
    def recent_fanouts(self, *, limit: int = 20) -> list[str]:
        """Return the ids of the most recently started fanouts, newest first."""

    # Rejected messages -----------------------------------------------------

    @abstractmethod
    def keep_rejected(self, queue: str, body: str, reason: str) -> None:
        """Keep a message a worker refused, for a person to inspect or replay."""

    @abstractmethod
    def rejected(self, *, limit: int = 100) -> list[RejectedMessage]:
        """Return kept rejected messages, newest first."""

    @abstractmethod
    def pop_rejected(self) -> RejectedMessage | None:
        """Remove and return the oldest kept rejected message (for replay)."""

    # Housekeeping ----------------------------------------------------------

    @abstractmethod
    def clear(self) -> int:
        """Delete everything under this storage's key prefix; return the count."""

    def ping(self) -> None:  # noqa: B027 - memory is always reachable
        """Raise :class:`~feedfan.errors.StorageError` if the storage is unreachable."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections."""
