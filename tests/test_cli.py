"""The feedfan command, run as a user runs it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from feedfan.cli import main


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEEDFAN_")}
    return subprocess.run(
        [sys.executable, "-m", "feedfan", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_demo_runs_on_the_embedded_default_with_no_server(tmp_path: Path) -> None:
    result = run("demo", "--activities", "40", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dispatcher 'local'" in result.stdout and "storage 'memory'" in result.stdout
    assert "newest in the timeline of user" in result.stdout
    assert "feed writes per second" in result.stdout
    failed = next(line for line in result.stdout.splitlines() if line.startswith("failed chunks"))
    assert failed.split()[-1] == "0"


def test_config_prints_each_value_with_its_source(tmp_path: Path) -> None:
    (tmp_path / "feedfan.toml").write_text("fanout_chunk_size = 250\n")
    result = run("config", "--json", cwd=tmp_path, env={"FEEDFAN_QUEUE_LOW": "mine.low"})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["fanout_chunk_size"] == {
        "value": "250",
        "source": f"{tmp_path / 'feedfan.toml'} key 'fanout_chunk_size'",
    }
    assert shown["queue_low"]["source"] == "environment variable FEEDFAN_QUEUE_LOW"
    assert shown["dispatcher"]["source"] == "default"


def test_bad_configuration_exits_2_with_one_line_naming_the_source(tmp_path: Path) -> None:
    result = run("config", cwd=tmp_path, env={"FEEDFAN_DISPATCHER": "sqs"})
    assert result.returncode == 0  # config prints what it was given; resolving happens on use
    result = run("worker", "--print", cwd=tmp_path, env={"FEEDFAN_DISPATCHER": "sqs"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown dispatcher 'sqs'; known: celery, rq, dramatiq, local, eager" in result.stderr
    result = run("config", cwd=tmp_path, env={"FEEDFAN_FANOUT_CHUNK_SIZE": "0"})
    assert result.returncode == 2
    assert "environment variable FEEDFAN_FANOUT_CHUNK_SIZE" in result.stderr


def _pasteable(line: str) -> tuple[dict[str, str], list[str]]:
    """The assignments a printed worker line starts with, and the command after them."""
    words = shlex.split(line)
    count = next(i for i, word in enumerate(words) if "=" not in word)
    return dict(w.split("=", 1) for w in words[:count]), words[count:]


def test_worker_print_gives_one_line_that_carries_the_settings_given_as_arguments(
    tmp_path: Path,
) -> None:
    # Given settings on the command line, and one from the environment
    result = run(
        *("worker", "--print", "--dispatcher", "rq", "--app", "shop.feeds:Feeds"),
        *("--broker-url", "redis://127.0.0.1:6379/3", "--priority", "high"),
        cwd=tmp_path,
        env={"FEEDFAN_QUEUE_HIGH": "pins.high"},
    )
    # Then stdout holds one line to paste, and nothing repeats it on stderr
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert "rq" not in result.stderr
    # And the line sets what the arguments said, since the worker reads its settings
    # from the environment, and the path `feedfan worker` gives it to find the app;
    # what the environment already says is left to it
    assignments, command = _pasteable(line)
    assert assignments.pop("PYTHONPATH").split(os.pathsep)[0] == str(tmp_path)
    assert assignments == {
        "FEEDFAN_APP": "shop.feeds:Feeds",
        "FEEDFAN_BROKER_URL": "redis://127.0.0.1:6379/3",
        "FEEDFAN_DISPATCHER": "rq",
    }
    assert Path(command[0]).name == "rq" and command[-1] == "pins.high"


def test_worker_print_leaves_a_password_out_and_says_which_variable_to_set(
    tmp_path: Path,
) -> None:
    # Given a broker URL with a password on the command line
    result = run(
        *("worker", "--print", "--dispatcher", "celery"),
        *("--broker-url", "amqp://feeds:s3cret@127.0.0.1:5672/feeds"),
        cwd=tmp_path,
    )
    # Then the printed line holds no password, and stderr names what to set by hand
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    assignments, _ = _pasteable(result.stdout)
    assert "FEEDFAN_BROKER_URL" not in assignments
    assert assignments["FEEDFAN_DISPATCHER"] == "celery"
    assert "FEEDFAN_BROKER_URL" in result.stderr and "password" in result.stderr


def test_a_worker_for_an_in_process_dispatcher_explains_there_is_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["worker", "--dispatcher", "local"]) == 2
    assert "runs chunks inside your own process" in capsys.readouterr().err


def test_bad_arguments_exit_2() -> None:
    with pytest.raises(SystemExit) as raised:
        main(["worker", "--priority", "urgent"])
    assert raised.value.code == 2


def test_the_console_script_finds_the_app_in_the_folder_it_runs_in(tmp_path: Path) -> None:
    # Given a project folder holding the app module, as the workers' own commands
    # (celery -A, rq worker, dramatiq) find it from there
    (tmp_path / "cwdproject.py").write_text(
        "from feedfan import Manager\n"
        "class M(Manager):\n"
        "    def get_user_follower_ids(self, user_id):\n"
        "        return {'high': range(0), 'low': range(0)}\n"
    )
    script = Path(sys.executable).with_name("feedfan")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEEDFAN_")}
    clean.pop("PYTHONPATH", None)

    # When the `feedfan` console script checks the app from there
    result = subprocess.run(
        [str(script), "check", "--app", "cwdproject:M", "--dispatcher", "local"],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Then it imports the module, as the workers do
    assert "No module named 'cwdproject'" not in result.stdout + result.stderr
    assert "app.unusable" not in result.stdout, result.stdout


@pytest.mark.parametrize("dispatcher", ["celery", "rq", "dramatiq"])
def test_feedfan_worker_with_an_app_that_does_not_import_exits_2_before_starting_the_worker(
    tmp_path: Path, dispatcher: str
) -> None:
    # Given an app setting naming a module that is not there (the wrong folder, a typo)
    argv = ["worker", "--app", "feedfan_no_such_module:M", "--dispatcher", dispatcher]

    # When `feedfan worker` is run
    result = run(*argv, cwd=tmp_path)

    # Then it says so in one line and exits 2, instead of a worker (RQ's pool restarting
    # its children without end) failing on every start or every chunk
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("feedfan worker: app='feedfan_no_such_module:M'")
    assert "Traceback" not in result.stderr
