"""The pinterest example's flows on real workers started with ``manage.py feedfan worker``.

Each backend gets one worker for the module, started the way the example's
README starts it, with a namespace (key prefix, queue names) of its own;
``eager`` runs the same flows in the test process, with no worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import transaction
from django.test import Client
from pins import services
from pins.models import Follow, Pin
from pinterest_testing import APP, as_feedfan_dict, start_manage_py_worker

from feedfan import Manager, Settings
from feedfan.contrib.django import DeferredFanoutReceipt, get_manager
from feedfan.dispatch import resolve_dispatcher_class
from feedfan.fanout import FanoutReceipt
from feedfan.storage.redis import RedisStorage
from feedfan.task import Task
from feedfan.testing.harness import Harness, WorkerProcess, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.django_db(transaction=True)]

# (dispatcher, broker): the feeds are always in Redis.
BACKENDS = {
    "eager": ("eager", "redis"),
    "rq": ("rq", "redis"),
    "celery-redis": ("celery", "redis"),
    "celery-amqp": ("celery", "amqp"),
    "dramatiq": ("dramatiq", "redis"),
}
SETTLE = 120.0


@dataclass
class Deployment:
    """One backend's namespace, and its worker when it has one."""

    backend: str
    settings: Settings
    worker: WorkerProcess | None
    harness: Harness

    def logs(self) -> str:
        """The worker's log tail, for a failing assertion."""
        return self.harness.worker_logs() if self.worker else "(no worker: in-process)"


@dataclass
class Sent:
    """Tasks the manager handed to its queue library during a test."""

    tasks: list[Task] = field(default_factory=list)

    @property
    def fanouts(self) -> set[str]:
        """The distinct fanout ids of the tasks sent."""
        return {task.fanout_id for task in self.tasks}


