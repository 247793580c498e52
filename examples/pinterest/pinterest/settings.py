"""Settings of the pinterest example.

feedfan's part is ``INSTALLED_APPS`` and ``FEEDFAN``. Switching from Celery to
RQ (or Dramatiq) is one line: ``"dispatcher"`` below, or
``FEEDFAN_DISPATCHER=rq`` in the environment, which wins over this file.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("PINTEREST_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("PINTEREST_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "feedfan.contrib.django",
    "pins",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]

ROOT_URLCONF = "pinterest.urls"
WSGI_APPLICATION = "pinterest.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("PINTEREST_DB", str(BASE_DIR / "db.sqlite3")),
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

FEEDFAN = {
    # celery, rq or dramatiq; `manage.py feedfan worker` starts the matching worker.
    "dispatcher": "celery",
    # The feeds, and the broker too unless "broker_url" names another.
    "redis_url": "redis://127.0.0.1:6379/0",
    "key_prefix": "pinterest:",
    "queue_high": "pinterest.high",
    "queue_low": "pinterest.low",
    "fanout_chunk_size": 100,
    # The manager workers load; manage.py feedfan worker sets Django up for it.
    "app": "pins.feeds:MyStreamManager",
}
