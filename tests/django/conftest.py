"""pytest-django, for the tests in this directory only.

Django is set up here with the tests' own settings module
(``pinterest_test_settings``, the pinterest example on a test database), not
in the top-level pytest configuration. ``DJANGO_SETTINGS_MODULE`` is set only
while Django reads it, so worker processes that other tests start never
inherit it (Celery would set Django up in them); workers these tests start get
it explicitly (``pinterest_testing.worker_env``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from feedfan.testing.plugin import in_ci

for _needed, _install in (("django", "feedfan[django]"), ("pytest_django", "pytest-django")):
    try:
        __import__(_needed)
    except ImportError:
        _why = f"the Django integration tests need {_needed!r}: pip install '{_install}'"
        if in_ci():
            raise RuntimeError(_why + " (CI is set, so this fails the run)") from None
        pytest.skip(_why, allow_module_level=True)

from pinterest_testing import DATABASE_VARIABLE, EXAMPLE, HERE, SETTINGS_MODULE  # noqa: E402

_state: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Set Django up with the test settings, on a database file of this session."""
    for path in (str(EXAMPLE), str(HERE)):
        if path not in sys.path:
            sys.path.insert(0, path)
    directory = tempfile.mkdtemp(prefix="feedfan-django-")
    _state.update(directory=directory, database=str(Path(directory) / "pinterest.sqlite3"))
    saved = {name: os.environ.get(name) for name in ("DJANGO_SETTINGS_MODULE", DATABASE_VARIABLE)}
    os.environ.update(
        {"DJANGO_SETTINGS_MODULE": SETTINGS_MODULE, DATABASE_VARIABLE: _state["database"]}
    )
    try:
        import django
        from django.apps import apps
        from django.conf import settings

        settings.INSTALLED_APPS  # noqa: B018 - reads the settings module while the variable is set
        if not apps.ready:
            django.setup()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's database directory."""
    if "directory" in _state:
        shutil.rmtree(_state["directory"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_stray_feedfan_variables(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """FEEDFAN_* variables of the developer's shell would beat settings.FEEDFAN; drop them."""
    for name in list(os.environ):
        if name.startswith("FEEDFAN_") and not name.startswith("FEEDFAN_TEST_"):
            monkeypatch.delenv(name)
    yield
    from feedfan.contrib.django import reset_manager

    reset_manager()


@pytest.fixture(scope="session")
def test_database() -> str:
    """The path of the session's test database, for worker processes."""
    return _state["database"]
