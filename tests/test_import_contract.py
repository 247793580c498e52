"""The arrow points one way: feedfan's core never imports a job-queue library."""

from __future__ import annotations

import ast
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
