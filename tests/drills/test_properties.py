"""Property-based tests of what a worker reads: the task codec, payload checks, adapters' guards.

They fill gaps of ``tests/test_task.py`` and ``tests/test_activity.py``:
valid tasks of every shape round-trip, every prefix of one is refused,
arbitrary and deeply nested JSON and pickles are refused with
:class:`PayloadError` and nothing else, and each adapter's own first look at
a raw message (Celery's Redis guard, RQ's job serializer, Dramatiq's
dead-letter reader) never raises on garbage. No broker is needed.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feedfan.activity import (
    MAX_SORT_KEY,
    Activity,
    ObjectId,
    decode_activity,
    encode_activity,
)
from feedfan.errors import ActivityError, PayloadError
from feedfan.fanout import plan_chunks
from feedfan.priority import FanoutPriority
from feedfan.task import ChunkTask, PlanTask, Task, decode_task, make_fanout_id

# Strategies ------------------------------------------------------------------

object_ids = st.integers(-(2**63) + 1, 2**63 - 1) | st.text(
    alphabet=st.characters(
        min_codepoint=0x20, exclude_characters="\x7f", exclude_categories=["Cs"]
    ),
    min_size=1,
    max_size=40,
)
feed_names = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
sort_keys = st.integers(0, MAX_SORT_KEY - 1)
entries = sort_keys.flatmap(
    lambda key: st.from_regex(r"[0-9a-f]{10}", fullmatch=True).map(
        lambda digest: (f"{key:016d}{digest}", key)
    )
)
fanout_ids = st.from_regex(r"[0-9a-f]{24}", fullmatch=True)
priorities = st.sampled_from(list(FanoutPriority))

chunk_tasks = st.builds(
    ChunkTask,
    op=st.sampled_from(["add", "remove"]),
    feeds=st.lists(feed_names, min_size=1, max_size=4, unique=True).map(tuple),
    entries=st.lists(entries, min_size=1, max_size=5).map(tuple),
    followers=st.lists(object_ids, min_size=1, max_size=20).map(tuple),
    fanout_id=fanout_ids,
    priority=priorities,
    index=st.integers(0, 2**31 - 1),
)
plan_tasks = st.builds(
    PlanTask,
    op=st.sampled_from(["add", "remove"]),
    feeds=st.lists(feed_names, min_size=1, max_size=4, unique=True).map(tuple),
    entries=st.lists(entries, min_size=1, max_size=5).map(tuple),
    user_id=object_ids,
    fanout_id=fanout_ids,
    priority=priorities,
    chunk_size=st.integers(1, 100_000),
)
tasks: st.SearchStrategy[Task] = chunk_tasks | plan_tasks

json_documents = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["chunk", "plan", "add", "remove", "timeline", "high", "low"]),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=30,
)
nesting = st.tuples(
    st.integers(900, 60_000), st.sampled_from([("[", "]"), ('{"a":', "}")]), st.booleans()
).map(lambda t: t[1][0] * t[0] + "1" + (t[1][1] * t[0] if t[2] else ""))
"""JSON nested deeper than Python's recursion limit, closed or not."""


class _MakesDirectory:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.makedirs, (self.path,))


@contextmanager
def _no_code_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    marker = tmp_path_factory.mktemp("pickles") / "code-ran"
    yield str(marker)
    assert not marker.exists(), "a payload was unpickled"


# The task codec ----------------------------------------------------------------


@given(tasks)
def test_every_valid_task_round_trips_as_text_and_as_bytes(task: Task) -> None:
    text = task.to_json()
    assert decode_task(text) == task
    assert decode_task(text.encode("utf-8")) == task


@settings(max_examples=150)
@given(tasks, st.data())
def test_every_truncation_of_a_valid_task_is_refused(task: Task, data: st.DataObject) -> None:
    text = task.to_json()
    cut = data.draw(st.integers(0, len(text) - 1), label="cut")
    with pytest.raises(PayloadError):
        decode_task(text[:cut])


