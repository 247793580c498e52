"""Feed classes: what a feed is called, how long it may grow, and reading it.

Subclass :class:`Feed` to declare a feed; its ``name`` is how tasks on the wire
refer to it, so a worker writes only to feeds its own manager registered::

    class PinFeed(Feed):
        name = "pins"
        max_length = 500
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar, overload

from feedfan.activity import Activity, ObjectId
from feedfan.errors import ConfigurationError

if TYPE_CHECKING:
    from feedfan.storage.base import Storage

__all__ = ["FEED_NAME_PATTERN", "Feed", "TimelineFeed", "UserFeed"]

FEED_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
"""Feed names: lower-case letters, digits, ``_ . -``; at most 64 characters."""


def _check_feed_class(cls: type[Feed]) -> None:
    if not isinstance(cls.name, str) or not FEED_NAME_PATTERN.match(cls.name):
        raise ConfigurationError(
            f"{cls.__qualname__}.name must match {FEED_NAME_PATTERN.pattern} "
            f"(lower-case, at most 64 characters), got {cls.name!r}."
        )
    length = cls.max_length
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= 1_000_000:
        raise ConfigurationError(
            f"{cls.__qualname__}.max_length must be an int from 1 to 1,000,000, got {length!r}."
        )


class Feed:
    """One user's feed of one kind, newest activity first.

    Class attributes declare the kind: ``name`` (how tasks refer to it) and
    ``max_length`` (older entries are trimmed away on every write). An instance
    is bound to a user and a storage and reads the feed a page at a time.
    """

    name: ClassVar[str] = "timeline"
    """The registered name, unique within a manager; written into tasks."""

    max_length: ClassVar[int] = 1000
    """How many entries the feed keeps; older ones are trimmed on write."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        _check_feed_class(cls)

    def __init__(self, user_id: ObjectId, *, storage: Storage) -> None:
        self.user_id = user_id
        self.storage = storage

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} of user {self.user_id!r}>"

    @property
    def key(self) -> str:
        """The storage key of this feed (key prefix included)."""
        return self.storage.feed_key(self.name, self.user_id)

    def count(self) -> int:
        """How many entries the feed holds now."""
        return self.storage.feed_length(self.key)

    def __len__(self) -> int:
        return self.count()

    def entries(self, *, offset: int = 0, limit: int = 25) -> list[tuple[str, int]]:
        """Return up to ``limit`` ``(activity_id, sort_key)`` pairs, newest first."""
        if offset < 0 or limit < 0:
            raise ValueError(f"offset and limit must be >= 0, got offset={offset} limit={limit}.")
        return self.storage.read_feed(self.key, offset=offset, limit=limit)

    def read(self, *, offset: int = 0, limit: int = 25) -> list[Activity]:
        """Return up to ``limit`` activities, newest first, skipping ``offset``.

        An entry whose activity body is gone (removed meanwhile) is left out.
        """
        ids = [activity_id for activity_id, _ in self.entries(offset=offset, limit=limit)]
        found = self.storage.get_activities(ids)
        return [found[activity_id] for activity_id in ids if activity_id in found]

    def pages(self, *, per_page: int = 25) -> Iterator[list[Activity]]:
        """Yield the whole feed a page at a time, newest first."""
        if per_page < 1:
            raise ValueError(f"per_page must be >= 1, got {per_page}.")
        offset = 0
        while True:
            entries = self.entries(offset=offset, limit=per_page)
            if not entries:
                return
            found = self.storage.get_activities([activity_id for activity_id, _ in entries])
            yield [found[activity_id] for activity_id, _ in entries if activity_id in found]
            if len(entries) < per_page:
                return
            offset += per_page

    @overload
    def __getitem__(self, index: int) -> Activity: ...
    @overload
    def __getitem__(self, index: slice) -> list[Activity]: ...
    def __getitem__(self, index: int | slice) -> Activity | list[Activity]:
        """``feed[:10]`` reads the ten newest activities, as in Stream Framework."""
        if isinstance(index, int):
            items = self.read(offset=index, limit=1) if index >= 0 else []
            if not items:
                raise IndexError(f"feed index {index} out of range")
            return items[0]
        start, stop, step = index.start or 0, index.stop, index.step
        if start < 0 or (stop is not None and stop < 0) or step not in (None, 1):
            raise ValueError("feeds support slices with non-negative bounds and no step")
        limit = self.storage.feed_length(self.key) if stop is None else max(stop - start, 0)
        return self.read(offset=start, limit=limit)


class UserFeed(Feed):
    """The author's own activities; what a new follower copies from."""

    name = "user"
    max_length = 1000


class TimelineFeed(Feed):
    """The activities of everyone a user follows; what fanout writes to."""

    name = "timeline"
    max_length = 1000
