"""The wire format: what a worker accepts, and why it refuses the rest."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedfan import FanoutPriority, PayloadError
from feedfan.task import ChunkTask, PlanTask, decode_task, make_fanout_id

ACT = ("1767225600000000abcdef0123", 1767225600000000)


def chunk(**changes: Any) -> ChunkTask:
    fields: dict[str, Any] = {
        "op": "add",
        "feeds": ("timeline",),
        "entries": (ACT,),
        "followers": (1, "two"),
        "fanout_id": "a" * 24,
        "priority": FanoutPriority.LOW,
        "index": 3,
    }
    fields.update(changes)
    return ChunkTask(**fields)


def body(**changes: Any) -> str:
    data = json.loads(chunk().to_json())
    data.update(changes)
    return json.dumps(data)


def test_a_chunk_round_trips_and_keeps_its_deterministic_id() -> None:
    task = chunk()
    assert decode_task(task.to_json()) == task
    assert task.task_id == f"feedfan-{'a' * 24}-low-3"
    assert task.chunk_key == "low:3"


def test_a_plan_task_round_trips() -> None:
    plan = PlanTask("remove", ("timeline",), (ACT,), "user-7", "b" * 24, FanoutPriority.HIGH, 250)
    assert decode_task(plan.to_json().encode()) == plan


def test_a_plan_task_carries_the_producers_chunk_size() -> None:
    plan = json.loads(
        PlanTask("add", ("timeline",), (ACT,), 7, "b" * 24, FanoutPriority.HIGH, 40).to_json()
    )
    assert plan["size"] == 40
    plan["size"] = 0
    with pytest.raises(
        PayloadError, match="plan task chunk size 0 must be an int from 1 to 100,000"
    ):
        decode_task(json.dumps(plan))


def test_the_fanout_id_is_deterministic_and_order_free() -> None:
    assert make_fanout_id("add", 1, ["x", "y"], ["b", "a"]) == make_fanout_id(
        "add", 1, ["y", "x"], ["a", "b"]
    )
    assert make_fanout_id("add", 1, ["x"], ["a"]) != make_fanout_id("remove", 1, ["x"], ["a"])


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x80\x04\x95", "not UTF-8 text (is it pickled?)"),
        (pickle.dumps({"v": 1}), "not UTF-8 text"),
        ("not json", "not JSON"),
        ("[1, 2]", "must be a JSON object"),
        (body(v=2), "version 2"),
        (body(kind="exec"), "kind 'exec' is unknown"),
        (body(op="drop"), "operation 'drop' is unknown"),
        (body(feeds=[]), "'feeds' must be a non-empty list"),
        (body(feeds=["Time Line"]), "not a feed name"),
        (body(feeds=["a", "a"]), "names a feed twice"),
        (body(acts=[["x", 1]]), "is not an activity id"),
        (body(acts=[[ACT[0], ACT[1] + 1]]), "not its own"),
        (body(acts=[[ACT[0], "1"]]), "expected an int below 2**53"),
        (body(to=[1.5]), "must be a str or int id"),
        (body(to=[True]), "must be a str or int id"),
        (body(to="abc"), "'to' must be a non-empty list"),
        (body(fanout="../../etc"), "not 24 hex digits"),
        (body(prio="urgent"), "priority must be 'high' or 'low'"),
        (body(idx=-1), "index -1"),
        (body(extra=1), "has unknown ['extra']"),
        (json.dumps({"v": 1, "kind": "chunk"}), "lacks ["),
    ],
)
def test_a_malformed_task_is_refused_with_its_reason(raw: str | bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as raised:
        decode_task(raw)
    assert reason in str(raised.value)


def test_a_task_over_the_size_limit_is_refused_before_parsing() -> None:
    with pytest.raises(PayloadError, match="max_task_bytes is 100"):
        decode_task(chunk(followers=tuple(range(100))).to_json().encode(), max_bytes=100)


def test_a_huge_follower_list_is_refused() -> None:
    with pytest.raises(PayloadError, match="at most 100,000 are allowed"):
        decode_task(body(to=list(range(100_001))), max_bytes=10**8)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_as_payload_errors(raw: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_task(raw)


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
mutations = st.dictionaries(
    st.sampled_from(["v", "kind", "op", "feeds", "acts", "to", "fanout", "prio", "idx", "x"]),
    scalars | st.lists(scalars | st.lists(scalars, max_size=3), max_size=3),
    min_size=1,
    max_size=4,
)


@settings(max_examples=500)
@given(mutations)
def test_mutating_fields_of_a_valid_task_never_escapes_payload_error(
    changes: dict[str, object],
) -> None:
    raw = body(**changes)
    try:
        task = decode_task(raw)
    except PayloadError:
        return
    # Whatever got through is a well-typed chunk.
    assert isinstance(task, ChunkTask)
    assert all(isinstance(f, (str, int)) and not isinstance(f, bool) for f in task.followers)
