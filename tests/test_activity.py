"""Activities: ids, sort keys, validation at the call site, the JSON codec."""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from feedfan import Activity, ActivityError, PayloadError, decode_activity, encode_activity
from feedfan.activity import (
    ACTIVITY_ID_PATTERN,
    MAX_SORT_KEY,
    check_object_id,
    check_object_ids,
)

UTC = timezone.utc


def test_the_same_fields_give_the_same_id() -> None:
    when = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    first = Activity(actor=1, verb="pin", object=9, time=when)
    second = Activity(actor=1, verb="pin", object=9, time=when)
    assert first.id == second.id
    assert ACTIVITY_ID_PATTERN.match(first.id)


def test_an_int_and_a_str_id_are_different_activities() -> None:
    when = datetime(2026, 3, 1, tzinfo=UTC)
    assert (
        Activity(actor=1, verb="pin", object=9, time=when).id
        != Activity(actor="1", verb="pin", object=9, time=when).id
    )


def test_ids_sort_by_time_to_the_microsecond() -> None:
    # Given two activities one microsecond apart
    base = datetime(2026, 3, 1, tzinfo=UTC)
    early = Activity(actor=2, verb="pin", object=1, time=base)
    late = Activity(actor=1, verb="pin", object=1, time=base + timedelta(microseconds=1))
    # Then both the id and the sort key order them by time
    assert early.id < late.id
    assert late.sort_key - early.sort_key == 1


def test_the_sort_key_survives_a_redis_score_exactly() -> None:
    # A Redis score is a double: the key must round-trip through float unchanged.
    latest = Activity(actor=1, verb="pin", object=1, time=datetime(2255, 6, 4, tzinfo=UTC))
    assert latest.sort_key < MAX_SORT_KEY
    assert int(float(latest.sort_key)) == latest.sort_key
    assert int(float(latest.sort_key + 1)) == latest.sort_key + 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"actor": 1, "verb": "pin"}, "missing required field(s) object"),
        (
            {"actor": 1.5, "verb": "pin", "object": 2},
            "Activity.actor must be a str or int id, got 1.5 (float)",
        ),
        (
            {"actor": True, "verb": "pin", "object": 2},
            "Activity.actor must be a str or int id, got True (bool)",
        ),
        (
            {"actor": 1, "verb": "pin", "object": None},
            "Activity.object must be a str or int id, got None",
        ),
        (
            {"actor": 1, "verb": "pin", "object": 2, "target": [3]},
            "Activity.target must be a str or int id",
        ),
        ({"actor": "", "verb": "pin", "object": 2}, "Activity.actor must be a non-empty string"),
        ({"actor": 1, "verb": "", "object": 2}, "Activity.verb must be a non-empty str"),
        (
            {"actor": 1, "verb": "pin", "object": 2, "time": datetime(2026, 1, 1)},
            "must be timezone-aware, got naive",
        ),
        (
            {"actor": 1, "verb": "pin", "object": 2, "time": "2026-01-01"},
            "Activity.time must be a timezone-aware datetime",
        ),
        (
            {
                "actor": 1,
                "verb": "pin",
                "object": 2,
                "extra": {"at": datetime(2026, 1, 1, tzinfo=UTC)},
            },
            "Activity.extra['at'] must be a JSON value",
        ),
        (
            {"actor": 1, "verb": "pin", "object": 2, "extra": {"tags": ["a", {1, 2}]}},
            "Activity.extra['tags'][1] must be a JSON value",
        ),
        (
            {"actor": 1, "verb": "pin", "object": 2, "extra": {"x": float("nan")}},
            "NaN and infinity are not JSON",
        ),
        ({"actor": 1, "verb": "pin", "object": 2, "extra": {1: "a"}}, "keys must be str"),
        (
            {"actor": 1, "verb": "pin", "object": 2, "time": datetime(1969, 1, 1, tzinfo=UTC)},
            "between 1970-01-01 and 2255-06-05",
        ),
    ],
)
def test_bad_input_names_the_field_the_value_and_what_is_expected(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ActivityError) as raised:
        Activity(**fields)  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_the_codec_round_trips_every_field() -> None:
    activity = Activity(
        actor="u:1",
        verb="comment",
        object=77,
        target="board:9",
        time=datetime(2026, 5, 4, 3, 2, 1, 999, tzinfo=timezone(timedelta(hours=2))),
        extra={"text": "héllo", "n": [1, 2.5, None, True]},
    )
    text = encode_activity(activity)
    assert '"v":1' in text
    assert decode_activity(text) == activity
    assert decode_activity(text.encode()).id == activity.id


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope", "not JSON"),
        ("[1]", "must be a JSON object"),
        ('{"v": 2}', "version 2"),
        ('{"v": 1, "actor": 1}', "lacks field(s) ['object', 'time', 'verb']"),
        (
            '{"v": 1, "actor": 1, "verb": "pin", "object": 2, "time": "2026-01-01T00:00:00"}',
            "timezone-aware",
        ),
        (
            '{"v": 1, "id": "00000000000000000000000000", "actor": 1, "verb": "pin", "object": 2, '
            '"time": "2026-01-01T00:00:00+00:00"}',
            "does not match its fields",
        ),
    ],
)
def test_decoding_a_bad_body_says_why(text: str, message: str) -> None:
    with pytest.raises(PayloadError) as raised:
        decode_activity(text)
    assert message in str(raised.value)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
