"""The runbook "Moving from Celery to RQ without downtime", walked on real brokers.

1. Change the configuration (``dispatcher``, and ``broker_url`` if the new queue
   library uses another broker) and redeploy producers.
2. Start workers of the new queue library.
3. Keep the old workers until ``feedfan drain --dispatcher <old>`` says their
   queues are empty; then stop them.

Fanouts are in flight across the switch: some were sent to the old queues
before it, one was cut short there and retried by a new producer (its chunks
on both libraries), one was planned in the background by an old worker, and
later ones go to the new queues. Every follower's feed ends up complete.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from operations_support import namespace, pin, settle, timeline

from feedfan.activity import Activity
from feedfan.cli import main
from feedfan.config import Settings
from feedfan.fanout import describe_fanout, plan_chunks
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.status import gather_status
from feedfan.task import make_fanout_id
from feedfan.testing import Harness, make_user
from feedfan.testing.managers import CHUNK_DELAY_VARIABLE, follower_ids

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(180)]

_SLOW = {CHUNK_DELAY_VARIABLE: "0.15"}
"""Each chunk takes a little time, so the old queues still hold work at the switch."""


@pytest.fixture
def harness(feedfan_redis_url: str, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness("celery", log_dir=tmp_path, redis_url=feedfan_redis_url)
    try:
        yield harness
    finally:
        harness.close()


def _use_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    for name in [v for v in os.environ if v.startswith("FEEDFAN_")]:
        monkeypatch.delenv(name)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)


def _cut_short(manager: Manager, user: str, activity: Activity, sent: int) -> None:
    """What a producer that died after sending ``sent`` chunks of a fanout leaves behind."""
    manager.storage.store_activities([activity])
    feeds = tuple(manager.registered_feeds)
    entry = (activity.id, activity.sort_key)
    fanout_id = make_fanout_id("add", user, [activity.id], feeds)
    manager.storage.begin_fanout(fanout_id, describe_fanout("add", user, [activity.id]))
    chunks = plan_chunks(
        op="add",
        feeds=feeds,
        entries=[entry],
        followers=manager.get_user_follower_ids(user),
        chunk_size=manager.settings.fanout_chunk_size,
        fanout_id=fanout_id,
    )
    assert manager.dispatcher.enqueue_many(itertools.islice(chunks, sent)) == sent


def _walk_the_runbook(
    harness: Harness,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    old: Settings,
    new: Settings,
) -> None:
    old_name, new_name = old.dispatcher, new.dispatcher
    # Before: producers and workers on the old queue library
    before = harness.manager(old)
    harness.start_worker(old, env=_SLOW)
    users = [make_user(namespace(), 40, 25) for _ in range(4)]
    posted = {user: pin(user, number) for number, user in enumerate(users)}
    for user in users[:2]:
        before.add_user_activity(user, posted[user])
    background = harness.manager(old.replace(planning="background"))
    background.add_user_activity(users[2], posted[users[2]])
    _cut_short(before, users[3], posted[users[3]], sent=4)
    # 1. The configuration changes and producers are redeployed with it
    after = harness.manager(new)
    # 2. Workers of the new library start, beside the old ones
    harness.start_worker(new, env=_SLOW)
    later = [make_user(namespace(), 30, 20) for _ in range(2)]
    posted.update({user: pin(user, 10 + n) for n, user in enumerate(later)})
    for user in later:
        after.add_user_activity(user, posted[user])
    # The producer that was cut short is retried on the new library: same fanout, same chunks
    retried = after.add_user_activity(users[3], posted[users[3]])
    # Meanwhile `feedfan status` shows both libraries when they share a broker
    shown = {b.dispatcher for b in gather_status(new)}
    assert new_name in shown
    if old.effective_broker_url == new.effective_broker_url:
        assert old_name in shown, shown
    # 3. `feedfan drain --dispatcher <old>` waits until the old queues are empty
    _use_env(monkeypatch, new)
    drain_args = ["drain", "--dispatcher", old_name, "--timeout", "120"]
    if old.effective_broker_url != new.effective_broker_url:
        drain_args += ["--broker-url", old.effective_broker_url]
    assert main(drain_args) == 0, capsys.readouterr()
    out, err = capsys.readouterr()
    assert f"the {old_name} queues are empty" in out
    # (it had work to wait for: its progress bar counted the tasks that left the old queues)
    bar = re.search(rf"draining {old_name}\s+\[[#-]+\]\s+([\d,]+)/([\d,]+)", err)
    assert bar is not None and int(bar.group(2).replace(",", "")) > 0, err
    # ... then the old workers are stopped
    harness.workers[0].stop()
    # After: every fanout settles, and every follower's feed holds its activity exactly once
    for user in users + later:
        fanout = make_fanout_id("add", user, [posted[user].id], tuple(after.registered_feeds))
        status = settle(harness, after, fanout)
        assert status.complete and status.failed == 0, status
        expected = [(posted[user].id, posted[user].sort_key)]
        for priority in FanoutPriority:
            for follower in follower_ids(user, priority):
                assert timeline(after, follower) == expected, (user, follower)
    assert retried.chunks == 13
    # And nothing of the old library is left to show
    assert old_name not in {b.dispatcher for b in gather_status(new)}


def test_moving_from_celery_to_rq_without_downtime(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Celery on Redis, then RQ on the same Redis
    old = harness.settings(dispatcher="celery")
    new = old.replace(dispatcher="rq")
    _walk_the_runbook(harness, monkeypatch, capsys, old, new)


def test_moving_from_rq_to_dramatiq_without_downtime(
    harness: Harness,
    feedfan_amqp_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # RQ on Redis, then Dramatiq on RabbitMQ: the drain is given RQ's broker
    old = harness.settings(dispatcher="rq")
    new = old.replace(dispatcher="dramatiq", broker_url=feedfan_amqp_url)
    _walk_the_runbook(harness, monkeypatch, capsys, old, new)
