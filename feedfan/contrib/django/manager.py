"""``DjangoManager``: fanout that waits for the database transaction to commit.

A pin saved inside ``transaction.atomic()`` is invisible to other connections
until the transaction commits, and gone if it rolls back. So when
``add_user_activity`` and friends are called inside a transaction, everything
they would do (store the activity, write the author's feed, send the chunk
tasks) is registered with ``transaction.on_commit``: a worker never reads a row
that is not committed, and a rolled-back pin appears nowhere. Outside a
transaction they run at once, exactly like :class:`~feedfan.manager.Manager`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from django import db  # type: ignore[import-untyped, unused-ignore]
from django.db import transaction  # type: ignore[import-untyped, unused-ignore]

from feedfan.activity import (
    ACTIVITY_ID_PATTERN,
    Activity,
    ObjectId,
    check_object_id,
    check_object_ids,
)
from feedfan.config import Settings
from feedfan.contrib.django.conf import get_settings
from feedfan.dispatch import TaskDispatcher
from feedfan.errors import ActivityError
from feedfan.fanout import FanoutReceipt
from feedfan.manager import Manager
from feedfan.storage.base import Storage
from feedfan.task import PlanTask, make_fanout_id

__all__ = ["DeferredFanoutReceipt", "DjangoManager"]

logger = logging.getLogger("feedfan.django")


class _Outcome:
    """What happened to a deferred fanout once its transaction committed."""

    def __init__(self) -> None:
        self.sent: FanoutReceipt | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


@dataclass(frozen=True)
class DeferredFanoutReceipt(FanoutReceipt):
    """A fanout registered with ``transaction.on_commit``, not sent yet.

    ``fanout_id`` and ``activity_ids`` are final (the fanout id is
    deterministic), so ``manager.fanout_status(receipt)`` and
    ``manager.wait(receipt)`` work once the transaction has committed. The
    counts (``chunks``, ``followers`` …) are zero here: followers are read at
    commit time. :attr:`sent` holds the real receipt after the commit;
    :attr:`error` the exception if sending failed then. After a rollback
    neither is ever set.
    """

    _outcome: _Outcome = field(default_factory=_Outcome, compare=False, repr=False)

    @property
    def pending(self) -> bool:
        """Whether the transaction has not committed yet (or rolled back)."""
        return not self._outcome.done.is_set()

    @property
    def sent(self) -> FanoutReceipt | None:
        """The receipt of the fanout as sent after the commit; ``None`` before."""
        return self._outcome.sent

    @property
    def error(self) -> BaseException | None:
        """The exception raised while sending after the commit, if any."""
        return self._outcome.error


class DjangoManager(Manager):
    """A :class:`~feedfan.manager.Manager` for Django projects.

    Its settings come from ``settings.FEEDFAN`` (see
    :func:`~feedfan.contrib.django.conf.get_settings`). Called inside
    ``transaction.atomic()``, ``add_user_activity``, ``remove_user_activity``,
    ``follow_user``, ``unfollow_user`` and ``follow_many_users`` check their
    arguments at once but do their work on commit, and return a
    :class:`DeferredFanoutReceipt`.

    ``dispatch_on_commit`` (default ``True``) turns that off, for this class or
    one instance (``MyStreamManager(dispatch_on_commit=False)``); ``using`` names
    the database whose transaction is followed (default: ``"default"``).
    """

    dispatch_on_commit: bool = True
    """Defer work done inside a transaction until it commits."""

    using: str | None = None
    """The database alias whose transaction is followed; ``None`` is ``"default"``."""

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        dispatcher: TaskDispatcher | str | None = None,
        storage: Storage | None = None,
        dispatch_on_commit: bool | None = None,
        using: str | None = None,
        **overrides: Any,
    ) -> None:
        if dispatch_on_commit is not None:
            self.dispatch_on_commit = dispatch_on_commit
        if using is not None:
            self.using = using
        super().__init__(
            settings=get_settings() if settings is None else settings,
            dispatcher=dispatcher,
            storage=storage,
            **overrides,
        )

    # Deferral -------------------------------------------------------------

    def defers_now(self) -> bool:
        """Whether work would wait for a commit now: deferral on, inside ``atomic()``."""
        return bool(self.dispatch_on_commit) and bool(
            transaction.get_connection(self.using).in_atomic_block
        )

    def _on_commit(
        self, fanout_id: str, activity_ids: Iterable[str], send: Callable[[], FanoutReceipt]
    ) -> FanoutReceipt:
        if not self.defers_now():
            return send()
        receipt = DeferredFanoutReceipt(fanout_id, tuple(activity_ids), 0, 0, 0, 0)
        outcome = receipt._outcome

        def run() -> None:
            try:
                outcome.sent = send()
            except Exception as e:
                # The rows are committed; raising here would fail the request that
                # saved them and skip other on_commit callbacks. The fanout id is
                # deterministic, so calling the method again completes it.
                outcome.error = e
                logger.exception(
                    "feedfan fanout %s failed after the transaction committed; call the same "
                    "manager method again to complete it (nothing is written twice)",
                    fanout_id,
                )
            finally:
                outcome.done.set()

        transaction.on_commit(run, using=self.using)
        return receipt

    def _feed_names(self) -> tuple[str, ...]:
        return tuple(self.registered_feeds)

    # Activities -------------------------------------------------------------

    def add_user_activity(self, user_id: ObjectId, activity: Activity) -> FanoutReceipt:
        """Store ``activity``, add it to the author's feed and fan it out; on commit if in a transaction."""
        check_object_id("user_id", user_id)
        checked = self._check_activity(activity)
        fanout_id = make_fanout_id("add", user_id, [checked.id], self._feed_names())
        send = functools.partial(super().add_user_activity, user_id, checked)
        return self._on_commit(fanout_id, [checked.id], send)

    def remove_user_activity(self, user_id: ObjectId, activity: Activity | str) -> FanoutReceipt:
        """Remove an activity from the author's and followers' feeds; on commit if in a transaction."""
        check_object_id("user_id", user_id)
        if isinstance(activity, str):
            if not ACTIVITY_ID_PATTERN.match(activity):
                raise ActivityError(f"activity id {activity!r} is not a feedfan activity id.")
            activity_id = activity
        else:
            activity_id = self._check_activity(activity).id
        fanout_id = make_fanout_id("remove", user_id, [activity_id], self._feed_names())
        send = functools.partial(super().remove_user_activity, user_id, activity)
        return self._on_commit(fanout_id, [activity_id], send)

    # Follows ------------------------------------------------------------------

    def follow_many_users(
        self, user_id: ObjectId, target_user_ids: Iterable[ObjectId]
    ) -> FanoutReceipt:
        """Copy the targets' activities into ``user_id``'s feeds; on commit if in a transaction."""
        target_ids = self._check_targets(user_id, target_user_ids)
        send = functools.partial(super().follow_many_users, user_id, target_ids)
        return self._on_commit(self._follow_id("add", user_id, target_ids), (), send)

    def unfollow_user(self, user_id: ObjectId, target_user_id: ObjectId) -> FanoutReceipt:
        """Remove ``target_user_id``'s activities from ``user_id``'s feeds; on commit if in a transaction."""
        target_ids = self._check_targets(user_id, [target_user_id])
        send = functools.partial(super().unfollow_user, user_id, target_ids[0])
        return self._on_commit(self._follow_id("remove", user_id, target_ids), (), send)

    def _check_targets(self, user_id: ObjectId, targets: Iterable[ObjectId]) -> list[ObjectId]:
        check_object_id("user_id", user_id)
        return list(check_object_ids("target_user_id", targets))

    def _follow_id(self, op: str, user_id: ObjectId, target_ids: list[ObjectId]) -> str:
        # The id Manager gives a follow fanout. Which activities it copies is only
        # known at commit time, when the targets' feeds are read.
        return make_fanout_id(
            f"{op}-follow", user_id, [str(t) for t in target_ids], self._feed_names()
        )

    # Workers ------------------------------------------------------------------

    def plan_in_worker(self, task: PlanTask) -> FanoutReceipt:
        """Plan in a worker, with Django's per-task database connection hygiene.

        ``get_user_follower_ids`` may query the ORM here; stale or broken
        connections are closed before and after, as Django does around a request.
        """
        db.close_old_connections()
        try:
            return super().plan_in_worker(task)
        finally:
            db.close_old_connections()
