"""Settings: every source in its place, and errors that name where a value came from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from feedfan import ConfigurationError, Settings, load_settings
from feedfan.config import SETTINGS_DOC


def test_defaults_need_no_server() -> None:
    settings = load_settings(env={}, read_files=False)
    assert settings.dispatcher == "local"
    assert settings.effective_storage == "memory"
    assert settings.fanout_chunk_size == 100
    assert (settings.queue_high, settings.queue_low) == ("feedfan.high", "feedfan.low")


def test_every_setting_has_a_documented_default_that_matches_the_dataclass() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(Settings) if f.name != "sources"}
    assert set(fields) == set(SETTINGS_DOC)
    assert fields == {
        name: getattr(load_settings(env={}, read_files=False), name) for name in fields
    }


def test_sources_apply_in_order_file_then_environment_then_arguments(tmp_path: Path) -> None:
    # Given a pyproject with [tool.feedfan], an environment and an argument
    (tmp_path / "pyproject.toml").write_text(
        '[tool.feedfan]\ndispatcher = "rq"\nfanout_chunk_size = 50\nqueue_low = "file.low"\n'
        'redis_url = "redis://127.0.0.1:6379/3"\n'
    )
    env = {"FEEDFAN_FANOUT_CHUNK_SIZE": "70", "FEEDFAN_DISPATCHER": "celery"}
    # When settings are loaded
    settings = load_settings({"dispatcher": "dramatiq"}, env=env, start=tmp_path)
    # Then each value comes from the strongest source that set it
    assert settings.dispatcher == "dramatiq"
    assert settings.sources["dispatcher"] == "argument dispatcher"
    assert settings.fanout_chunk_size == 70
    assert settings.sources["fanout_chunk_size"] == "environment variable FEEDFAN_FANOUT_CHUNK_SIZE"
    assert settings.queue_low == "file.low"
    assert settings.sources["queue_low"].endswith("pyproject.toml [tool.feedfan] key 'queue_low'")
    assert "queue_high" not in settings.sources


def test_a_feedfan_toml_is_found_from_a_subdirectory(tmp_path: Path) -> None:
    (tmp_path / "feedfan.toml").write_text("fanout_chunk_size = 250\n")
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    settings = load_settings(env={}, start=nested)
    assert settings.fanout_chunk_size == 250
    assert "feedfan.toml" in settings.sources["fanout_chunk_size"]


def test_a_bad_environment_value_names_the_variable_and_the_range() -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings(env={"FEEDFAN_FANOUT_CHUNK_SIZE": "lots"}, read_files=False)
    assert str(raised.value) == (
        "fanout_chunk_size='lots' (from environment variable FEEDFAN_FANOUT_CHUNK_SIZE) "
        "must be an integer from 1 to 100,000."
    )


def test_a_bad_file_value_names_the_file_and_the_allowed_values(tmp_path: Path) -> None:
    (tmp_path / "feedfan.toml").write_text('storage = "disk"\n')
    with pytest.raises(ConfigurationError) as raised:
        load_settings(env={}, start=tmp_path)
    message = str(raised.value)
    assert "storage='disk'" in message and "feedfan.toml key 'storage'" in message
    assert "must be one of: auto, memory, redis" in message


def test_an_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    (tmp_path / "feedfan.toml").write_text("fanout_chunksize = 5\n")
    with pytest.raises(ConfigurationError, match="Did you mean 'fanout_chunk_size'"):
        load_settings(env={}, start=tmp_path)


def test_a_broken_toml_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "feedfan.toml").write_text("dispatcher = \n")
    with pytest.raises(ConfigurationError, match="is not valid TOML"):
        load_settings(env={}, start=tmp_path)


def test_feedfan_config_names_a_file_explicitly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "prod.toml"
    config.write_text('queue_high = "prod.high"\n')
    monkeypatch.setenv("FEEDFAN_CONFIG", str(config))
    assert load_settings(env={}).queue_high == "prod.high"
    monkeypatch.setenv("FEEDFAN_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigurationError, match="names no file"):
        load_settings(env={})


def test_a_url_with_the_wrong_scheme_is_refused_with_its_password_masked() -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings({"redis_url": "amqp://user:secret@host/"}, env={}, read_files=False)
    assert "secret" not in str(raised.value)
    assert "amqp://user:***@host/" in str(raised.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"fanout_chunk_size": 500, "max_chunk_size": 100}, "is above max_chunk_size=100"),
        ({"queue_high": "q", "queue_low": "q"}, "need different queues"),
        ({"dispatcher": "rq", "storage": "memory"}, "its worker processes would not see the feeds"),
        ({"redelivery_timeout": 10, "chunk_time_limit": 10}, "must exceed chunk_time_limit=10"),
        ({"key_prefix": ""}, "must be a non-empty string without spaces"),
    ],
)
def test_inconsistent_settings_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings(values, env={}, read_files=False)
    assert message in str(raised.value)


def test_a_real_queue_stores_feeds_in_redis() -> None:
    settings = load_settings({"dispatcher": "celery"}, env={}, read_files=False)
    assert settings.effective_storage == "redis"
    assert (
        settings.effective_broker_url == settings.effective_redis_url == "redis://127.0.0.1:6379/0"
    )


def test_to_env_reproduces_the_settings_in_a_child_process() -> None:
    settings = load_settings(
        {"dispatcher": "rq", "fanout_chunk_size": 42, "app": "x.y:z"}, env={}, read_files=False
    )
    again = load_settings(env=settings.to_env(), read_files=False)
    assert again == settings


def test_describe_masks_passwords() -> None:
    settings = load_settings({"broker_url": "amqp://u:hunter2@h//"}, env={}, read_files=False)
    rows = {name: (value, source) for name, value, source in settings.describe()}
    assert rows["broker_url"] == ("amqp://u:***@h//", "argument broker_url")


def test_a_misspelt_environment_variable_is_not_ignored_in_silence() -> None:
    # Given a variable one letter away from a setting's
    env = {"FEEDFAN_FANOUT_CHUNKSIZE": "50", "FEEDFAN_DRILL_SCALE": "small"}

    # When the settings are loaded
    with pytest.warns(UserWarning) as caught:
        settings = load_settings(env=env, read_files=False)

    # Then the default stands, and a warning names the variable and the right one;
    # variables of feedfan's own tools, close to no setting, are left alone
    assert settings.fanout_chunk_size == 100
    (warning,) = caught
    message = str(warning.message)
    assert "FEEDFAN_FANOUT_CHUNKSIZE" in message
    assert "FEEDFAN_FANOUT_CHUNK_SIZE" in message
