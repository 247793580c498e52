"""``manage.py feedfan``: the ``feedfan`` command with the project's ``settings.FEEDFAN``.

Every subcommand of ``feedfan`` (worker, config, status, check, drain,
replay, demo) is passed through, with ``settings.FEEDFAN`` as a settings
source below ``FEEDFAN_*`` environment variables and command-line options.
``manage.py feedfan worker`` also makes sure the worker it starts can load
the project's manager: it exports ``DJANGO_SETTINGS_MODULE``, puts the project
on ``PYTHONPATH`` and prefixes ``app`` with
:mod:`feedfan.contrib.django.loader`, which runs ``django.setup()`` first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from django.conf import settings as django_settings  # type: ignore[import-untyped, unused-ignore]
from django.core.management.base import (  # type: ignore[import-untyped, unused-ignore]
    BaseCommand,
    CommandError,
)

from feedfan.cli import main
from feedfan.contrib.django.conf import django_layers, get_settings
from feedfan.contrib.django.loader import project_root, worker_app
from feedfan.errors import ConfigurationError

PROG = "manage.py feedfan"

# Django reads these itself before any command runs (ManagementUtility);
# left in the arguments, feedfan's parser would refuse them.
_DJANGO_GLOBAL_OPTIONS = ("--settings", "--pythonpath")


class Command(BaseCommand):  # type: ignore[misc, unused-ignore]
    """Run ``feedfan COMMAND ...`` with ``settings.FEEDFAN``."""

    help = (
        "Run a feedfan command with settings.FEEDFAN: worker, config, status, check, drain, "
        "replay, demo. `manage.py feedfan worker --help` shows a command's options."
    )

    def add_arguments(self, parser: Any) -> None:
        """Everything after ``feedfan`` goes to feedfan's own parser untouched."""
        parser.add_argument(
            "args",
            nargs=argparse.REMAINDER,
            metavar="COMMAND [OPTIONS]",
            help="a feedfan command and its options",
        )

    def handle(self, *args: str, **options: Any) -> None:
        """Run the feedfan command; exit with its code when it is not zero."""
        argv = _without_django_options(list(args))
        try:
            layers = django_layers()
        except ConfigurationError as e:
            raise CommandError(str(e), returncode=2) from e
        if argv and argv[0] == "worker":
            argv = _with_worker_app(argv)
            with _worker_environment():
                code = main(argv, extra_layers=layers, prog=PROG)
        else:
            code = main(argv, extra_layers=layers, prog=PROG)
        if code:
            sys.exit(code)


def _without_django_options(argv: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        if token in _DJANGO_GLOBAL_OPTIONS:
            skip = True
            continue
        if token.startswith(tuple(f"{option}=" for option in _DJANGO_GLOBAL_OPTIONS)):
            continue
        kept.append(token)
    return kept


def _with_worker_app(argv: list[str]) -> list[str]:
    """``argv`` with the effective ``app`` prefixed by the loader (last ``--app`` wins)."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--app")
    try:
        known, _ = parser.parse_known_args(argv[1:])
    except argparse.ArgumentError:
        return argv  # feedfan's own parser reports it
    app = known.app
    if app is None:
        try:
            app = get_settings().app
        except ConfigurationError:
            return argv  # feedfan's own parsing reports it, with its exit code
    if app is None:
        return argv
    return [*argv, "--app", worker_app(app)]


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """``DJANGO_SETTINGS_MODULE`` and the project's root in the environment a worker inherits."""
    module = os.environ.get("DJANGO_SETTINGS_MODULE") or getattr(
        django_settings, "SETTINGS_MODULE", None
    )
    if not module:
        raise CommandError(
            "feedfan workers set Django up from DJANGO_SETTINGS_MODULE, which is not set "
            "(settings.configure() cannot be passed to another process); run manage.py with "
            "a settings module.",
            returncode=2,
        )
    changes: dict[str, str] = {"DJANGO_SETTINGS_MODULE": module}
    root = project_root(module)
    if root is not None:
        paths = [str(root), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
        changes["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    with _environ(changes):
        yield


@contextlib.contextmanager
def _environ(changes: Mapping[str, str]) -> Iterator[None]:
    # The worker normally replaces this process (exec); with --print it does
    # not, and the caller's environment must come back unchanged.
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
