"""``manage.py feedfan``: feedfan's command with the project's settings.FEEDFAN."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from typing import Any

import pytest
from django.core.management import call_command
from pinterest_testing import EXAMPLE, clean_environ, manage_py, worker_env

from feedfan.contrib.django.loader import project_root


def test_config_shows_values_from_settings_feedfan_with_their_source(
    settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a chunk size in settings.FEEDFAN
    settings.FEEDFAN = {"dispatcher": "eager", "storage": "memory", "fanout_chunk_size": 33}
    # When `manage.py feedfan config --json` runs
    call_command("feedfan", "config", "--json")
    # Then it reports the value and where it came from
    shown = json.loads(capsys.readouterr().out)
    assert shown["fanout_chunk_size"] == {
        "value": "33",
        "source": "settings.FEEDFAN['fanout_chunk_size']",
    }


def test_djangos_own_settings_option_is_not_passed_to_feedfan(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given --settings after the feedfan command (Django has already applied it)
    call_command("feedfan", "config", "--settings=pinterest_test_settings", "--json")
    # Then feedfan's parser never sees it, and the command runs
    assert "dispatcher" in json.loads(capsys.readouterr().out)


def test_worker_print_shows_the_configured_queue_librarys_worker(
    settings: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given RQ in settings.FEEDFAN, and the variable manage.py always sets
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "pinterest_test_settings")
    settings.FEEDFAN = {
        "dispatcher": "rq",
        "redis_url": "redis://127.0.0.1:6379/9",
        "queue_high": "pins.high",
        "queue_low": "pins.low",
        "app": "pins.feeds:MyStreamManager",
    }
    before = dict(os.environ)
    # When the worker command is only printed
    call_command("feedfan", "worker", "--print", "--priority", "high")
    # Then it is RQ's worker on the HIGH queue alone
    printed = capsys.readouterr().out.strip()
    words = shlex.split(printed)
    count = next(i for i, word in enumerate(words) if "=" not in word)
    command = words[count:]
    assert command[1] == "worker-pool" and command[-1] == "pins.high"
    assert "pins.low" not in command
    # And the line carries what the worker reads from its environment and a shell lacks:
    # settings.FEEDFAN, Django's settings module and the project's path
    assignments = dict(w.split("=", 1) for w in words[:count])
    assert assignments["FEEDFAN_DISPATCHER"] == "rq"
    assert assignments["FEEDFAN_QUEUE_HIGH"] == "pins.high"
    assert assignments["FEEDFAN_APP"].endswith("MyStreamManager")
    assert assignments["DJANGO_SETTINGS_MODULE"] == "pinterest_test_settings"
    assert "PYTHONPATH" in assignments
    # And the environment prepared for the worker did not leak into this process
    assert dict(os.environ) == before


def test_a_failing_feedfan_command_exits_with_its_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given the test settings (eager: chunks run in-process, there is no worker)
    # When a worker is asked for, then the command exits 2 saying why
    with pytest.raises(SystemExit) as exit_info:
        call_command("feedfan", "worker")
    assert exit_info.value.code == 2
    assert "has no separate worker" in capsys.readouterr().err


def test_manage_py_check_fails_on_a_bad_feedfan_value(test_database: str) -> None:
    # Given a bad chunk size in the environment of a real manage.py
    result = manage_py(
        "check", database=test_database, feedfan={"FEEDFAN_FANOUT_CHUNK_SIZE": "zero"}
    )
    # Then `manage.py check` fails and names the setting and its source
    assert result.returncode == 1, result.stdout + result.stderr
    assert "feedfan.E001" in result.stderr
    assert "fanout_chunk_size='zero' (from environment variable FEEDFAN_FANOUT_CHUNK_SIZE)" in (
        result.stderr
    )


def test_manage_py_feedfan_help_lists_feedfans_own_options(test_database: str) -> None:
    # When a user asks a subcommand for help, then feedfan's parser answers, named for manage.py
    result = manage_py("feedfan", "worker", "--help", database=test_database)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: manage.py feedfan worker")
    assert "--priority {high,low,all}" in result.stdout


def test_the_loader_says_what_to_do_without_django_settings_module() -> None:
    # Given a worker environment without DJANGO_SETTINGS_MODULE
    code = (
        "from feedfan.config import load_settings\n"
        "from feedfan.runner import load_app\n"
        "load_app('feedfan.contrib.django.loader:pins.feeds:MyStreamManager', load_settings())\n"
    )
    env = {**clean_environ(), "PYTHONPATH": str(EXAMPLE)}
    # When it loads a prefixed app
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    # Then it fails saying how workers should be started
    assert result.returncode != 0
    assert "DJANGO_SETTINGS_MODULE is not set" in result.stderr
    assert "python manage.py feedfan worker" in result.stderr


def test_the_loader_sets_django_up_before_importing_the_manager(test_database: str) -> None:
    # Given a fresh process with the settings module, as a worker gets it
    code = (
        "from feedfan.config import load_settings\n"
        "from feedfan.runner import load_app\n"
        "m = load_app('feedfan.contrib.django.loader:pins.feeds:MyStreamManager', load_settings())\n"
        "print(type(m).__name__, sorted(m.registered_feeds))\n"
    )
    env = {
        **clean_environ(),
        **worker_env(test_database),
        "FEEDFAN_DISPATCHER": "eager",
        "FEEDFAN_STORAGE": "memory",
    }
    # When it loads the project's manager, then Django was set up first
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MyStreamManager ['timeline']"


def test_the_project_root_is_found_from_the_settings_module() -> None:
    # The directory a worker needs on its path to import the settings module
    assert project_root("pinterest.settings") == EXAMPLE
    assert project_root("no_such_module_anywhere") is None