@pytest.fixture(scope="module", params=list(BACKENDS.values()), ids=list(BACKENDS))
def deployment(
    request: pytest.FixtureRequest,
    feedfan_redis_url: str,
    test_database: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    """A backend with one worker started by ``manage.py feedfan worker`` (none for eager)."""
    backend, broker = request.param
    broker_url = request.getfixturevalue("feedfan_amqp_url") if broker == "amqp" else None
    log_dir: Path = tmp_path_factory.mktemp(f"django-{backend}-{broker}")
    harness = Harness(backend, log_dir=log_dir, redis_url=feedfan_redis_url, broker_url=broker_url)
    settings = harness.settings(app=APP)
    worker = None
    if not harness.in_process:
        worker = start_manage_py_worker(
            settings, database=test_database, log_path=log_dir / "manage-py-worker.log"
        )
        harness.workers.append(worker)
    try:
        yield Deployment(backend, settings, worker, harness)
    finally:
        harness.close()
        dispatcher = resolve_dispatcher_class(backend)(settings)
        try:
            dispatcher.purge()
        finally:
            dispatcher.close()


@pytest.fixture
def manager(deployment: Deployment, settings: Any) -> Iterator[Manager]:
    """The project's manager (``get_manager()``) on the deployment's namespace."""
    settings.FEEDFAN = as_feedfan_dict(deployment.settings)
    built = get_manager()
    try:
        yield built
    finally:
        built.storage.clear()


@pytest.fixture
def sent(manager: Manager) -> Iterator[Sent]:
    """Record every task the manager's dispatcher sends (it still sends them)."""
    record = Sent()
    dispatcher = manager.dispatcher
    publish, publish_many = dispatcher.publish, dispatcher.publish_many

    batch: list[bool] = []  # non-empty while a batch is sent (it may call publish)

    def publish_spy(task: Task, body: str) -> None:
        publish(task, body)
        if not batch:
            record.tasks.append(task)

    def publish_many_spy(items: Any) -> None:
        batch.append(True)
        try:
            publish_many(items)
        finally:
            batch.pop()
        record.tasks.extend(task for task, _ in items)

    dispatcher.publish, dispatcher.publish_many = publish_spy, publish_many_spy  # type: ignore[method-assign]
    try:
        yield record
    finally:
        del dispatcher.publish, dispatcher.publish_many


@pytest.fixture
def network() -> dict[str, User]:
    """alice is followed by bob (active, HIGH) and carol (inactive, LOW); dave follows nobody."""
    now = datetime.now(timezone.utc)
    users = {
        "alice": User.objects.create(username="alice", last_login=now),
        "bob": User.objects.create(username="bob", last_login=now),
        "carol": User.objects.create(username="carol", last_login=now - timedelta(days=90)),
        "dave": User.objects.create(username="dave"),
    }
    Follow.objects.create(follower=users["bob"], target=users["alice"])
    Follow.objects.create(follower=users["carol"], target=users["alice"])
    return users


def _settle(manager: Manager, receipt: FanoutReceipt | str, deployment: Deployment) -> None:
    try:
        status = manager.wait(receipt, timeout=SETTLE)
    except Exception as e:
        raise AssertionError(f"{e}\n{deployment.logs()}") from e
    assert status.complete, f"{status}\n{deployment.logs()}"


def _timeline(manager: Manager, user: User) -> list[str]:
    return [activity_id for activity_id, _ in manager.get_feed(user.pk).entries(limit=100)]


def _feedfan_keys(manager: Manager) -> list[bytes]:
    assert isinstance(manager.storage, RedisStorage)
    return list(manager.storage.client.scan_iter(match=manager.storage.key_prefix + "*"))


def test_a_committed_pin_sends_exactly_one_fanout_to_every_follower(
    deployment: Deployment, manager: Manager, sent: Sent, network: dict[str, User]
) -> None:
    # Given alice with an active and an inactive follower
    alice = network["alice"]
    # When she posts a pin (saved and fanned out in one transaction)
    pin, receipt = services.post_pin(alice, title="Kyoto in autumn")
    # Then exactly one fanout was sent on commit: one HIGH and one LOW chunk
    assert isinstance(receipt, DeferredFanoutReceipt) and receipt.sent is not None
    assert sent.fanouts == {receipt.fanout_id}
    assert sorted(task.priority.value for task in sent.tasks) == ["high", "low"]
    assert manager.storage.recent_fanouts() == [receipt.fanout_id]
    # And the workers put the pin in both followers' timelines, and nowhere else
    _settle(manager, receipt, deployment)
    activity_id = pin.activity().id
    assert _timeline(manager, network["bob"]) == [activity_id]
    assert _timeline(manager, network["carol"]) == [activity_id]
    assert _timeline(manager, network["dave"]) == []


def test_a_rolled_back_pin_sends_nothing_and_writes_nothing(
    deployment: Deployment, manager: Manager, sent: Sent, network: dict[str, User]
) -> None:
    # Given alice saving a pin and adding its activity, in a transaction that fails
    alice = network["alice"]
    with pytest.raises(RuntimeError), transaction.atomic():
        pin = Pin.objects.create(author=alice, title="never committed")
        rolled_back = pin.activity()
        manager.add_user_activity(alice.pk, rolled_back)
        raise RuntimeError("the request failed after the pin was saved")
    # Then nothing was sent and feedfan wrote nothing at all
    assert sent.tasks == []
    assert _feedfan_keys(manager) == []
    assert not Pin.objects.exists()
    # When a later pin commits (so the worker is known to be running)
    later, receipt = services.post_pin(alice, title="committed")
    _settle(manager, receipt, deployment)
    # Then only that pin reached bob: the rolled-back one never will
    assert sent.fanouts == {receipt.fanout_id}
    assert _timeline(manager, network["bob"]) == [later.activity().id]
    assert manager.storage.get_activities([rolled_back.id]) == {}


def test_the_feed_page_shows_the_pins_of_followed_users(
    deployment: Deployment, manager: Manager, network: dict[str, User]
) -> None:
    # Given alice pinning through the feed page's form
    client = Client()
    response = client.post("/u/alice/", {"title": "Sourdough, day 3"})
    assert response.status_code == 302
    [fanout_id] = manager.storage.recent_fanouts()
    _settle(manager, fanout_id, deployment)
    # Then bob's and carol's pages show it, and dave's does not
    for follower in ("bob", "carol"):
        page = client.get(f"/u/{follower}/").content.decode()
        assert "Sourdough, day 3" in page and "pinned by alice" in page
    assert "Sourdough, day 3" not in client.get("/u/dave/").content.decode()


def test_following_and_unfollowing_from_the_page_changes_the_feed(
    deployment: Deployment, manager: Manager, network: dict[str, User]
) -> None:
    # Given a pin by alice, which dave does not see
    client = Client()
    _, receipt = services.post_pin(network["alice"], title="Lisbon trams")
    _settle(manager, receipt, deployment)
    assert "Lisbon trams" not in client.get("/u/dave/").content.decode()

    def dave_sees_it() -> bool:
        return "Lisbon trams" in client.get("/u/dave/").content.decode()

    # When dave follows alice from his page, then her pin shows up there
    assert client.post("/u/dave/follow/alice/").status_code == 302
    wait_for(dave_sees_it, timeout=SETTLE, message=f"dave's feed lacks it\n{deployment.logs()}")
    # When he unfollows her, then it goes away
    assert client.post("/u/dave/unfollow/alice/").status_code == 302
    wait_for(
        lambda: not dave_sees_it(), timeout=SETTLE, message=f"still there\n{deployment.logs()}"
    )


def test_a_deleted_pin_leaves_every_feed(
    deployment: Deployment, manager: Manager, network: dict[str, User]
) -> None:
    # Given a pin in bob's and carol's feeds
    pin, receipt = services.post_pin(network["alice"], title="to be deleted")
    _settle(manager, receipt, deployment)
    # When alice deletes it
    removal = services.delete_pin(pin)
    _settle(manager, removal, deployment)
    # Then it is gone from every feed
    assert _timeline(manager, network["bob"]) == []
    assert _timeline(manager, network["carol"]) == []
    assert manager.get_user_feed(network["alice"].pk).count() == 0


def test_the_seed_command_fills_every_followers_feed(
    deployment: Deployment, manager: Manager, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the example's sample data, created by `manage.py seed`
    call_command("seed", users=6, pins=1)
    assert "6 users" in capsys.readouterr().out
    # When every fanout has settled
    for fanout_id in manager.storage.recent_fanouts(limit=100):
        _settle(manager, fanout_id, deployment)
    # Then every follower's timeline holds exactly the pins of the people they follow
    assert Pin.objects.count() == 6
    for user in User.objects.all():
        followed = Follow.objects.filter(follower=user).values_list("target_id", flat=True)
        expected = {pin.activity().id for pin in Pin.objects.filter(author_id__in=followed)}
        assert set(_timeline(manager, user)) == expected, user.username


def test_a_worker_reads_followers_from_the_orm_with_background_planning(
    deployment: Deployment, settings: Any, network: dict[str, User]
) -> None:
    if deployment.worker is None:
        pytest.skip("eager plans in the caller's process; background planning needs a worker")
    # Given planning moved to the workers: they query the followers themselves
    settings.FEEDFAN = {**as_feedfan_dict(deployment.settings), "planning": "background"}
    manager = get_manager()
    try:
        # When alice posts a pin
        pin, receipt = services.post_pin(network["alice"], title="planned by a worker")
        # Then only the planning task was sent by the web process
        assert isinstance(receipt, DeferredFanoutReceipt) and receipt.sent is not None
        assert receipt.sent.planned_in_background
        # And the worker, with Django set up, found both followers in the database
        _settle(manager, receipt, deployment)
        status = manager.fanout_status(receipt)
        assert status is not None and status.total == 2
        for follower in ("bob", "carol"):
            assert _timeline(manager, network[follower]) == [pin.activity().id]
    finally:
        manager.storage.clear()


def test_manage_py_feedfan_worker_runs_the_backends_worker_with_django_set_up(
    deployment: Deployment,
) -> None:
    if deployment.worker is None:
        pytest.skip("eager has no worker process")
    worker = deployment.worker
    # The process manage.py started is now the queue library's own worker,
    # serving the namespace's HIGH queue before its LOW queue
    first_line = worker.log_tail(400).splitlines()[0]
    high, low = deployment.settings.queue_high, deployment.settings.queue_low
    assert worker.alive(), deployment.logs()
    assert first_line.startswith("feedfan worker: "), first_line
    assert high in first_line and first_line.index(high) < first_line.index(low), first_line
    # And its environment lets it set Django up and load the project's manager
    environ = _environ_of(worker.pid)
    assert environ["DJANGO_SETTINGS_MODULE"] == "pinterest_test_settings"
    assert environ["FEEDFAN_APP"] == "feedfan.contrib.django.loader:pins.feeds:MyStreamManager"
    assert environ["FEEDFAN_KEY_PREFIX"] == deployment.settings.key_prefix


def _environ_of(pid: int) -> dict[str, str]:
    proc = Path(f"/proc/{pid}/environ")
    if not proc.exists():
        pytest.skip("reading another process's environment needs Linux's /proc")
    pairs = (item.split("=", 1) for item in proc.read_text().split("\0") if "=" in item)
    return dict(pairs)
