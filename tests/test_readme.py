"""The README's code does what the README says."""

from __future__ import annotations

import re
from pathlib import Path

from feedfan.config import SETTINGS_DOC

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_the_quick_start_runs_as_written_on_the_embedded_default(
    capsys: object, monkeypatch: object
) -> None:
    block = re.search(r"## Quick start.*?```python\n(.*?)```", README, re.S)
    assert block is not None
    namespace: dict[str, object] = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    output = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "Activity(actor=1, verb='pin', object=42" in output


def test_the_readme_documents_every_setting() -> None:
    table = README.split("| setting | default | meaning |", 1)[1].split("\n\n", 1)[0]
    assert [name for name in SETTINGS_DOC if f"`{name}`" not in table] == []


def test_the_test_command_is_marked_for_ci() -> None:
    marked = re.search(r"<!-- test-command -->\n```sh\n(.+)\n```\n<!-- /test-command -->", README)
    assert marked is not None
    assert "nox" in marked.group(1)
