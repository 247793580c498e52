"""Development sessions: `nox -l` lists them, `nox` runs the default set (what CI runs).

Every session that talks to a broker needs Redis on 127.0.0.1:6379 and RabbitMQ on
127.0.0.1:5672 (`.ci/run` starts them). Locally a missing server skips those
tests, saying so; with CI=true it fails them.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
ROOT = Path(__file__).parent

# One entry per queue library: the extra it needs and the tests that prove it.
BACKENDS = {
    "celery": ["tests/conformance/test_celery.py", "tests/test_celery_adapter.py"],
    "rq": ["tests/conformance/test_rq.py", "tests/test_rq_adapter.py"],
    "dramatiq": ["tests/conformance/test_dramatiq.py", "tests/test_dramatiq_adapter.py"],
}
OPERATIONS = [
    "tests/test_operations_planning.py",
    "tests/test_operations_status.py",
    "tests/test_operations_doctor.py",
    "tests/test_live_swap.py",
]
PYTEST = ["pytest", "--strict-config", "--strict-markers", "--durations=10"]
# Broker tests mostly wait on worker processes, so two pytest processes (pytest-xdist)
# halve their wall time on 2 cores; FEEDFAN_TEST_PROCESSES=0 runs them in one process.
# Each pytest process claims its own Redis database and RabbitMQ vhost.
PROCESSES = os.environ.get("FEEDFAN_TEST_PROCESSES", "2")


def _parallel(dist: str) -> list[str]:
    """pytest-xdist options: ``dist`` keeps a module's or class's worker fixtures together."""
    return [] if PROCESSES == "0" else ["-n", PROCESSES, "--dist", dist]


def _install(session: nox.Session, *groups: str, extras: str = "all") -> None:
    """Install feedfan (editable, with ``extras``) and the named dependency groups."""
    session.install("-e", f".[{extras}]" if extras else ".")
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session
def lint(session: nox.Session) -> None:
    """Check formatting and lint with ruff."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")


@nox.session
def types(session: nox.Session) -> None:
    """Type-check with mypy and check that the core imports no queue library."""
    _install(session, "types", "test", "bench")
    session.run("mypy")
    session.run("mypy", "backends", "--explicit-package-bases")
    session.run("mypy", "benchmarks", "--explicit-package-bases")
    session.run("lint-imports")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit tests, and the conformance suite on the in-process dispatchers."""
    _install(session, "test")
    adapter_tests = [path for paths in BACKENDS.values() for path in paths]
    slow = [
        *adapter_tests,
        *OPERATIONS,
        "tests/django",
        "tests/drills",
        "tests/test_benchmarks_smoke.py",
    ]
    ignores = [f"--ignore={path}" for path in slow]
    session.run(*PYTEST, "tests", *ignores, *session.posargs)


@nox.session
@nox.parametrize("backend", list(BACKENDS), ids=list(BACKENDS))
def conformance(session: nox.Session, backend: str) -> None:
    """The conformance suite and adapter tests on real brokers and real workers."""
    # Every extra: adapter tests move one manager class between all the backends.
    _install(session, "test")
    existing = [path for path in BACKENDS[backend] if (ROOT / path).exists()]
    if not existing:
        session.error(f"no tests found for backend {backend!r}")
    session.run(*PYTEST, *_parallel("loadscope"), *existing, *session.posargs)


@nox.session
def operations(session: nox.Session) -> None:
    """Background planning, status, drain, the doctor and the live swap on every backend."""
    _install(session, "test")
    session.run(*PYTEST, *_parallel("loadfile"), *OPERATIONS, *session.posargs)


def _drills(session: nox.Session, scale: str) -> None:
    _install(session, "test")
    # One pytest process: the results table is gathered across all drills.
    session.run(*PYTEST, "tests/drills", *session.posargs, env={"FEEDFAN_DRILL_SCALE": scale})


@nox.session(name="drills-smoke")
def drills_smoke(session: nox.Session) -> None:
    """Fault drills, small (what CI runs): SIGKILLed workers, outages, malformed floods."""
    _drills(session, "smoke")


@nox.session(default=False)
def drills(session: nox.Session) -> None:
    """Fault drills, full size: 100,000 followers, 20,000 malformed messages per backend."""
    _drills(session, "full")


@nox.session
def django(session: nox.Session) -> None:
    """The Django integration and the pinterest example, on real workers."""
    _install(session, "test", "django-test")
    session.run(*PYTEST, "tests/django", *session.posargs)


@nox.session(default=False)
def benchmarks(session: nox.Session) -> None:
    """Measure fanout on real brokers and recommend fanout_chunk_size (`-- --quick`)."""
    _install(session, "bench")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(name="benchmark-planning", default=False)
def benchmark_planning(session: nox.Session) -> None:
    """add_user_activity inline against background planning, 1,000 to 1,000,000 followers."""
    _install(session, "bench")
    session.run("python", "-m", "benchmarks.planning", *session.posargs)


@nox.session(name="benchmarks-smoke")
def benchmarks_smoke(session: nox.Session) -> None:
    """The benchmarks in their tiny smoke mode, end to end, on every backend."""
    _install(session, "test", "bench")
    session.run(*PYTEST, *_parallel("load"), "tests/test_benchmarks_smoke.py", *session.posargs)
