"""The pure parts of the Stream Framework peer: its compatibility edits and URL handling.

The edits are checked against the real sdist from PyPI (69 kB, sha256-pinned):
each must match exactly once, and they must turn the published manager module,
which Python 3.11 refuses to compile, into one it compiles.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from feedfan.testing.plugin import in_ci

MODULE = Path(__file__).parents[1] / "benchmarks" / "peers" / "stream_framework.py"
README = MODULE.with_name("README.md")


def _load_peer() -> ModuleType:
    # By path: the repository root is not on sys.path under a bare `pytest`.
    spec = importlib.util.spec_from_file_location("_feedfan_peer_stream_framework", MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


peer = _load_peer()


@pytest.fixture(scope="module")
def published_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The files the edits touch, as Stream Framework 1.4.0's sdist on PyPI has them."""
    folder = tmp_path_factory.mktemp("sdist")
    try:
        sdist = peer.fetch_sdist(folder)
    except peer.PeerError as error:
        if in_ci() or "sha256" in str(error):
            raise
        pytest.skip(f"PyPI is not reachable from here (CI=true makes this fail): {error}")
    sources: dict[str, str] = peer.sdist_sources(sdist)
    return sources


def test_every_edit_matches_the_published_sdist_exactly_once(
    published_sources: dict[str, str],
) -> None:
    # Given the published sources
    # When the edit list is applied
    patched = peer.patch_sources(published_sources)

    # Then every edit took: no old text is left where a new one was asked for
    for edit in peer.EDITS:
        assert edit.new in patched[edit.path]
    assert "async=" not in patched["stream_framework/feed_managers/base.py"]


def test_the_edits_make_the_published_manager_compile_on_this_python(
    published_sources: dict[str, str],
) -> None:
    # Given the manager module as published, which uses `async` as a parameter name
    path = "stream_framework/feed_managers/base.py"
    with pytest.raises(SyntaxError):
        compile(published_sources[path], path, "exec")

    # When it is edited
    patched = peer.patch_sources(published_sources)

    # Then every edited file compiles
    for name, text in patched.items():
        compile(text, name, "exec")


def test_an_edit_whose_text_is_gone_fails_loudly() -> None:
    # Given a source in which an edit's old text no longer occurs
    edit = peer.Edit("pkg/mod.py", "zadd(key, *pairs)", "zadd(key, mapping)", "why")

    # When the edit is applied, Then it fails naming the file, the text and the fix
    with pytest.raises(peer.PeerError, match=r"pkg/mod.py expects 'zadd\(key, \*pairs\)' exactly once, found it 0 times.*update EDITS"):  # fmt: skip
        peer.patch_sources({"pkg/mod.py": "zadd(key, mapping)\n"}, (edit,))


def test_an_edit_whose_text_occurs_twice_fails_loudly() -> None:
    # Given a source in which an edit's old text occurs twice
    edit = peer.Edit("pkg/mod.py", "async=True", "async_=True", "why")

    # When the edit is applied, Then it refuses to guess which one is meant
    with pytest.raises(peer.PeerError, match="found it 2 times"):
        peer.patch_sources({"pkg/mod.py": "f(async=True)\ng(async=True)\n"}, (edit,))


def test_an_edit_of_a_missing_file_fails_loudly() -> None:
    # Given an edit of a file the sources lack
    edit = peer.Edit("pkg/gone.py", "a", "b", "why")

    # When the edit is applied, Then the file is named
    with pytest.raises(peer.PeerError, match=r"pkg/gone\.py, which is not in the sources"):
        peer.patch_sources({"pkg/mod.py": "a"}, (edit,))


def test_the_readme_lists_every_edit_with_its_old_and_new_text() -> None:
    # Given the README beside the module
    text = README.read_text()

    # Then each edit's file and both texts are in it, so the list and the code agree
    for edit in peer.EDITS:
        assert edit.path in text
        assert edit.old.splitlines()[0] in text
        assert edit.new.splitlines()[0] in text


def test_a_redis_url_becomes_stream_frameworks_connection_settings() -> None:
    # Given a redis URL with a password and a database
    url = "redis://:s%40cret@10.0.0.5:6380/7"

    # When it is turned into STREAM_REDIS_CONFIG's entry
    config = peer._sf_redis_config(url)

    # Then SF gets host, port, db and the unquoted password
    assert config == {"host": "10.0.0.5", "port": 6380, "db": 7, "password": "s@cret"}


def test_a_url_other_than_redis_is_refused_for_the_feeds() -> None:
    # When the feeds' URL is not redis://, Then the message names the scheme
    with pytest.raises(peer.PeerError, match="got scheme 'amqp'"):
        peer._sf_redis_config("amqp://guest:guest@localhost//")


def test_a_password_never_reaches_the_results() -> None:
    # Given broker URLs with and without a password
    # When they are redacted for the JSON result, Then only the password is hidden
    assert (
        peer._redact("amqp://guest:guest@127.0.0.1:5672//") == "amqp://guest:***@127.0.0.1:5672//"
    )
    assert peer._redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_run_outside_the_peer_venv_says_how_to_get_it(tmp_path: Path) -> None:
    # Given feedfan's own python, which has no stream_framework installed
    script = MODULE
    argv = ["run", "--followers", "1", "--redis-url", "redis://127.0.0.1:6379/0"]
    argv += ["--broker-url", "redis://127.0.0.1:6379/0", "--json", str(tmp_path / "out.json")]

    # When the driver is run with it
    done = subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Then it fails before touching any server, and says which python to use instead
    assert done.returncode == 1
    assert "No module named 'stream_framework'" in done.stderr
    assert "setup` prints it" in done.stderr
    assert not (tmp_path / "out.json").exists()
