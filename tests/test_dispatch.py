"""Choosing a dispatcher: built-ins, entry points, dotted paths, and clear refusals."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import metadata

import pytest

from feedfan import (
    Delivery,
    FanoutPriority,
    MissingDependencyError,
    TaskDispatcher,
    UnknownDispatcherError,
    load_settings,
)
from feedfan.dispatch import available_dispatchers, create_dispatcher, resolve_dispatcher_class
from feedfan.local import EagerDispatcher, LocalDispatcher
from feedfan.task import Task


class PluginDispatcher(TaskDispatcher):
    """A third-party dispatcher, found by dotted path or entry point."""

    name = "plugin"

    def publish(self, task: Task, body: str) -> None:
        raise NotImplementedError


def test_built_in_names_resolve_to_their_classes() -> None:
    assert resolve_dispatcher_class("local") is LocalDispatcher
    assert resolve_dispatcher_class("eager") is EagerDispatcher
    assert EagerDispatcher.delivery is Delivery.INLINE
    assert available_dispatchers()[:5] == ["celery", "rq", "dramatiq", "local", "eager"]


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownDispatcherError) as raised:
        resolve_dispatcher_class("sqs")
    assert str(raised.value).startswith(
        "unknown dispatcher 'sqs'; known: celery, rq, dramatiq, local, eager"
    )


@pytest.mark.parametrize("library", ["rq", "celery", "dramatiq"])
def test_a_known_dispatcher_without_its_library_says_which_extra_to_install(
    library: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the queue library cannot be imported
    blocked = [m for m in sys.modules if m == library or m.startswith(f"{library}.")]
    for name in blocked or [library]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in [m for m in sys.modules if m.startswith("feedfan.backends.")]:
        monkeypatch.delitem(sys.modules, name)
    # Then choosing it names the extra
    with pytest.raises(MissingDependencyError) as raised:
        resolve_dispatcher_class(library)
    assert f"pip install 'feedfan[{library}]'" in str(raised.value)


def test_a_dotted_path_names_a_third_party_dispatcher() -> None:
    assert resolve_dispatcher_class(f"{__name__}:PluginDispatcher") is PluginDispatcher
    assert resolve_dispatcher_class(f"{__name__}.PluginDispatcher") is PluginDispatcher
    with pytest.raises(
        UnknownDispatcherError, match=r"could not import dispatcher 'nowhere\.Nothing'"
    ):
        resolve_dispatcher_class("nowhere.Nothing")
    with pytest.raises(UnknownDispatcherError, match="is not a TaskDispatcher subclass"):
        resolve_dispatcher_class("feedfan.config:Settings")


def test_an_entry_point_registers_a_dispatcher_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    point = metadata.EntryPoint("plugin", f"{__name__}:PluginDispatcher", "feedfan.dispatchers")
    monkeypatch.setattr(
        metadata, "entry_points", lambda group: [point] if group == "feedfan.dispatchers" else []
    )
    assert resolve_dispatcher_class("plugin") is PluginDispatcher
    assert "plugin" in available_dispatchers()


def test_the_base_class_loop_is_the_fallback_bulk_path() -> None:
    class Recording(PluginDispatcher):
        def __init__(self) -> None:
            super().__init__(load_settings(env={}, read_files=False))
            self.bodies: list[str] = []

        def publish(self, task: Task, body: str) -> None:
            self.bodies.append(body)

    from feedfan.task import ChunkTask

    dispatcher = Recording()
    tasks = [
        ChunkTask(
            "add",
            ("timeline",),
            (("1767225600000000abcdef0123", 1767225600000000),),
            (i,),
            "a" * 24,
            FanoutPriority.HIGH,
            i,
        )
        for i in range(2500)
    ]
    assert dispatcher.enqueue_many(iter(tasks)) == 2500
    assert dispatcher.bodies == [t.to_json() for t in tasks]


def _tasks(count: int) -> list[Task]:
    from feedfan.task import ChunkTask

    entry = (("1767225600000000abcdef0123", 1767225600000000),)
    return [
        ChunkTask("add", ("timeline",), entry, (i,), "a" * 24, FanoutPriority.HIGH, i)
        for i in range(count)
    ]


class Batching(PluginDispatcher):
    """Records the size of each batch the bulk path hands over."""

    def __init__(self) -> None:
        super().__init__(load_settings(env={}, read_files=False))
        self.batches: list[int] = []

    def publish_many(self, items: Sequence[tuple[Task, str]]) -> None:
        self.batches.append(len(items))


def test_bulk_batches_start_small_so_workers_start_early_then_double() -> None:
    # Given a dispatcher with the default batch sizes
    dispatcher = Batching()
    assert (dispatcher.publish_first_batch_size, dispatcher.publish_batch_size) == (64, 1000)
    # When 3,000 tasks are sent
    assert dispatcher.enqueue_many(iter(_tasks(3000))) == 3000
    # Then the first batch is 64 tasks, each next one twice as big, up to 1,000
    assert dispatcher.batches == [64, 128, 256, 512, 1000, 1000, 40]


def test_a_dispatcher_may_send_everything_in_full_batches_from_the_start() -> None:
    class OneGo(Batching):
        publish_first_batch_size = 1000

    dispatcher = OneGo()
    assert dispatcher.enqueue_many(iter(_tasks(2500))) == 2500
    assert dispatcher.batches == [1000, 1000, 500]


def test_create_dispatcher_reads_the_setting() -> None:
    settings = load_settings({"dispatcher": "eager"}, env={}, read_files=False)
    assert isinstance(create_dispatcher(settings), EagerDispatcher)


def test_queue_names_come_from_settings_high_first() -> None:
    settings = load_settings({"queue_high": "a.hi", "queue_low": "a.lo"}, env={}, read_files=False)
    dispatcher = EagerDispatcher(settings)
    assert dispatcher.queue_names([FanoutPriority.LOW, FanoutPriority.HIGH]) == ["a.hi", "a.lo"]


def test_a_misspelt_name_suggests_the_dispatcher_it_is_close_to() -> None:
    with pytest.raises(UnknownDispatcherError) as raised:
        resolve_dispatcher_class("celerey")
    assert "Did you mean 'celery'?" in str(raised.value)
