"""Fanout inside a transaction waits for the commit, and never happens after a rollback.

In-process (``eager`` dispatcher, in-memory feeds): what is checked here is
when the manager acts, not how the queue runs it; ``test_django_example.py``
runs the same flows on real workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from django.contrib.auth.models import User
from django.db import transaction
from pins.feeds import MyStreamManager
from pins.models import Follow

from feedfan import Activity, ActivityError, DispatchError, FanoutReceipt
from feedfan.contrib.django import DeferredFanoutReceipt

pytestmark = pytest.mark.django_db(transaction=True)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def network() -> dict[str, User]:
    """alice is followed by bob (active) and carol (inactive); dave follows nobody."""
    users = {
        "alice": User.objects.create(username="alice", last_login=datetime.now(timezone.utc)),
        "bob": User.objects.create(username="bob", last_login=datetime.now(timezone.utc)),
        "carol": User.objects.create(
            username="carol", last_login=datetime.now(timezone.utc) - timedelta(days=90)
        ),
        "dave": User.objects.create(username="dave"),
    }
    Follow.objects.create(follower=users["bob"], target=users["alice"])
    Follow.objects.create(follower=users["carol"], target=users["alice"])
    return users


@pytest.fixture
def manager() -> Iterator[MyStreamManager]:
    """The example's manager on the test settings: eager, on in-memory feeds."""
    with MyStreamManager() as built:
        yield built


def _pin(author: User, number: int = 1) -> Activity:
    return Activity(
        actor=author.pk, verb="pin", object=number, time=NOW + timedelta(seconds=number)
    )


def _timeline(manager: MyStreamManager, user: User) -> list[str]:
    return [activity_id for activity_id, _ in manager.get_feed(user.pk).entries(limit=100)]


def test_a_pin_added_in_a_committed_transaction_is_fanned_out_once_on_commit(
    manager: MyStreamManager, network: dict[str, User]
) -> None:
    # Given a pin by alice, added inside a transaction
    alice, pin = network["alice"], _pin(network["alice"])
    with transaction.atomic():
        receipt = manager.add_user_activity(alice.pk, pin)
        # Then nothing has happened yet: not the author's feed, not the fanout
        assert isinstance(receipt, DeferredFanoutReceipt) and receipt.pending
        assert manager.fanout_status(receipt) is None
        assert manager.get_user_feed(alice.pk).count() == 0
    # When it commits, then exactly one fanout ran, under the id promised before
    assert isinstance(receipt, DeferredFanoutReceipt)
    assert not receipt.pending and receipt.error is None and receipt.sent is not None
    assert receipt.sent.fanout_id == receipt.fanout_id
    assert (receipt.sent.high_chunks, receipt.sent.low_chunks, receipt.sent.followers) == (1, 1, 2)
    assert manager.storage.recent_fanouts() == [receipt.fanout_id]
    assert manager.wait(receipt, timeout=10).complete
    assert _timeline(manager, network["bob"]) == [pin.id]
    assert _timeline(manager, network["carol"]) == [pin.id]
    assert _timeline(manager, network["dave"]) == []


def test_a_pin_added_in_a_rolled_back_transaction_sends_and_writes_nothing(
    manager: MyStreamManager, network: dict[str, User]
) -> None:
    # Given a pin by alice, added inside a transaction that then fails
    alice, pin = network["alice"], _pin(network["alice"])
    receipt: FanoutReceipt | None = None
    with pytest.raises(RuntimeError), transaction.atomic():
        receipt = manager.add_user_activity(alice.pk, pin)
        raise RuntimeError("the view failed after saving the pin")
    # Then no fanout was recorded and nothing was written anywhere
    assert isinstance(receipt, DeferredFanoutReceipt) and receipt.pending
    assert receipt.sent is None
    assert manager.storage.recent_fanouts() == []
    assert manager.storage.get_activities([pin.id]) == {}
    assert manager.get_user_feed(alice.pk).count() == 0
    assert _timeline(manager, network["bob"]) == []


def test_a_rolled_back_savepoint_drops_only_its_own_fanout(
    manager: MyStreamManager, network: dict[str, User]
) -> None:
    # Given two pins in one transaction, the second inside a savepoint that rolls back
    alice = network["alice"]
    kept, dropped = _pin(alice, 1), _pin(alice, 2)
    with transaction.atomic():
        manager.add_user_activity(alice.pk, kept)
        with pytest.raises(RuntimeError), transaction.atomic():
            manager.add_user_activity(alice.pk, dropped)
            raise RuntimeError("inner failure")
    # Then only the first pin reached the followers
    assert _timeline(manager, network["bob"]) == [kept.id]
    assert len(manager.storage.recent_fanouts()) == 1