@given(json_documents)
def test_any_json_document_is_a_task_or_a_payload_error(document: object) -> None:
    try:
        task = decode_task(json.dumps(document))
    except PayloadError:
        return
    assert isinstance(task, (ChunkTask, PlanTask))


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(nesting)
def test_json_nested_past_the_recursion_limit_is_a_payload_error(text: str) -> None:
    # Given a document deeper than Python's json module can parse
    # When a worker decodes it, as text or bytes, bare or inside a task-shaped object
    for raw in (text, text.encode(), '{"v":1,"kind":"chunk","x":' + text + "}"):
        # Then it is refused like any other malformed task, not with a RecursionError
        with pytest.raises(PayloadError):
            decode_task(raw)


@settings(max_examples=60)
@given(
    st.sampled_from(range(pickle.HIGHEST_PROTOCOL + 1)),
    json_documents | st.just("directory"),
)
def test_a_pickle_is_refused_and_never_loaded(
    tmp_path_factory: pytest.TempPathFactory, protocol: int, content: object
) -> None:
    with _no_code_runs(tmp_path_factory) as marker:
        target = _MakesDirectory(marker) if content == "directory" else content
        with pytest.raises(PayloadError):
            decode_task(pickle.dumps(target, protocol=protocol))


@given(chunk_tasks, st.integers(1, 5))
def test_a_chunk_over_the_size_limit_is_refused_before_it_is_parsed(
    task: ChunkTask, slack: int
) -> None:
    raw = task.to_json().encode()
    with pytest.raises(PayloadError, match="max_task_bytes"):
        decode_task(raw, max_bytes=max(len(raw) - slack, 0))


@pytest.mark.parametrize("escaped", ["\\ud800", "\\udfff", "a\\udc80b"])
def test_a_follower_id_holding_a_lone_surrogate_is_refused(escaped: str) -> None:
    # Given a task whose follower id decodes to a lone surrogate, which no UTF-8 text holds
    body = ChunkTask(
        "add", ("timeline",), ((f"{1:016d}abcdef0123", 1),), ("x",), "0" * 24, FanoutPriority.LOW, 0
    ).to_json()
    # When a worker decodes it, then it is refused (it could be no Redis key, no JSON reply)
    with pytest.raises(PayloadError, match="printable"):
        decode_task(body.replace('"x"', f'"{escaped}"'))


def test_a_lone_surrogate_id_is_refused_where_the_activity_is_built() -> None:
    with pytest.raises(ActivityError, match=r"Activity\.actor"):
        Activity(actor="user\ud800", verb="pin", object=1)


# Activities ------------------------------------------------------------------------


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(nesting)
def test_an_activity_body_nested_past_the_recursion_limit_is_a_payload_error(text: str) -> None:
    with pytest.raises(PayloadError):
        decode_activity(text)


@given(st.integers(0, MAX_SORT_KEY - 1), st.data())
def test_every_truncation_of_an_activity_body_is_refused(micros: int, data: st.DataObject) -> None:
    when = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=micros)
    text = encode_activity(Activity(actor="a", verb="pin", object=1, time=when))
    cut = data.draw(st.integers(0, len(text) - 1), label="cut")
    with pytest.raises(PayloadError):
        decode_activity(text[:cut])


# Planning ------------------------------------------------------------------------


