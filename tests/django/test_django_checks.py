"""A bad settings.FEEDFAN fails Django's system checks, naming the setting and its source."""

from __future__ import annotations

from typing import Any

import pytest
from django.core import checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from pins.feeds import MyStreamManager

from feedfan import ConfigurationError
from feedfan.contrib.django import DjangoManager, get_manager, get_settings

GOOD = {"dispatcher": "eager", "storage": "memory", "app": "pins.feeds:MyStreamManager"}


def _feedfan_messages() -> list[Any]:
    return checks.run_checks(tags=["feedfan"])


def test_good_settings_pass_the_checks(settings: Any) -> None:
    # Given a valid settings.FEEDFAN; when the checks run, then feedfan reports nothing
    settings.FEEDFAN = GOOD
    assert _feedfan_messages() == []


def test_a_bad_value_is_a_check_error_naming_the_setting(settings: Any) -> None:
    # Given a chunk size of zero in settings.FEEDFAN
    settings.FEEDFAN = {**GOOD, "fanout_chunk_size": 0}
    # When `manage.py check` runs, then it fails with feedfan.E001 naming the key
    with pytest.raises(SystemCheckError) as failure:
        call_command("check")
    text = str(failure.value)
    assert "feedfan.E001" in text
    assert "fanout_chunk_size=0 (from settings.FEEDFAN['fanout_chunk_size'])" in text
    assert "must be an integer from 1 to 100,000" in text


def test_a_misspelt_setting_is_named_with_a_suggestion(settings: Any) -> None:
    # Given a typo in a key
    settings.FEEDFAN = {**GOOD, "fanout_chunksize": 50}
    # Then the check error names it and suggests the real name
    [message] = _feedfan_messages()
    assert message.id == "feedfan.E001"
    assert "unknown setting 'fanout_chunksize' (from settings.FEEDFAN['fanout_chunksize'])" in (
        message.msg
    )
    assert "Did you mean 'fanout_chunk_size'?" in message.msg


def test_settings_feedfan_that_is_not_a_dict_is_a_check_error(settings: Any) -> None:
    # Given FEEDFAN as a list by mistake
    settings.FEEDFAN = [("dispatcher", "celery")]
    # Then the check says what it must be
    [message] = _feedfan_messages()
    assert message.id == "feedfan.E001"
    assert "settings.FEEDFAN is a list; it must be a dict of feedfan settings" in message.msg


def test_an_unknown_dispatcher_is_a_check_error(settings: Any) -> None:
    # Given a dispatcher name nobody provides
    settings.FEEDFAN = {"dispatcher": "carrier-pigeon", "app": GOOD["app"]}
    # Then E002 names the value and where it came from
    [message] = _feedfan_messages()
    assert message.id == "feedfan.E002"
    assert "dispatcher='carrier-pigeon' (from settings.FEEDFAN['dispatcher'])" in message.msg


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        ("pins.nowhere:MyStreamManager", "cannot import module 'pins.nowhere'"),
        ("pins.feeds:Nobody", "module 'pins.feeds' has no 'Nobody'"),
        ("pins.feeds:ACTIVE_FOR", "is a timedelta; expected a feedfan Manager"),
        ("pins.feeds.MyStreamManager", "must look like 'package.module:manager'"),
    ],
)
def test_an_app_that_cannot_be_loaded_is_a_check_error(
    settings: Any, app: str, expected: str
) -> None:
    # Given an app path workers could not load
    settings.FEEDFAN = {**GOOD, "app": app}
    # Then E003 says why, with the source of the value
    [message] = _feedfan_messages()
    assert message.id == "feedfan.E003"
    assert expected in message.msg
    assert "settings.FEEDFAN['app']" in message.msg


def test_a_real_queue_without_an_app_is_warned_about(settings: Any) -> None:
    # Given RQ with no app: workers would not know the project's feeds
    settings.FEEDFAN = {"dispatcher": "rq", "redis_url": "redis://127.0.0.1:6379/0"}
    # Then W001 says so
    [message] = _feedfan_messages()
    assert message.id == "feedfan.W001"
    assert message.level == checks.WARNING


def test_environment_variables_win_over_settings_feedfan(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a chunk size in settings.FEEDFAN and another in the environment
    settings.FEEDFAN = {**GOOD, "fanout_chunk_size": 50}
    monkeypatch.setenv("FEEDFAN_FANOUT_CHUNK_SIZE", "70")
    # Then the environment wins, and each value says where it came from
    loaded = get_settings()
    assert loaded.fanout_chunk_size == 70
    assert loaded.sources["fanout_chunk_size"] == "environment variable FEEDFAN_FANOUT_CHUNK_SIZE"
    assert loaded.sources["dispatcher"] == "settings.FEEDFAN['dispatcher']"


def test_a_django_manager_reads_settings_feedfan_and_refuses_bad_values(settings: Any) -> None:
    # Given settings.FEEDFAN with a chunk size
    settings.FEEDFAN = {**GOOD, "fanout_chunk_size": 7}
    # When the manager is built, then it uses it
    with MyStreamManager() as manager:
        assert manager.settings.fanout_chunk_size == 7
    # And a bad value stops it with the same message as the check
    settings.FEEDFAN = {**GOOD, "queue_low": ""}
    with pytest.raises(ConfigurationError, match=r"from settings.FEEDFAN\['queue_low'\]"):
        DjangoManager()


def test_get_manager_builds_the_app_once_and_forgets_it_when_settings_change(
    settings: Any,
) -> None:
    # Given the example's settings
    settings.FEEDFAN = GOOD
    first = get_manager()
    # Then the same manager comes back, of the class `app` names
    assert isinstance(first, MyStreamManager) and get_manager() is first
    # When settings.FEEDFAN changes, then a new manager with the new values is built
    settings.FEEDFAN = {**GOOD, "fanout_chunk_size": 9}
    second = get_manager()
    assert second is not first and second.settings.fanout_chunk_size == 9
