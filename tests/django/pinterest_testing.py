"""Helpers of the Django integration tests: paths, worker environment, ``manage.py`` workers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from feedfan.config import ENV_PREFIX, SETTINGS_DOC, Settings
from feedfan.testing.harness import WorkerProcess

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parents[1] / "examples" / "pinterest"
SETTINGS_MODULE = "pinterest_test_settings"
DATABASE_VARIABLE = "PINTEREST_TEST_DB"
APP = "pins.feeds:MyStreamManager"


def worker_env(database: str) -> dict[str, str]:
    """What a process needs to set Django up as the tests did: settings, database, path."""
    paths = [str(EXAMPLE), str(HERE), os.environ.get("PYTHONPATH", "")]
    return {
        "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
        DATABASE_VARIABLE: database,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
    }


def as_feedfan_dict(settings: Settings) -> dict[str, object]:
    """``settings`` as a ``settings.FEEDFAN`` dict (unset values left out)."""
    return {
        name: getattr(settings, name)
        for name in SETTINGS_DOC
        if getattr(settings, name) is not None
    }


def clean_environ() -> dict[str, str]:
    """This process's environment without Django's or feedfan's variables."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(ENV_PREFIX)
        and name not in ("DJANGO_SETTINGS_MODULE", DATABASE_VARIABLE)
    }


def manage_py(
    *args: str, database: str, feedfan: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python manage.py ARGS`` of the example, as a user does, and capture its output."""
    env = {**clean_environ(), **worker_env(database), **(feedfan or {})}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_manage_py_worker(
    settings: Settings, *, database: str, log_path: Path, priority: str = "all"
) -> WorkerProcess:
    """``python manage.py feedfan worker`` with ``settings`` given as FEEDFAN_* variables.

    ``app`` is passed as the project writes it (``pins.feeds:MyStreamManager``);
    the management command makes the worker set Django up before loading it.
    """
    env = {
        **clean_environ(),
        **worker_env(database),
        **settings.to_env(),
        ENV_PREFIX + "APP": APP,
        "PYTHONUNBUFFERED": "1",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "feedfan", "worker", "--priority", priority],
            cwd=EXAMPLE,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return WorkerProcess(process, log_path, priority)
