"""Settings of the Django integration tests: the pinterest example on a test database.

The database is a file named by ``PINTEREST_TEST_DB`` (set by ``conftest.py``)
so that worker processes, started with the same variable, read the rows the
tests commit. feedfan runs eagerly on in-memory feeds unless a test says
otherwise (``settings.FEEDFAN = ...``).
"""

import os

from pinterest.settings import *  # noqa: F403 - the example's settings, then ours

_DATABASE = os.environ["PINTEREST_TEST_DB"]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": _DATABASE,
        "TEST": {"NAME": _DATABASE},
    }
}

DEBUG = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

FEEDFAN = {
    "dispatcher": "eager",
    "storage": "memory",
    "key_prefix": "pinterest-test:",
    "app": "pins.feeds:MyStreamManager",
}