@given(
    st.lists(object_ids, max_size=60),
    st.lists(object_ids, max_size=60),
    st.integers(1, 25),
)
def test_chunks_cover_every_follower_once_high_first_with_contiguous_indexes(
    high: list[ObjectId], low: list[ObjectId], size: int
) -> None:
    entry = (f"{1:016d}abcdef0123", 1)
    chunks = list(
        plan_chunks(
            op="add",
            feeds=("timeline",),
            entries=[entry],
            followers={FanoutPriority.LOW: iter(low), FanoutPriority.HIGH: iter(high)},
            chunk_size=size,
            fanout_id="0" * 24,
        )
    )
    for priority, ids in ((FanoutPriority.HIGH, high), (FanoutPriority.LOW, low)):
        mine = [chunk for chunk in chunks if chunk.priority is priority]
        assert [f for chunk in mine for f in chunk.followers] == ids
        assert [chunk.index for chunk in mine] == list(range(len(mine)))
        assert all(1 <= len(chunk.followers) <= size for chunk in mine)
    assert [c.priority for c in chunks] == sorted(
        (c.priority for c in chunks), key=lambda p: p is FanoutPriority.LOW
    )


@given(
    st.sampled_from(["add", "remove"]),
    object_ids,
    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=5),
    st.lists(feed_names, min_size=1, max_size=4),
    st.randoms(use_true_random=False),
)
def test_the_fanout_id_ignores_order_so_a_retry_gets_the_same_chunk_ids(
    op: str, user: ObjectId, activity_ids: list[str], feeds: list[str], rng: random.Random
) -> None:
    shuffled_ids, shuffled_feeds = list(activity_ids), list(feeds)
    rng.shuffle(shuffled_ids)
    rng.shuffle(shuffled_feeds)
    assert make_fanout_id(op, user, activity_ids, feeds) == make_fanout_id(
        op, user, shuffled_ids, shuffled_feeds
    )


# The adapters' first look at raw broker messages ------------------------------------

raw_messages = (
    st.binary(max_size=400)
    | json_documents.map(lambda d: json.dumps(d).encode())
    | nesting.map(str.encode)
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(raw_messages)
def test_celerys_redis_guard_judges_any_list_item_without_raising(raw: bytes) -> None:
    pytest.importorskip("celery")
    from feedfan.backends._celery_guard import envelope_problem

    # A list item the guard cannot judge would stop the worker ("Unrecoverable error").
    problem = envelope_problem(raw)
    assert problem is None or problem.startswith("not a kombu message")


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(raw_messages)
def test_rqs_job_serializer_reads_json_or_raises_payload_error(raw: bytes) -> None:
    pytest.importorskip("rq")
    from feedfan.backends._rq_jobs import JSONJobSerializer, job_body

    with suppress(PayloadError):
        JSONJobSerializer.loads(raw)
    # What `failed_messages` shows of a failed job must never raise either.
    assert isinstance(job_body(raw), str)


@settings(max_examples=60)
@given(st.sampled_from(range(pickle.HIGHEST_PROTOCOL + 1)), st.booleans())
def test_rqs_job_serializer_never_unpickles(
    tmp_path_factory: pytest.TempPathFactory, protocol: int, compressed: bool
) -> None:
    pytest.importorskip("rq")
    import zlib

    from feedfan.backends._rq_jobs import JSONJobSerializer, job_body

    with _no_code_runs(tmp_path_factory) as marker:
        data = pickle.dumps((_MakesDirectory(marker), None, (), {}), protocol=protocol)
        with pytest.raises(PayloadError):
            JSONJobSerializer.loads(data)
        job_body(zlib.compress(data) if compressed else data)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(raw_messages)
def test_dramatiqs_dead_letter_reader_explains_any_message_without_raising(raw: bytes) -> None:
    pytest.importorskip("dramatiq")
    from feedfan.backends._dramatiq_queues import read_dead_letter

    letter = read_dead_letter("q", raw, at=None, broker_reason="rejected")
    assert letter.reason
    assert isinstance(letter.shown_body, str)


def test_the_marker_helper_would_notice_a_pickle_that_ran(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Guards the guard: unpickling the marker object does create the directory.
    marker = Path(tmp_path_factory.mktemp("control")) / "ran"
    pickle.loads(pickle.dumps(_MakesDirectory(str(marker))))
    assert marker.exists()
