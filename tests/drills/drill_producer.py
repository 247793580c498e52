"""The producer side of the outage drill: a fanout sent into a fault, then sent again.

``add_user_activity`` must either enqueue every chunk or raise a
``DispatchError`` whose ``accepted`` claims no more than arrived; calling it
again must complete the fanout.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from drill_feeds import Fanout

from feedfan.activity import ObjectId
from feedfan.config import Settings
from feedfan.errors import BrokerError, DispatchError
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.task import make_fanout_id
from feedfan.testing.managers import ConformanceManager

__all__ = [
    "FaultHalfWay",
    "fanout_id",
    "gives_advice",
    "producer_trial",
    "send_once",
    "send_until_accepted",
    "waiting",
]

_RETRIES = 5
"""Calls of ``add_user_activity`` a careful producer makes before giving up."""


class FaultHalfWay(ConformanceManager):
    """The conformance manager, whose follower lists call ``fault`` once, half-way through."""

    def __init__(self, *, fault_at: int, fault: Callable[[], str], **kwargs: Any) -> None:
        self.fault_at = fault_at
        self.fault = fault
        self.injected: str | None = None
        super().__init__(**kwargs)

    def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Iterable[ObjectId]]:
        """Followers as usual; reading the ``fault_at``-th one triggers the fault."""
        counter = itertools.count(1)

        def watched(ids: Iterable[ObjectId]) -> Iterator[ObjectId]:
            for follower in ids:
                if next(counter) == self.fault_at and self.injected is None:
                    self.injected = self.fault()
                yield follower

        return {p: watched(ids) for p, ids in super().get_user_follower_ids(user_id).items()}


def fanout_id(manager: Manager, fanout: Fanout) -> str:
    """The id ``manager`` gives the fanout of ``fanout``'s activity (it is deterministic)."""
    return make_fanout_id("add", fanout.user, [fanout.activity.id], tuple(manager.registered_feeds))


def waiting(manager: Manager) -> int | None:
    """Chunks waiting in the queues, if they wait anywhere a worker has not taken them from."""
    if manager.dispatcher.runs_in_process:
        return None
    depths = [manager.dispatcher.queue_depth(p) for p in FanoutPriority]
    return None if None in depths else sum(d or 0 for d in depths)


_ADVICE = "again with the same activity"
"""What a ``DispatchError`` of a fanout planned by the producer tells its user to do."""


def send_once(manager: Manager, fanout: Fanout) -> tuple[int, DispatchError | None]:
    """``add_user_activity`` once; the chunks it says were accepted, and its error if it raised."""
    try:
        receipt = manager.add_user_activity(fanout.user, fanout.activity)
    except DispatchError as e:
        return e.accepted, e
    return receipt.chunks, None


def gives_advice(error: DispatchError) -> bool:
    """Whether ``error`` tells the user to call ``add_user_activity`` again."""
    return _ADVICE in str(error)


def send_until_accepted(manager: Manager, fanout: Fanout, *, pause: float = 2.0) -> int:
    """Call ``add_user_activity`` again until it succeeds, as a careful producer would."""
    error: DispatchError | None = None
    for attempt in range(1, _RETRIES + 1):
        _, error = send_once(manager, fanout)
        if error is None:
            return attempt
        time.sleep(pause)
    raise AssertionError(f"add_user_activity still fails after {_RETRIES} attempts: {error}")


def producer_trial(
    settings: Settings,
    observer: Manager,
    fanout: Fanout,
    *,
    fault: Callable[[], str],
    after: Callable[[], None] = lambda: None,
    unreachable: str | None = None,
) -> str:
    """Send ``fanout`` with ``fault`` half-way; check what arrived; send it again. Say what happened.

    ``observer`` counts the queues over its own connections; ``after`` runs
    before the second call (to wait for the broker to be back).
    """
    # Planned here, not by a worker (planning = auto would hand a big fanout to one): the
    # producer itself must meet the fault while it sends the chunks.
    producer = FaultHalfWay(
        settings=settings.replace(planning="inline"), fault_at=fanout.followers // 2, fault=fault
    )
    try:
        return _try_producer(producer, observer, fanout, after=after, unreachable=unreachable)
    finally:
        producer.close()  # its queues are the harness's, purged with the other managers


def _try_producer(
    producer: FaultHalfWay,
    observer: Manager,
    fanout: Fanout,
    *,
    after: Callable[[], None],
    unreachable: str | None,
) -> str:
    settings = producer.settings
    chunks = -(-fanout.high // settings.fanout_chunk_size) + -(
        -fanout.low // settings.fanout_chunk_size
    )
    # Several publish round trips per fanout, so the fault falls between two of them
    producer.dispatcher.publish_batch_size = max(1, chunks // 10)  # type: ignore[misc]
    before = waiting(observer) or 0
    accepted, error = send_once(producer, fanout)
    assert producer.injected is not None, "the fault did not fire"
    after_send = waiting(observer)
    arrived = None if after_send is None else after_send - before
    if error is None:
        assert accepted == chunks
        assert arrived in (None, chunks), f"{arrived} of {chunks} chunks arrived"
        outcome = f"{producer.injected}: all {chunks} chunks enqueued"
    else:
        # Then it said how many it had sent, and did not claim more than arrived
        assert gives_advice(error), str(error)
        if unreachable is not None:  # and an unreachable broker is a BrokerError naming it
            assert isinstance(error, BrokerError), f"{type(error).__name__}: {error}"
            assert unreachable in str(error), str(error)
        assert arrived is None or accepted <= arrived <= chunks, (
            f"{type(error).__name__} says accepted={accepted}, but {arrived} of {chunks} "
            f"chunks arrived: {error}"
        )
        outcome = (
            f"{producer.injected}: {type(error).__name__}, accepted={accepted} of {chunks} "
            f"({arrived} arrived)"
        )
    after()
    attempts = send_until_accepted(producer, fanout)
    return f"{outcome}; sent again, accepted after {attempts} call(s)"
