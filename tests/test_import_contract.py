"""The arrow points one way: feedfan's core never imports a job-queue library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import feedfan

FORBIDDEN = {"celery", "kombu", "rq", "dramatiq", "pika"}


def test_no_core_module_imports_a_queue_library() -> None:
    core = Path(feedfan.__file__).parent
    offenders = []
    for path in sorted(core.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(core)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN
            ]
    assert offenders == []


def test_the_benchmarks_and_the_worker_run_without_the_test_dependencies() -> None:
    # Given an interpreter on which pytest and hypothesis cannot be imported, as in
    # `nox -s benchmarks` or a production install (only the `bench` group, or none)
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pytest', '_pytest', 'hypothesis'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import benchmarks.cli, benchmarks.planning, benchmarks.manager, feedfan.cli\n"
        "from feedfan.testing import WorkerProcess, MyStreamManager\n"
    )

    # When the benchmarks' entry points and the CLI are imported
    run = subprocess.run(
        [sys.executable, "-c", blocker],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Then they import: only the conformance suite itself needs pytest
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_celery_extra_installs_what_kombus_redis_transport_imports() -> None:
    # feedfan keeps its feeds in Redis and its Celery worker loads kombu's Redis transport,
    # which imports packages (packaging, a redis-py kombu supports) only kombu's `redis`
    # extra pulls in: `pip install 'feedfan[celery]'` alone crashed a Redis worker.
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    celery_extra = pyproject["project"]["optional-dependencies"]["celery"]
    assert any(
        req.replace(" ", "").startswith(("kombu[redis]", "celery[redis]")) for req in celery_extra
    )
