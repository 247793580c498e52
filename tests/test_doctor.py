"""`feedfan check` and `feedfan status` on the embedded default and on Redis."""

from __future__ import annotations

import uuid

import pytest
import redis

from feedfan import Activity, FanoutPriority, load_settings
from feedfan.cli import main
from feedfan.doctor import run_checks
from feedfan.status import gather_status, recent_fanouts
from feedfan.testing.managers import ConformanceManager, make_user


def codes(findings: list) -> dict[str, str]:  # type: ignore[type-arg]
    return {f.code: f.level for f in findings}


def test_an_unreachable_feed_redis_is_an_error_with_a_fix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = load_settings({"redis_url": "redis://127.0.0.1:1/0"}, env={}, read_files=False)
    findings = run_checks(settings)
    assert codes(findings)["storage.unreachable"] == "error"
    assert main(["check", "--redis-url", "redis://:pw@127.0.0.1:1/0"]) == 1
    out = capsys.readouterr().out
    assert "ERROR    storage.unreachable" in out and "pw" not in out
    assert "fix: start Redis or fix redis_url (FEEDFAN_REDIS_URL)." in out


def test_a_feed_redis_shared_with_other_data_is_flagged(feedfan_redis_url: str) -> None:
    client = redis.Redis.from_url(feedfan_redis_url)
    other = f"session:{uuid.uuid4().hex}"
    client.set(other, "x")
    try:
        settings = load_settings(
            {"redis_url": feedfan_redis_url, "key_prefix": "ffdoc:"}, env={}, read_files=False
        )
        findings = {f.code: f for f in run_checks(settings)}
        assert findings["storage.shared"].level == "warning"
        assert repr(other) in findings["storage.shared"].message
        assert "database of its own" in findings["storage.shared"].fix
    finally:
        client.delete(other)


def test_the_local_dispatcher_on_redis_warns_that_queued_chunks_die_with_the_process(
    feedfan_redis_url: str,
) -> None:
    settings = load_settings(
        {"redis_url": feedfan_redis_url, "key_prefix": "ffdoc:"}, env={}, read_files=False
    )
    assert codes(run_checks(settings))["dispatcher.local"] == "warning"


def test_status_shows_recent_fanouts_with_their_progress(
    feedfan_redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"ffst-{uuid.uuid4().hex[:6]}:"
    manager = ConformanceManager(
        dispatcher="eager", redis_url=feedfan_redis_url, key_prefix=prefix, fanout_chunk_size=2
    )
    try:
        user = make_user("st", 3, 1)
        receipt = manager.add_user_activity(user, Activity(actor=user, verb="pin", object=1))
        settings = manager.settings
        fanouts = recent_fanouts(settings)
        assert [(f.fanout_id, f.done, f.total) for f in fanouts] == [(receipt.fanout_id, 3, 3)]
        assert [b.dispatcher for b in gather_status(settings, every_backend=False)] == ["eager"]
        assert (
            main(
                [
                    "status",
                    "--dispatcher",
                    "eager",
                    "--redis-url",
                    feedfan_redis_url,
                    "--key-prefix",
                    prefix,
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert f"{receipt.fanout_id}  add" in out and "3/3 chunks, 0 failed  done" in out
    finally:
        manager.storage.clear()
        manager.close()


def test_status_lists_kept_failures_with_their_reasons(
    feedfan_redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"ffst-{uuid.uuid4().hex[:6]}:"
    manager = ConformanceManager(dispatcher="eager", redis_url=feedfan_redis_url, key_prefix=prefix)
    try:
        manager.dispatcher.push_raw(FanoutPriority.HIGH, b"not json")
        assert (
            main(
                [
                    "status",
                    "--dispatcher",
                    "eager",
                    "--redis-url",
                    feedfan_redis_url,
                    "--key-prefix",
                    prefix,
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "failed or rejected, kept: 1" in out
        assert "[feedfan.high] task is not JSON" in out
    finally:
        manager.storage.clear()
        manager.close()