def test_outside_a_transaction_the_fanout_is_sent_at_once(
    manager: MyStreamManager, network: dict[str, User]
) -> None:
    # Given no transaction (autocommit)
    alice, pin = network["alice"], _pin(network["alice"])
    # When a pin is added, then the plain receipt of a sent fanout comes back
    receipt = manager.add_user_activity(alice.pk, pin)
    assert not isinstance(receipt, DeferredFanoutReceipt)
    assert receipt.chunks == 2
    assert _timeline(manager, network["carol"]) == [pin.id]


def test_dispatch_on_commit_off_sends_inside_the_transaction(network: dict[str, User]) -> None:
    # Given a manager told not to wait for commits
    alice, pin = network["alice"], _pin(network["alice"])
    # When a pin is added inside a transaction, then it is fanned out before the commit
    with MyStreamManager(dispatch_on_commit=False) as eager, transaction.atomic():
        receipt = eager.add_user_activity(alice.pk, pin)
        assert not isinstance(receipt, DeferredFanoutReceipt)
        assert _timeline(eager, network["bob"]) == [pin.id]


def test_a_bad_activity_fails_inside_the_transaction_not_at_commit(
    manager: MyStreamManager, network: dict[str, User]
) -> None:
    # Given a transaction; when something that is not an Activity is added
    with pytest.raises(ActivityError, match=r"must be a feedfan\.Activity"), transaction.atomic():
        manager.add_user_activity(network["alice"].pk, {"verb": "pin"})  # type: ignore[arg-type]
    # Then the error came from the call itself, and nothing was registered for later
    assert manager.storage.recent_fanouts() == []


def test_removal_and_follows_wait_for_the_commit_under_the_ids_they_promise(
    manager: MyStreamManager, network: dict[str, User]
) -> None:
    # Given a pin by alice that bob already has
    alice, bob, dave = network["alice"], network["bob"], network["dave"]
    pin = _pin(alice)
    manager.add_user_activity(alice.pk, pin)
    # When dave follows alice inside a transaction
    with transaction.atomic():
        followed = manager.follow_user(dave.pk, alice.pk)
        assert _timeline(manager, dave) == []
    # Then her pin is copied on commit, under the promised id
    assert isinstance(followed, DeferredFanoutReceipt) and followed.sent is not None
    assert followed.sent.fanout_id == followed.fanout_id
    assert _timeline(manager, dave) == [pin.id]
    # When dave unfollows and alice removes the pin, in one transaction
    with transaction.atomic():
        unfollowed = manager.unfollow_user(dave.pk, alice.pk)
        removed = manager.remove_user_activity(alice.pk, pin.id)
        assert _timeline(manager, bob) == [pin.id]
    # Then both happen on commit, each under its promised id
    for receipt in (unfollowed, removed):
        assert isinstance(receipt, DeferredFanoutReceipt) and receipt.sent is not None
        assert receipt.sent.fanout_id == receipt.fanout_id
    assert _timeline(manager, dave) == [] and _timeline(manager, bob) == []


def test_a_fanout_failing_after_commit_is_logged_and_kept_and_other_callbacks_run(
    manager: MyStreamManager,
    network: dict[str, User],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a queue that refuses tasks, and another on_commit callback after ours
    def refuse(items: object) -> None:
        raise DispatchError("the broker is down")

    manager.dispatcher.publish_many = refuse  # type: ignore[method-assign]
    later: list[str] = []
    alice, pin = network["alice"], _pin(network["alice"])
    # When a pin is added and the transaction commits
    with caplog.at_level(logging.ERROR, logger="feedfan.django"), transaction.atomic():
        receipt = manager.add_user_activity(alice.pk, pin)
        transaction.on_commit(lambda: later.append("ran"))
    # Then the commit stood, the error is on the receipt and in the log, and the
    # other callback still ran
    assert isinstance(receipt, DeferredFanoutReceipt)
    assert isinstance(receipt.error, DispatchError)
    assert receipt.fanout_id in caplog.text and "call the same manager method again" in caplog.text
    assert later == ["ran"]
    # And calling again outside a transaction completes the same fanout
    del manager.dispatcher.publish_many
    again = manager.add_user_activity(alice.pk, pin)
    assert again.fanout_id == receipt.fanout_id
    assert _timeline(manager, network["bob"]) == [pin.id]