ids = st.integers(-(2**62), 2**62) | st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_characters="\x7f"),
    min_size=1,
    max_size=30,
)


@given(
    actor=ids,
    obj=ids,
    verb=st.text(min_size=1, max_size=20),
    micros=st.integers(0, MAX_SORT_KEY - 1),
    extra=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
)
def test_any_valid_activity_round_trips_through_the_codec(
    actor: object, obj: object, verb: str, micros: int, extra: dict[str, object]
) -> None:
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    activity = Activity(actor=actor, verb=verb, object=obj, time=when, extra=extra)  # type: ignore[arg-type]
    decoded = decode_activity(encode_activity(activity))
    assert decoded.id == activity.id
    assert decoded.sort_key == micros


@given(st.binary(max_size=200) | st.text(max_size=200))
def test_decoding_arbitrary_input_raises_payload_error_or_succeeds(raw: bytes | str) -> None:
    with contextlib.suppress(PayloadError):
        decode_activity(raw)


@pytest.mark.parametrize(
    ("ids", "bad"),
    [
        ([1, 2, True, 4], "True (bool)"),
        ([1, 2**63, 3], str(2**63)),
        ([-(2**63), 1], str(-(2**63))),
        (["a", "", "c"], "'' (str)"),
        (["a", "b\nc"], "'b\\nc' (str)"),
        (["a", "x" * 257], "..."),
        ([1, "a", 2.5], "2.5 (float)"),
        (["a", b"b"], "b'b' (bytes)"),
    ],
)
def test_a_batch_of_ids_fails_on_the_first_bad_one_with_its_own_message(
    ids: list[object], bad: str
) -> None:
    with pytest.raises(ActivityError) as batch:
        check_object_ids("follower id", ids)
    with pytest.raises(ActivityError) as one:
        for value in ids:
            check_object_id("follower id", value)
    assert str(batch.value) == str(one.value)
    assert bad in str(batch.value) or bad in str(one.value)


@pytest.mark.parametrize(
    "ids",
    [
        [],
        list(range(1000)),
        [2**63 - 1, -(2**63) + 1, 0],
        ["a", "b" * 256, "ü-é", "user:1"],
        [1, "a", 2, "b"],
    ],
)
def test_a_batch_of_good_ids_comes_back_as_a_tuple(ids: list[object]) -> None:
    assert check_object_ids("follower id", ids) == tuple(ids)
    assert check_object_ids("follower id", iter(ids)) == tuple(ids)


def test_a_batch_check_raises_the_error_asked_for() -> None:
    with pytest.raises(PayloadError, match="task field 'to' item must be"):
        check_object_ids("task field 'to' item", [1, None], error=PayloadError)


_IDS = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.text(max_size=300),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)


@given(st.lists(_IDS, max_size=20))
def test_a_batch_check_agrees_with_checking_each_id(ids: list[object]) -> None:
    def outcome(check: object) -> object:
        try:
            return check()  # type: ignore[operator]
        except ActivityError as e:
            return str(e)

    expected = outcome(lambda: tuple(check_object_id("id", value) for value in ids))
    assert outcome(lambda: check_object_ids("id", ids)) == expected
