"""The manager: Stream Framework's API, with the job queue as a plug.

Subclass it as in Stream Framework and tell it who follows whom::

    class MyStreamManager(Manager):
        feed_classes = {"timeline": TimelineFeed}
        user_feed_class = UserFeed

        def get_user_follower_ids(self, user_id):
            return {
                FanoutPriority.HIGH: get_follower_ids(user_id, active=True),
                FanoutPriority.LOW: get_follower_ids(user_id, active=False),
            }

Which job queue runs the fanout is configuration (``dispatcher``), not code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any, ClassVar, cast

from feedfan.activity import (
    ACTIVITY_ID_PATTERN,
    Activity,
    ObjectId,
    check_object_id,
    check_object_ids,
)
from feedfan.config import Settings, load_settings
from feedfan.dispatch import TaskDispatcher, create_dispatcher
from feedfan.errors import (
    ActivityError,
    ConfigurationError,
    DispatchError,
    FeedfanError,
    LimitExceededError,
    PayloadError,
)
from feedfan.fanout import (
    PLAN_CHUNK,
    FanoutReceipt,
    describe_fanout,
    group_followers,
    plan_chunks,
    plan_group,
    run_chunk,
)
from feedfan.feeds import Feed, TimelineFeed, UserFeed
from feedfan.priority import FanoutPriority
from feedfan.runner import TaskRunner
from feedfan.storage.base import FanoutStatus, Storage, WriteBatch
from feedfan.storage.memory import MemoryStorage
from feedfan.storage.redis import RedisStorage
from feedfan.task import ChunkTask, Operation, PlanTask, make_fanout_id

logger = logging.getLogger(__name__)

__all__ = ["Manager"]


def _entry_bytes(entry: tuple[str, int]) -> int:
    """Encoded bytes of one ``[activity_id, sort_key]`` entry in a task, with its comma."""
    return len(json.dumps(list(entry), separators=(",", ":")).encode()) + 1


_FOLLOW_ENTRIES_PER_TASK = 1000
_IN_MEMORY = (list, tuple, set, frozenset, range)
"""Follower groups whose length costs nothing to take."""


_STDLIB_SEQUENCES = frozenset({"builtins", "collections", "array"})


def _pageable(ids: Iterable[ObjectId]) -> bool:
    """Whether background planning cuts a follower group a page per task.

    Each page calls ``get_user_follower_ids`` again and slices the group, so
    only a ``range`` or a sequence class of your own (whose slices read just
    that slice) is paged. A list, tuple or other standard-library sequence was
    built whole for that call, a generator or a cursor cannot be resumed: one
    task cuts the whole group.
    """
    if isinstance(ids, range):
        return True
    # The standard library's sequences (list, tuple, deque, UserList, array) hold every id.
    return isinstance(ids, Sequence) and type(ids).__module__ not in _STDLIB_SEQUENCES


class _Lookup:
    """``get_user_follower_ids`` of one user, called at most once and only when needed.

    Counting, choosing where planning starts and planning inline share it, so
    a producer whose follower lookup is a query runs it once per fanout. What
    it holds is never iterated before planning: counting takes lengths of
    groups in memory, and a group that is not is left to planning.
    """

    def __init__(self, manager: Manager, user_id: ObjectId) -> None:
        self._manager = manager
        self._user_id = user_id
        self._groups: dict[FanoutPriority, Iterable[ObjectId]] | None = None

    def groups(self) -> dict[FanoutPriority, Iterable[ObjectId]]:
        if self._groups is None:
            found = self._manager.get_user_follower_ids(self._user_id)
            self._groups = group_followers(found)
        return self._groups


def _count_in_memory(groups: Mapping[FanoutPriority, Iterable[ObjectId]]) -> int | None:
    """How many followers ``groups`` hold, if every group is in memory; else ``None``."""
    total = 0
    for ids in groups.values():
        if not isinstance(ids, _IN_MEMORY):
            return None
        total += len(ids)
    return total


def _may_hold_ids(ids: Iterable[ObjectId] | None) -> bool:
    """Whether a follower group may hold ids: not absent, nor known empty without reading it.

    A sequence's length is cheap; a database query's (a Django ``QuerySet`` is
    no :class:`~collections.abc.Sequence`) would load every row, so it is not asked.
    """
    if ids is None:
        return False
    return not (isinstance(ids, (*_IN_MEMORY, Sequence)) and len(ids) == 0)


def _build_storage(settings: Settings) -> Storage:
    if settings.effective_storage == "memory":
        return MemoryStorage(key_prefix=settings.key_prefix)
    return RedisStorage(
        url=settings.effective_redis_url,
        key_prefix=settings.key_prefix,
        write_mode="pipeline" if settings.write_mode == "pipeline" else "script",
        status_ttl=settings.status_ttl,
    )


class Manager:
    """Adds activities to their author's feed and fans them out to followers.

    Class attributes are the Stream Framework ones: ``feed_classes`` (the
    feeds fanout writes, by name), ``user_feed_class`` (the author's own
    feed) and ``fanout_chunk_size`` (followers per task; ``None`` takes the
    ``fanout_chunk_size`` setting, 100 by default). ``bound_dispatcher``
    fixes the job queue in code, as the adapters' managers (``RQManager`` …) do;
    leave it ``None`` to take it from configuration.

    Everything else comes from :func:`~feedfan.config.load_settings`, or from
    ``settings=``; keyword ``overrides`` (any setting, e.g. ``dispatcher="rq"``)
    win over both. ``dispatcher`` may also be a ready :class:`TaskDispatcher`.
    """

    feed_classes: ClassVar[Mapping[str, type[Feed]]] = {"timeline": TimelineFeed}
    user_feed_class: ClassVar[type[Feed]] = UserFeed
    fanout_chunk_size: ClassVar[int | None] = None
    bound_dispatcher: ClassVar[str | None] = None

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        dispatcher: TaskDispatcher | str | None = None,
        storage: Storage | None = None,
        **overrides: Any,
    ) -> None:
        cls = type(self)
        if isinstance(dispatcher, str):
            overrides["dispatcher"] = dispatcher
            dispatcher = None
        if settings is None:
            settings = load_settings()
        if (
            cls.bound_dispatcher is not None
            and dispatcher is None
            and "dispatcher" not in overrides
        ):
            settings = settings.with_values(
                {"dispatcher": cls.bound_dispatcher}, source=f"{cls.__qualname__}.bound_dispatcher"
            )
        if cls.fanout_chunk_size is not None:
            settings = settings.with_values(
                {"fanout_chunk_size": cls.fanout_chunk_size},
                source=f"{cls.__qualname__}.fanout_chunk_size",
            )
        if overrides:
            settings = settings.replace(**overrides)
        self.settings = settings
        self.registered_feeds = self._register_feeds()
        self.storage = storage if storage is not None else _build_storage(settings)
        self.runner = TaskRunner(self)
        if dispatcher is None:
            dispatcher = self.make_dispatcher(settings)
        elif dispatcher.runner is None:
            dispatcher.runner = self.runner
        self.dispatcher = dispatcher
        if not self.storage.shared and not self.dispatcher.runs_in_process:
            raise ConfigurationError(
                f"dispatcher {self.dispatcher.name!r} runs chunks in other processes, which "
                "cannot see in-memory storage; set redis_url (FEEDFAN_REDIS_URL)."
            )

    def make_dispatcher(self, settings: Settings) -> TaskDispatcher:
        """Build the dispatcher; adapters' managers override this to pass their objects."""
        return create_dispatcher(settings, runner=self.runner)

    def _register_feeds(self) -> dict[str, type[Feed]]:
        registered: dict[str, type[Feed]] = {}
        for key, cls in dict(self.feed_classes).items():
            if not (isinstance(cls, type) and issubclass(cls, Feed)):
                raise ConfigurationError(
                    f"{type(self).__qualname__}.feed_classes[{key!r}] is {cls!r}; "
                    "expected a Feed subclass."
                )
            if cls.name in registered:
                raise ConfigurationError(
                    f"{type(self).__qualname__}.feed_classes registers the feed name {cls.name!r} "
                    "twice; give each Feed subclass its own name."
                )
            registered[cls.name] = cls
        if not registered:
            raise ConfigurationError(f"{type(self).__qualname__}.feed_classes is empty.")
        if self.user_feed_class.name in registered:
            raise ConfigurationError(
                f"{type(self).__qualname__}.user_feed_class is named "
                f"{self.user_feed_class.name!r}, "
                "like one of feed_classes; the author's feed needs a name of its own."
            )
        return registered

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the dispatcher's threads and connections and the storage's."""
        self.dispatcher.close()
        self.storage.close()

    # What users override ------------------------------------------------

    def get_user_follower_ids(
        self, user_id: ObjectId
    ) -> Mapping[FanoutPriority, Iterable[ObjectId]]:
        """Return the followers of ``user_id`` grouped by priority.

        Override it: ``{FanoutPriority.HIGH: ids, FanoutPriority.LOW: ids}``.
        The ids may be any iterable (a generator, a database cursor); they are
        read one chunk at a time.
        """
        raise NotImplementedError(
            f"{type(self).__qualname__}.get_user_follower_ids() is not implemented: subclass "
            "Manager and return {FanoutPriority.HIGH: ids, FanoutPriority.LOW: ids}."
        )

    def get_user_follower_count(self, user_id: ObjectId) -> int | None:
        """Return how many followers ``user_id`` has, if cheap to know (``planning="auto"``).

        The default counts groups that are already in memory (a list, tuple,
        set or range) and returns ``None`` otherwise, which plans inline:
        taking the length of a database query (a Django ``QuerySet``) would
        load every id into the producer just to count them. Override it with
        a cheap count (one ``COUNT`` query) to let ``auto`` decide.
        """
        return _count_in_memory(group_followers(self.get_user_follower_ids(user_id)))

    # Feeds ----------------------------------------------------------------

    def get_user_feed(self, user_id: ObjectId) -> Feed:
        """The author's own feed of ``user_id``."""
        return self.user_feed_class(check_object_id("user_id", user_id), storage=self.storage)

    def get_feeds(self, user_id: ObjectId) -> dict[str, Feed]:
        """Every fanout feed of ``user_id``, keyed as in ``feed_classes``."""
        check_object_id("user_id", user_id)
        return {key: cls(user_id, storage=self.storage) for key, cls in self.feed_classes.items()}

    def get_feed(self, user_id: ObjectId, name: str | None = None) -> Feed:
        """One fanout feed of ``user_id``: the one keyed ``name``, or the first."""
        feeds = self.get_feeds(user_id)
        if name is None:
            return next(iter(feeds.values()))
        if name not in feeds:
            raise KeyError(f"no feed {name!r}; feed_classes has {sorted(feeds)}")
        return feeds[name]

    # Activities -------------------------------------------------------------

    def _check_activity(self, activity: object) -> Activity:
        if not isinstance(activity, Activity):
            raise ActivityError(
                f"activity must be a feedfan.Activity, got {type(activity).__name__}; build one "
                "with Activity(actor=..., verb=..., object=...)."
            )
        size = len(
            json.dumps(dict(activity.extra), separators=(",", ":"), ensure_ascii=False).encode()
        )
        if size > self.settings.max_extra_bytes:
            raise LimitExceededError(
                f"Activity.extra is {size:,} bytes encoded, above max_extra_bytes="
                f"{self.settings.max_extra_bytes:,} (from "
                f"{self.settings.sources.get('max_extra_bytes', 'default')}); store large data "
                "elsewhere and put its id in extra, or raise the limit."
            )
        return activity

    def _user_feed_write(
        self, op: Operation, user_id: ObjectId, entry: tuple[str, int]
    ) -> WriteBatch:
        key = self.storage.feed_key(self.user_feed_class.name, user_id)
        return WriteBatch(op, [(key, self.user_feed_class.max_length)], [entry])

    def add_user_activity(self, user_id: ObjectId, activity: Activity) -> FanoutReceipt:
        """Store ``activity``, add it to ``user_id``'s own feed and fan it out.

        Returns once every chunk task is accepted by the queue (or, with
        background planning, once the planning task is); the receipt says how
        many. If the queue fails midway a :class:`~feedfan.errors.DispatchError`
        says how many chunks were accepted; calling again with the same
        activity completes the fanout without writing anything twice.
        """
        check_object_id("user_id", user_id)
        activity = self._check_activity(activity)
        entry = (activity.id, activity.sort_key)
        own = self._user_feed_write("add", user_id, entry)
        return self._fanout("add", user_id, [entry], activities=[activity], writes=[own])

    def remove_user_activity(self, user_id: ObjectId, activity: Activity | str) -> FanoutReceipt:
        """Remove an activity (or an activity id) from the author's feed and every follower's."""
        check_object_id("user_id", user_id)
        if isinstance(activity, str):
            if not ACTIVITY_ID_PATTERN.match(activity):
                raise ActivityError(f"activity id {activity!r} is not a feedfan activity id.")
            entry = (activity, int(activity[:16]))
        else:
            checked = self._check_activity(activity)
            entry = (checked.id, checked.sort_key)
        own = self._user_feed_write("remove", user_id, entry)
        return self._fanout("remove", user_id, [entry], writes=[own])

    # Fanout -------------------------------------------------------------------

    def _fanout(
        self,
        op: Operation,
        user_id: ObjectId,
        entries: Sequence[tuple[str, int]],
        *,
        activities: Sequence[Activity] = (),
        writes: Sequence[WriteBatch],
    ) -> FanoutReceipt:
        """Fan ``entries`` out; the activity bodies and ``writes`` (the author's own
        feed) go to storage with the fanout's start, in one step."""
        feeds = tuple(self.registered_feeds)
        activity_ids = [activity_id for activity_id, _ in entries]
        fanout_id = make_fanout_id(op, user_id, activity_ids, feeds)
        # One lookup of the followers in the producer, shared by counting and planning.
        lookup = _Lookup(self, user_id)
        first = self._background_start(user_id, lookup)
        if first is not None:
            plan = PlanTask(
                op,
                feeds,
                tuple(entries),
                user_id,
                fanout_id,
                first,
                self.settings.fanout_chunk_size,
            )
            self.storage.start_fanout(
                fanout_id,
                describe_fanout(op, user_id, activity_ids),
                activities=activities,
                writes=writes,
            )
            self.dispatcher.enqueue(plan)
            return FanoutReceipt(
                fanout_id, tuple(activity_ids), 0, 0, 0, 0, planned_in_background=True
            )
        return self._plan_and_send(
            op,
            user_id,
            feeds,
            entries,
            fanout_id,
            lookup=lookup,
            activities=activities,
            writes=writes,
        )

    def _background_start(self, user_id: ObjectId, lookup: _Lookup) -> FanoutPriority | None:
        """The group whose planning task a background fanout starts with; ``None``: inline.

        HIGH, unless ``auto`` finds the HIGH group empty in memory: then the
        first planning task goes to the LOW queue, and nothing of a fanout
        to LOW followers only waits in the HIGH queue.
        """
        mode = self.settings.planning
        if mode == "inline" or self.dispatcher.runs_in_process:
            return None
        if mode == "background":
            return FanoutPriority.HIGH
        if type(self).get_user_follower_count is Manager.get_user_follower_count:
            count = _count_in_memory(lookup.groups())  # the default, without a second lookup
        else:
            count = self.get_user_follower_count(user_id)
        if count is None or count < self.settings.planning_threshold:
            return None
        if not _may_hold_ids(lookup.groups().get(FanoutPriority.HIGH)):
            return FanoutPriority.LOW
        return FanoutPriority.HIGH

    def _plan_and_send(
        self,
        op: Operation,
        user_id: ObjectId,
        feeds: Sequence[str],
        entries: Sequence[tuple[str, int]],
        fanout_id: str,
        *,
        chunk_size: int | None = None,
        lookup: _Lookup | None = None,
        activities: Sequence[Activity] = (),
        writes: Sequence[WriteBatch] = (),
    ) -> FanoutReceipt:
        groups = (lookup or _Lookup(self, user_id)).groups()
        activity_ids = tuple(activity_id for activity_id, _ in entries)
        # A retried planning starts clean; a failure is recorded again if it recurs.
        self.storage.start_fanout(
            fanout_id,
            describe_fanout(op, user_id, activity_ids),
            activities=activities,
            writes=writes,
            clear_failure=PLAN_CHUNK,
        )
        counts = {FanoutPriority.HIGH: 0, FanoutPriority.LOW: 0}
        followers = 0

        def counted(tasks: Iterator[ChunkTask]) -> Iterator[ChunkTask]:
            nonlocal followers
            for task in tasks:
                counts[task.priority] += 1
                followers += len(task.followers)
                yield task

        tasks = plan_chunks(
            op=op,
            feeds=feeds,
            entries=entries,
            followers=groups,
            chunk_size=chunk_size or self.settings.fanout_chunk_size,
            fanout_id=fanout_id,
        )
        try:
            accepted = self.dispatcher.enqueue_many(counted(tasks))
        except LimitExceededError as e:
            self._stop_planning(fanout_id, e)
            raise
        except DispatchError as e:
            # Counted failed, so the fanout settles (the chunks the queue took still run)
            # rather than looking in flight for status_ttl; adding it again reopens it.
            self._end_failed_planning(fanout_id, e.accepted, f"not sent: {e}")
            raise type(e)(
                f"fanout {fanout_id} of {op} by user {user_id!r}: {str(e).rstrip('.')}. Call the "
                "same method again with the same activity to complete it; nothing is written twice.",
                accepted=e.accepted,
            ) from e
        self.storage.end_planning(fanout_id, accepted)
        return FanoutReceipt(
            fanout_id=fanout_id,
            activity_ids=activity_ids,
            chunks=accepted,
            high_chunks=counts[FanoutPriority.HIGH],
            low_chunks=counts[FanoutPriority.LOW],
            followers=followers,
        )

    def run_chunk(self, task: ChunkTask) -> int:
        """Write one chunk to the registered feeds; workers call this for every chunk task.

        Override it to add metrics or tracing around the write; call
        ``super().run_chunk(task)`` to write. Returns the number of feed writes.
        """
        return run_chunk(task, storage=self.storage, feed_classes=self.registered_feeds)

    def plan_in_worker(self, task: PlanTask) -> FanoutReceipt:
        """Run a planning task: read the followers here and send the chunk tasks.

        A task plans one page (see :class:`~feedfan.task.PlanTask`): at most
        ``planning_page`` chunk tasks of its group, sent in one batch behind
        the task for the next page, so the next page is planned by another
        worker while these chunks wait. Only a ``range`` or a sequence class
        of your own is paged; a list or tuple (built whole for each call), a
        generator or a cursor is cut to its end by the task that starts it.

        A chunk over a limit (``max_task_bytes``) is never sent: planning
        stops there, the fanout settles with its planning counted as failed,
        and a :class:`~feedfan.errors.PayloadError` tells the worker to keep
        the planning task without retrying it (it would stop at the same place).
        """
        if task.paged:
            return self._plan_page(task)
        try:
            return self._plan_and_send(
                task.op,
                task.user_id,
                task.feeds,
                task.entries,
                task.fanout_id,
                chunk_size=min(task.chunk_size, self.settings.max_chunk_size),
            )
        except LimitExceededError as e:
            raise PayloadError(f"planning of fanout {task.fanout_id} stopped: {e}") from e
        except DispatchError as e:
            # The chunks sent so far run; the planning counts as the one failed chunk, so
            # the fanout settles if this was its last try (a retry opens it again).
            self._end_failed_planning(task.fanout_id, e.accepted, f"planning failed: {e}")
            raise
        except FeedfanError:
            raise
        except Exception as e:  # get_user_follower_ids failed before any chunk was sent
            self._end_failed_planning(task.fanout_id, 0, f"planning failed: {e!r}")
            raise

    def _plan_page(self, task: PlanTask) -> FanoutReceipt:
        fanout_id = task.fanout_id
        activity_ids = tuple(activity_id for activity_id, _ in task.entries)
        receipt = FanoutReceipt(fanout_id, activity_ids, 0, 0, 0, 0, planned_in_background=True)
        # A page run again after a failure recorded a total opens the fanout again; one
        # delivered again after the whole fanout was written has nothing left to do.
        if not self.storage.reopen_planning(fanout_id, PLAN_CHUNK):
            return receipt
        sent_before = task.before + task.start  # chunk tasks earlier pages sent
        # A group's first page fixes its chunk size (the producer's, capped by this
        # worker's max_chunk_size); later pages keep it, so page offsets line up.
        cap = self.settings.max_chunk_size
        chunk_size = min(task.chunk_size, cap) if task.start == 0 else task.chunk_size
        if chunk_size > cap:
            error = PayloadError(
                f"plan task of fanout {fanout_id} continues chunks of {chunk_size} followers, "
                f"above this worker's max_chunk_size={cap} (from "
                f"{self.settings.sources.get('max_chunk_size', 'default')}); run every worker "
                "with the same max_chunk_size, then replay the task (feedfan replay)."
            )
            self._end_failed_planning(fanout_id, sent_before, str(error))
            raise error
        page = dataclasses.replace(task, chunk_size=chunk_size)
        first = task.start * chunk_size
        stopped: list[ActivityError] = []  # a follower id that is not one stops the cut
        try:
            groups = group_followers(self.get_user_follower_ids(task.user_id))
            ids = groups.get(task.priority, ())
            paged = _pageable(ids)
            chunks: list[ChunkTask] = []
            more = False
            if paged:
                listed = cast("Sequence[ObjectId]", ids)
                end = first + self.settings.planning_page * chunk_size
                window = listed[first:end]
                chunks = list(self._cut(page, window, stopped))
                # A short slice (the group changed between reads) ends the group here.
                more = not stopped and len(window) == end - first and len(listed) > end
        except ActivityError as e:  # get_user_follower_ids returned something unusable
            self._end_failed_planning(fanout_id, sent_before, f"stopped: {e}")
            raise PayloadError(f"planning of fanout {fanout_id} stopped: {e}") from e
        except FeedfanError:
            raise
        except Exception as e:  # reading the followers failed before any chunk was sent
            self._end_failed_planning(fanout_id, sent_before, f"planning failed: {e!r}")
            raise

        def low_group(planned: int) -> PlanTask | None:
            """The LOW group's first page, once this HIGH group has ``planned`` chunks."""
            if (
                stopped
                or task.priority is FanoutPriority.LOW
                or not _may_hold_ids(groups.get(FanoutPriority.LOW))
            ):
                return None
            return dataclasses.replace(
                task, priority=FanoutPriority.LOW, start=0, before=sent_before + planned
            )

        count = followers = 0
        after: PlanTask | None
        try:
            if paged:
                count, followers = len(chunks), sum(len(c.followers) for c in chunks)
                after = (
                    dataclasses.replace(page, start=task.start + count)
                    if more
                    else low_group(count)
                )
                self._send_page(task, chunks, after)
            else:  # not to be read again per page: the rest of the group here, then LOW

                def stream() -> Iterator[ChunkTask | PlanTask]:
                    nonlocal count, followers
                    for chunk in self._cut(page, islice(ids, first, None), stopped):
                        count += 1
                        followers += len(chunk.followers)
                        yield chunk
                    low = low_group(count)
                    if low is not None:
                        yield low

                self.dispatcher.enqueue_many(stream())
                after = low_group(count)
        except LimitExceededError as e:
            self._end_failed_planning(fanout_id, sent_before + e.accepted, f"stopped: {e}")
            raise PayloadError(f"planning of fanout {fanout_id} stopped: {e}") from e
        except DispatchError as e:
            # Nothing after the failure was sent, the next page neither: the planning counts
            # as failed, so the fanout settles if this was its last try (a retry opens it).
            self._end_failed_planning(fanout_id, sent_before + e.accepted, f"planning failed: {e}")
            raise
        if stopped:  # the chunks before the bad id were sent; planning ends there
            self._end_failed_planning(fanout_id, sent_before + count, f"stopped: {stopped[0]}")
            raise PayloadError(f"planning of fanout {fanout_id} stopped: {stopped[0]}")
        if after is None:
            self.storage.end_planning(fanout_id, sent_before + count)
        high = task.priority is FanoutPriority.HIGH
        return dataclasses.replace(
            receipt,
            chunks=count,
            high_chunks=count if high else 0,
            low_chunks=0 if high else count,
            followers=followers,
        )

    def _cut(
        self, page: PlanTask, followers: Iterable[ObjectId], stopped: list[ActivityError]
    ) -> Iterator[ChunkTask]:
        """``page``'s chunk tasks; at a follower id that is not one, note it and stop."""
        try:
            yield from plan_group(
                op=page.op,
                feeds=page.feeds,
                entries=page.entries,
                priority=page.priority,
                followers=followers,
                chunk_size=page.chunk_size,
                fanout_id=page.fanout_id,
                first_index=page.start,
            )
        except ActivityError as e:
            stopped.append(e)

    def _send_page(self, task: PlanTask, chunks: list[ChunkTask], after: PlanTask | None) -> None:
        """Send a page's chunk tasks, behind the task of the page ``after`` it if there is one.

        A chunk over ``max_task_bytes`` stops planning: the chunks before it
        go, the next page does not. If the queue fails once it holds the next
        page, planning goes on there and this task ends: the chunks not sent
        count failed, each under its own key, until the activity is added
        again (written, they count done). Retrying this task instead could
        record a total while later pages run.
        """
        for index, chunk in enumerate(chunks):
            try:
                self.dispatcher.encode(chunk)
            except LimitExceededError as e:
                sent = self.dispatcher.enqueue_many(chunks[:index])
                raise LimitExceededError(str(e), accepted=sent) from e
        if after is None:
            self.dispatcher.enqueue_many(chunks)
            return
        try:
            self.dispatcher.enqueue_many([after, *chunks])
        except DispatchError as e:
            if e.accepted == 0:
                raise
            unsent = chunks[e.accepted - 1 :]
            reason = (
                f"not sent while planning: {str(e).rstrip('.')}. Add the activity again to send "
                "it; nothing is written twice."
            )
            try:
                for chunk in unsent:
                    self.storage.mark_chunk_failed(task.fanout_id, chunk.chunk_key, reason)
            except FeedfanError:  # the task must not be retried: the next page is queued
                logger.exception("feedfan could not count the chunks not sent as failed")
            logger.error(
                "feedfan could not send %d chunk task(s) of fanout %s (%s from %d); planning "
                "goes on from the next page, and they count failed: %s",
                len(unsent),
                task.fanout_id,
                task.priority.value,
                task.start,
                e,
            )

    # Follows ------------------------------------------------------------------

    def follow_user(self, user_id: ObjectId, target_user_id: ObjectId) -> FanoutReceipt:
        """Copy ``target_user_id``'s activities into ``user_id``'s feeds."""
        return self.follow_many_users(user_id, [target_user_id])

    def unfollow_user(self, user_id: ObjectId, target_user_id: ObjectId) -> FanoutReceipt:
        """Remove ``target_user_id``'s activities from ``user_id``'s feeds."""
        return self._copy_between("remove", user_id, [target_user_id])

    def follow_many_users(
        self, user_id: ObjectId, target_user_ids: Iterable[ObjectId]
    ) -> FanoutReceipt:
        """Copy the activities of every user in ``target_user_ids`` into ``user_id``'s feeds."""
        return self._copy_between("add", user_id, target_user_ids)

    def _copy_between(
        self, op: Operation, user_id: ObjectId, targets: Iterable[ObjectId]
    ) -> FanoutReceipt:
        check_object_id("user_id", user_id)
        target_ids = check_object_ids("target_user_id", targets)
        depth = max(cls.max_length for cls in self.registered_feeds.values())
        entries: dict[str, int] = {}
        for target in target_ids:
            entries.update(self.get_user_feed(target).entries(limit=depth))
        feeds = tuple(self.registered_feeds)
        fanout_id = make_fanout_id(f"{op}-follow", user_id, [str(t) for t in target_ids], feeds)
        self.storage.begin_fanout(fanout_id, describe_fanout(f"{op}-follow", user_id, []))
        ordered = sorted(entries.items())
        tasks = (
            ChunkTask(
                op=op,
                feeds=feeds,
                entries=batch,
                followers=(user_id,),
                fanout_id=fanout_id,
                priority=FanoutPriority.HIGH,
                index=index,
            )
            for index, batch in enumerate(self._follow_batches(op, feeds, user_id, ordered))
        )
        try:
            accepted = self.dispatcher.enqueue_many(tasks)
        except LimitExceededError as e:
            self._stop_planning(fanout_id, e)
            raise
        self.storage.end_planning(fanout_id, accepted)
        return FanoutReceipt(fanout_id, tuple(entries), accepted, accepted, 0, 1)

    def _follow_batches(
        self,
        op: Operation,
        feeds: tuple[str, ...],
        user_id: ObjectId,
        ordered: Sequence[tuple[str, int]],
    ) -> Iterator[tuple[tuple[str, int], ...]]:
        """Entries of follow tasks, at most 1,000 a task and within ``max_task_bytes``."""
        if not ordered:
            return
        # A task's size is its fixed part plus its entries' JSON, one comma each.
        probe = ChunkTask(
            op, feeds, (ordered[0],), (user_id,), "0" * 24, FanoutPriority.HIGH, 2**31
        )
        budget = (
            self.settings.max_task_bytes - len(probe.to_json().encode()) + _entry_bytes(ordered[0])
        )
        batch: list[tuple[str, int]] = []
        size = 0
        for entry in ordered:
            cost = _entry_bytes(entry)
            if batch and (len(batch) >= _FOLLOW_ENTRIES_PER_TASK or size + cost > budget):
                yield tuple(batch)
                batch, size = [], 0
            batch.append(entry)
            size += cost
        yield tuple(batch)

    def _stop_planning(self, fanout_id: str, error: LimitExceededError) -> None:
        # Nothing after the task over the limit is sent: the fanout ends there,
        # with its planning counted as one failed chunk.
        self._end_failed_planning(fanout_id, error.accepted, f"stopped: {error}")

    def _end_failed_planning(self, fanout_id: str, accepted: int, reason: str) -> None:
        try:
            self.storage.mark_chunk_failed(fanout_id, PLAN_CHUNK, reason)
            self.storage.end_planning(fanout_id, accepted + 1)
        except FeedfanError:  # progress is best effort; the task's own error is what matters
            logger.exception("feedfan could not record the failed planning of %s", fanout_id)

    # Progress -----------------------------------------------------------------

    def fanout_status(self, fanout: str | FanoutReceipt) -> FanoutStatus | None:
        """Progress of a fanout, from Redis counters; ``None`` if none is recorded."""
        fanout_id = fanout.fanout_id if isinstance(fanout, FanoutReceipt) else fanout
        return self.storage.fanout_status(fanout_id)

    def wait(
        self, fanout: str | FanoutReceipt, *, timeout: float = 60.0, interval: float = 0.05
    ) -> FanoutStatus:
        """Block until a fanout has settled (every chunk done or failed); return its status.

        Raises :class:`~feedfan.errors.FeedfanError` if it has not settled
        within ``timeout`` seconds; workers keep working either way.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.fanout_status(fanout)
            if status is not None and status.settled:
                return status
            if time.monotonic() >= deadline:
                raise FeedfanError(
                    f"fanout {getattr(fanout, 'fanout_id', fanout)} has not settled within "
                    f"{timeout:g} s: {status}. Are workers running for "
                    f"{self.settings.queue_high!r} and {self.settings.queue_low!r}?"
                )
            time.sleep(interval)
