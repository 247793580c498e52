"""Stream Framework 1.4.0 as a peer baseline: its own virtualenv and a fanout driver.

Stream Framework 1.4.0, as published on PyPI, does not import on Python 3.7+
(``async`` became a keyword) and predates redis-py 3. This module

* builds a separate virtualenv with Python 3.11 (:func:`ensure_environment`,
  ``setup`` on the command line): the pinned sdist, checked by its sha256, with
  the Celery, kombu and redis-py of :data:`PINS`, then the compatibility
  :data:`EDITS` on the installed files, each of which must match exactly once, so
  a changed upstream fails loudly instead of being half-patched;
* drives one fanout in that venv (``run``): one activity to N followers through
  Stream Framework's own ``Manager.add_user_activity``, at its default
  ``fanout_chunk_size``, executed by a real ``celery worker`` (prefork pool), and
  writes the timings as JSON;
* joins both for feedfan's benchmarks (:func:`run_baseline`).

Only the standard library is imported at module level: the half that needs
``stream_framework``, ``celery`` and ``redis`` runs in the peer venv and imports
them inside its functions.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["EDITS", "PINS", "SF_VERSION", "Edit", "PeerError", "ensure_environment"]
__all__ += ["fetch_sdist", "main", "patch_sources", "run_baseline", "sdist_sources"]

SF_VERSION = "1.4.0"
"""The Stream Framework release measured."""

SDIST_SHA256 = "a0154c62f4fcdb4137a723cb231363014a5559fb0bd102b15217c88c407c4746"
"""sha256 of ``stream_framework-1.4.0.tar.gz`` on PyPI; the edit list is written against it."""

PINS = ("celery[redis]==5.7.0", "kombu==5.7.0", "redis==8.1.0")
"""The newest Celery, kombu and redis-py that run Stream Framework 1.4.0 after the edits."""

HOME_VARIABLE = "FEEDFAN_BENCH_SF_HOME"
"""Environment variable naming the folder of the peer venv and the cached sdist."""

PYTHON_VARIABLE = "FEEDFAN_BENCH_SF_PYTHON"
"""Environment variable naming the Python 3.11 interpreter the venv is made with."""

DEFAULT_HOME = Path("~/.cache/feedfan-bench/stream-framework-1.4.0")
"""Where the peer venv lives unless ``FEEDFAN_BENCH_SF_HOME`` says otherwise."""

CHUNK_SIZE = 100
"""Stream Framework's default ``fanout_chunk_size``; the driver checks it is still so."""


class PeerError(RuntimeError):
    """The peer environment could not be built, or a peer run failed."""


@dataclass(frozen=True)
class Edit:
    """One compatibility edit: in ``path`` (under site-packages) ``old`` becomes ``new``."""

    path: str
    old: str
    new: str
    reason: str


_MANAGER = "stream_framework/feed_managers/base.py"
_ASYNC = "`async` is a keyword since Python 3.7, so `async=True` is a SyntaxError; renamed `async_`"


def _async_edit(old: str) -> Edit:
    return Edit(_MANAGER, old, old.replace("async", "async_"), _ASYNC)


EDITS: tuple[Edit, ...] = (
    _async_edit("def follow_user(self, user_id, target_user_id, async=True):"),
    _async_edit("self.follow_many_users(user_id, [target_user_id], async)"),
    _async_edit("def unfollow_user(self, user_id, target_user_id, async=True):"),
    _async_edit("self.unfollow_many_users(user_id, [target_user_id], async)"),
    _async_edit("def follow_many_users(self, user_id, target_ids, async=True):"),
    _async_edit("if async:\n            follow_many_fn = follow_many.delay"),
    _async_edit("def unfollow_many_users(self, user_id, target_ids, async=True):"),
    _async_edit("if async:\n            unfollow_many_fn = unfollow_many.delay"),
    Edit(
        "stream_framework/storage/redis/structures/base.py",
        "from redis.client import BasePipeline",
        "from redis.client import Pipeline as BasePipeline",
        "redis-py 3 folded BasePipeline into Pipeline; the import fails on every redis-py >= 3",
    ),
    Edit(
        "stream_framework/storage/redis/structures/sorted_set.py",
        "result = redis.zadd(key, *score_value_chunk)",
        "result = redis.zadd(key, dict(zip(score_value_chunk[1::2], score_value_chunk[0::2])))",
        "redis-py 3 takes ZADD members as a {member: score} mapping, not flat score, member args",
    ),
)
"""The compatibility edits, in order; README.md in this folder gives each one's reason."""


def patch_sources(sources: Mapping[str, str], edits: tuple[Edit, ...] = EDITS) -> dict[str, str]:
    """Apply ``edits`` to file texts keyed by path; each old text must occur exactly once."""
    patched = dict(sources)
    for edit in edits:
        text = patched.get(edit.path)
        if text is None:
            raise PeerError(f"compatibility edit names {edit.path}, which is not in the sources")
        found = text.count(edit.old)
        if found != 1:
            raise PeerError(
                f"compatibility edit of {edit.path} expects {edit.old!r} exactly once, found it "
                f"{found} times: this is not the Stream Framework {SF_VERSION} source the edits "
                f"were written for; update EDITS in {__file__}"
            )
        patched[edit.path] = text.replace(edit.old, edit.new, 1)
    return patched


def _edited_paths() -> list[str]:
    return sorted({edit.path for edit in EDITS})


def fetch_sdist(folder: Path, *, python: str = sys.executable) -> Path:
    """Download the Stream Framework sdist from PyPI into ``folder`` (once) and check its hash."""
    sdist = folder / f"stream_framework-{SF_VERSION}.tar.gz"
    if not sdist.exists():
        folder.mkdir(parents=True, exist_ok=True)
        pip = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        _check_call([*pip, "-d", str(folder), f"stream-framework=={SF_VERSION}"], "download")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise PeerError(
            f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}; delete it to download again"
        )
    return sdist


def sdist_sources(sdist: Path) -> dict[str, str]:
    """The texts of the files the edits touch, read from the sdist."""
    with tarfile.open(sdist) as tar:
        sources = {}
        for path in _edited_paths():
            member = tar.extractfile(f"stream_framework-{SF_VERSION}/{path}")
            if member is None:
                raise PeerError(f"{sdist} has no file {path}")
            sources[path] = member.read().decode("utf-8")
    return sources


def _check_call(argv: list[str], what: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=_clean_env())
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise PeerError(f"peer venv {what} failed ({' '.join(argv)}):\n{tail}")
    return done.stdout


def _clean_env() -> dict[str, str]:
    # feedfan's venv must not leak into the peer's interpreter, nor the reverse.
    hidden = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    return {key: value for key, value in os.environ.items() if key not in hidden}


def _fingerprint() -> str:
    recipe = json.dumps([SF_VERSION, SDIST_SHA256, PINS, [vars(e) for e in EDITS]])
    return hashlib.sha256(recipe.encode()).hexdigest()


def _read_fingerprint(marker: Path) -> str | None:
    if not marker.exists():
        return None
    recorded: str | None = json.loads(marker.read_text()).get("fingerprint")
    return recorded


def ensure_environment(*, home: Path | None = None, python: str | None = None) -> Path:
    """Build the peer venv unless an identical one exists; return its ``python``."""
    home = (home or Path(os.environ.get(HOME_VARIABLE) or DEFAULT_HOME)).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    venv, marker = home / "venv", home / "venv" / "feedfan-peer.json"
    venv_python = venv / "bin" / "python"
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benchmark runs must not build it at once
        if venv_python.exists() and _read_fingerprint(marker) == _fingerprint():
            return venv_python
        if (venv / "pyvenv.cfg").exists():
            shutil.rmtree(venv)  # ours and stale: made from another recipe
        base = python or os.environ.get(PYTHON_VARIABLE) or shutil.which("python3.11")
        if base is None:
            raise PeerError(f"no python3.11 on PATH; set {PYTHON_VARIABLE} to a Python 3.11")
        _check_call([base, "-m", "venv", str(venv)], "creation")
        sdist = fetch_sdist(home / "sdist", python=str(venv_python))
        _check_call([str(venv_python), "-m", "pip", "install", str(sdist), *PINS], "install")
        site = Path(_check_call([str(venv_python), "-c", _PURELIB], "inspection").strip())
        _patch_installed(site, sdist)
        _check_call([str(venv_python), "-c", _SMOKE], "import check")
        marker.write_text(json.dumps({"fingerprint": _fingerprint(), "pins": PINS}))
    return venv_python


_PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
_SMOKE = "import stream_framework.feed_managers.base, stream_framework.feeds.redis, celery"


def _patch_installed(site: Path, sdist: Path) -> None:
    installed = {path: (site / path).read_text(encoding="utf-8") for path in _edited_paths()}
    if installed != sdist_sources(sdist):
        raise PeerError(f"the files pip installed under {site} differ from {sdist}")
    for path, text in patch_sources(installed).items():
        target = site / path
        target.write_text(text, encoding="utf-8")
        for stale in target.parent.glob(f"__pycache__/{target.stem}.*.pyc"):
            stale.unlink()


def run_baseline(
    followers: int,
    redis_url: str,
    broker_url: str,
    workers: int = 2,
    *,
    high_followers: int = 0,
    timeout: float = 900.0,
    home: Path | None = None,
) -> dict[str, Any]:
    """Fan one activity out to ``followers`` feeds with Stream Framework; the driver's JSON."""
    python = ensure_environment(home=home)
    with tempfile.TemporaryDirectory(prefix="sfbench-") as folder:
        out = Path(folder) / "result.json"
        argv = [str(python), str(Path(__file__).resolve()), "run", "--followers", str(followers)]
        argv += ["--high-followers", str(high_followers), "--workers", str(workers)]
        argv += ["--redis-url", redis_url, "--broker-url", broker_url, "--timeout", str(timeout)]
        _check_call([*argv, "--json", str(out)], "run")
        result: dict[str, Any] = json.loads(out.read_text())
    return result


# The driver: everything below runs in the peer venv, started as a script.


def _sf_redis_config(url: str) -> dict[str, Any]:
    """STREAM_REDIS_CONFIG's entry for a redis:// URL (SF takes host, port, db, password)."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise PeerError(f"--redis-url must be redis://host:port/db, got scheme {parts.scheme!r}")
    password = unquote(parts.password) if parts.password else None
    db = int(parts.path.strip("/") or 0)
    return {"host": parts.hostname, "port": parts.port or 6379, "db": db, "password": password}


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def _define_peer_classes(prefix: str, redis_url: str) -> Any:
    """The manager and feeds as Stream Framework's docs show them, keyed under ``prefix``."""
    from stream_framework import settings  # type: ignore[import-not-found]
    from stream_framework.feed_managers.base import (  # type: ignore[import-not-found]
        FanoutPriority,
        Manager,
    )
    from stream_framework.feeds.redis import RedisFeed  # type: ignore[import-not-found]
    from stream_framework.storage.redis.activity_storage import (  # type: ignore[import-not-found]
        RedisActivityStorage,
    )

    settings.STREAM_REDIS_CONFIG = {"default": _sf_redis_config(redis_url)}

    class PeerActivityStorage(RedisActivityStorage):  # type: ignore[misc]
        def get_key(self) -> str:
            return f"{prefix}activities"

    class PeerFeed(RedisFeed):  # type: ignore[misc]
        key_format = prefix + "feed:%(user_id)s"
        activity_storage_class = PeerActivityStorage

    class PeerUserFeed(PeerFeed):
        key_format = prefix + "user_feed:%(user_id)s"

    class PeerManager(Manager):  # type: ignore[misc]
        feed_classes = {"normal": PeerFeed}
        user_feed_class = PeerUserFeed

        def __init__(self, followers: int, high: int) -> None:
            self.followers, self.high = followers, high  # small: SF pickles it into every task

        def get_user_follower_ids(self, user_id: int) -> dict[str, list[int]]:
            ids = list(range(1, self.followers + 1))
            high, low = ids[: self.high], ids[self.high :]
            groups = {FanoutPriority.HIGH: high, FanoutPriority.LOW: low}
            return {priority: ids for priority, ids in groups.items() if ids}

    # SF pickles the manager and the feed class into each task, and pickle finds a
    # class by module and name: they must be module globals in producer and worker.
    for cls in (PeerActivityStorage, PeerFeed, PeerUserFeed, PeerManager):
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls
    return PeerManager


def _celery_app(broker_url: str, prefix: str, queues: tuple[str, str]) -> Any:
    from celery import Celery

    redis_broker = urlsplit(broker_url).scheme in ("redis", "rediss")
    app = Celery(f"{prefix}app", broker=broker_url)
    app.conf.update(
        # SF 1.4 passes the manager, the feed class and the operation function as
        # task arguments, which only pickle carries; the queues are this run's own.
        task_serializer="pickle",
        accept_content=["pickle"],
        task_ignore_result=True,
        task_default_queue=queues[1],
        task_routes={
            "stream_framework.tasks.fanout_operation_hi_priority": {"queue": queues[0]},
            "stream_framework.tasks.fanout_operation_low_priority": {"queue": queues[1]},
        },
        broker_transport_options={"global_keyprefix": prefix} if redis_broker else {},
        broker_connection_retry_on_startup=True,
        worker_enable_remote_control=False,
    )
    return app


def _worker_argv(workers: int, run_id: str) -> list[str]:
    # Gossip, mingle and heartbeats would talk to other workers on a shared broker.
    queues = ",".join(_queues(run_id))
    return ["worker", "--pool=prefork", f"--concurrency={workers}", f"--queues={queues}",
            "--loglevel=WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
            f"--hostname=sfbench-{run_id}@%h"]  # fmt: skip


def _queues(run_id: str) -> tuple[str, str]:
    return f"sfbench.{run_id}.high", f"sfbench.{run_id}.low"


def _serve_worker(args: argparse.Namespace) -> int:
    """The ``worker`` subcommand: a real celery worker for SF's tasks, counting chunks."""
    import redis
    from celery.signals import task_postrun, worker_ready

    _define_peer_classes(args.prefix, args.redis_url)
    app = _celery_app(args.broker_url, args.prefix, _queues(args.run_id))
    clients: list[redis.Redis] = []  # one per pool process, made after the fork

    def count_chunk(kwargs: dict[str, Any] | None = None, state: str = "", **_: Any) -> None:
        if not clients:
            clients.append(redis.Redis.from_url(args.redis_url))
        # One round trip per chunk of 100 feed writes: the driver polls this, not the feeds.
        with clients[0].pipeline(transaction=False) as pipe:
            if state == "SUCCESS":
                pipe.set(f"{args.prefix}first", repr(time.time()), nx=True)  # before `done`
                pipe.incrby(f"{args.prefix}done", len((kwargs or {}).get("user_ids", ())))
            else:
                pipe.incr(f"{args.prefix}failed")
            pipe.execute()

    def announce(**_: Any) -> None:
        with redis.Redis.from_url(args.redis_url) as client:
            client.set(f"{args.prefix}ready", os.getpid())

    task_postrun.connect(count_chunk, weak=False)
    worker_ready.connect(announce, weak=False)
    app.worker_main(argv=_worker_argv(args.workers, args.run_id))
    return 0


class _Worker:
    """The celery worker process of one run; started, watched and ended by its PID."""

    def __init__(self, argv: list[str], log: Any, deadline: float) -> None:
        # Celery refuses pickle as root unless told; this worker reads only this run's queues.
        env = {**os.environ, "C_FORCE_ROOT": "1"} if os.geteuid() == 0 else None
        self.log, self.deadline = log, deadline
        self.process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )  # its own process group: its pool children end with it

    def check(self) -> None:
        """Raise with the worker's log if it died or the run is past its deadline."""
        code = self.process.poll()
        if code is not None or time.monotonic() > self.deadline:
            state = "timed out" if code is None else f"exited with {code}"
            tail = Path(self.log.name).read_text(errors="replace")[-3000:]
            raise PeerError(f"Stream Framework's celery worker {state}; its log ends:\n{tail}")

    def stop(self) -> None:
        """Warm shutdown by SIGTERM; SIGKILL to its process group if it hangs or leaves any."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _drive(args: argparse.Namespace) -> dict[str, Any]:
    """The ``run`` subcommand: start a worker, add one activity, time the fanout, clean up."""
    import celery
    import kombu
    import redis
    from stream_framework.activity import Activity  # type: ignore[import-not-found]
    from stream_framework.verbs.base import Add  # type: ignore[import-not-found]

    run_id = uuid.uuid4().hex[:12]
    prefix, n = f"sfbench:{run_id}:", args.followers
    manager = _define_peer_classes(prefix, args.redis_url)(n, args.high_followers)
    if manager.fanout_chunk_size != CHUNK_SIZE:
        raise PeerError(f"SF's default fanout_chunk_size is {manager.fanout_chunk_size}, not 100")
    app = _celery_app(args.broker_url, prefix, _queues(run_id))
    feeds = redis.Redis.from_url(args.redis_url)
    argv = [sys.executable, str(Path(__file__).resolve()), "worker", "--run-id", run_id]
    argv += ["--prefix", prefix, "--redis-url", args.redis_url, "--broker-url", args.broker_url]
    with tempfile.NamedTemporaryFile(prefix="sfbench-worker-", suffix=".log") as log:
        deadline = time.monotonic() + args.timeout
        worker = _Worker([*argv, "--workers", str(args.workers)], log, deadline)
        try:
            started = time.perf_counter()
            while not feeds.exists(f"{prefix}ready"):
                worker.check()
                time.sleep(0.05)
            activity = Activity(actor=0, verb=Add, object=1)
            begin, begin_wall = time.perf_counter(), time.time()
            manager.add_user_activity(0, activity)
            added = time.perf_counter()
            end = _await_fanout(feeds, prefix, n, worker)
            first = float(feeds.get(f"{prefix}first") or "nan")  # wall clock, from the pool
            verified = _count_holding(feeds, prefix, n, activity.serialization_id)
        finally:
            worker.stop()
            _clean(feeds, app, args.broker_url, prefix, _queues(run_id))
    if verified != n:
        raise PeerError(f"only {verified} of {n} follower feeds hold the activity")
    high, seconds = args.high_followers, end - begin
    tasks = math.ceil(high / CHUNK_SIZE) + math.ceil((n - high) / CHUNK_SIZE)
    return {
        "peer": "stream_framework", "version": SF_VERSION, "python": sys.version.split()[0],
        "celery": celery.__version__, "kombu": kombu.__version__, "redis_py": redis.__version__,
        "edits": len(EDITS), "followers": n, "high_followers": high, "chunk_size": CHUNK_SIZE,
        "tasks": tasks, "workers": args.workers, "worker_argv": _worker_argv(args.workers, run_id),
        "redis_url": _redact(args.redis_url), "broker_url": _redact(args.broker_url),
        "worker_start_s": begin - started, "add_user_activity_s": added - begin,
        "first_chunk_s": first - begin_wall, "end_to_end_s": seconds, "verified_feeds": verified,
        "feed_writes_per_s": n / seconds, "tasks_per_s": tasks / seconds,
        "producer_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # the largest single process among the worker and its pool children, all reaped
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }  # fmt: skip


def _await_fanout(feeds: Any, prefix: str, followers: int, worker: _Worker) -> float:
    """When the last chunk finished, from the workers' counter (one MGET per 5 ms)."""
    while True:
        done, failed = feeds.mget(f"{prefix}done", f"{prefix}failed")
        now = time.perf_counter()
        if failed:
            raise PeerError(f"{int(failed)} Stream Framework fanout tasks failed")
        if done and int(done) >= followers:
            return now
        worker.check()
        time.sleep(0.005)


def _count_holding(feeds: Any, prefix: str, followers: int, member: Any) -> int:
    """How many follower feeds hold ``member``; read after the clock stopped."""
    held = 0
    for start in range(1, followers + 1, 10_000):
        with feeds.pipeline(transaction=False) as pipe:
            for user_id in range(start, min(start + 10_000, followers + 1)):
                pipe.zscore(f"{prefix}feed:{user_id}", member)
            held += sum(score is not None for score in pipe.execute())
    return held


def _clean(feeds: Any, app: Any, broker_url: str, prefix: str, queues: tuple[str, str]) -> None:
    """Delete this run's keys and queues; nothing outside them is touched."""
    import redis

    _unlink_prefixed(feeds, prefix)
    if urlsplit(broker_url).scheme in ("redis", "rediss"):
        with redis.Redis.from_url(broker_url) as broker:
            _unlink_prefixed(broker, prefix)  # kombu's keys all carry global_keyprefix
        return
    with app.connection_for_write() as connection:
        for queue in queues:
            connection.default_channel.queue_delete(queue)
            connection.default_channel.exchange_delete(queue)


def _unlink_prefixed(client: Any, prefix: str) -> None:
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) == 1000:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Stream Framework 1.4.0 as a peer baseline.")
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("setup", help="build the peer venv (with any Python)")
    setup.add_argument("--home", type=Path, help=f"folder of the venv (env {HOME_VARIABLE})")
    setup.add_argument("--python", help=f"Python 3.11 to build it with (env {PYTHON_VARIABLE})")
    run = commands.add_parser("run", help="one fanout (with the peer venv's python)")
    run.add_argument("--followers", type=int, required=True, help="feeds to fan out to")
    run.add_argument("--high-followers", type=int, default=0, help="how many of them are HIGH")
    run.add_argument("--json", type=Path, required=True, help="file to write the result to")
    run.add_argument("--timeout", type=float, default=900.0, help="seconds before giving up")
    worker = commands.add_parser("worker", help="internal: the celery worker of a run")
    worker.add_argument("--run-id", required=True)
    worker.add_argument("--prefix", required=True)
    for sub in (run, worker):
        sub.add_argument("--redis-url", required=True, help="Redis the feeds are written to")
        sub.add_argument("--broker-url", required=True, help="Celery broker for SF's tasks")
        sub.add_argument("--workers", type=int, default=2, help="celery worker processes")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line: ``setup``, ``run`` and the internal ``worker``."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "setup":
            print(ensure_environment(home=args.home, python=args.python))
            return 0
        if args.command == "worker":
            return _serve_worker(args)
        if not 0 <= args.high_followers <= args.followers:
            raise PeerError(f"--high-followers must be within 0..{args.followers}")
        result = _drive(args)
    except ModuleNotFoundError as error:
        hint = f"`run` needs the peer venv's python: `python {__file__} setup` prints it"
        print(f"stream_framework peer: {error}; {hint}", file=sys.stderr)
        return 1
    except PeerError as error:
        print(f"stream_framework peer: {error}", file=sys.stderr)
        return 1
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    rate = f"{result['feed_writes_per_s']:,.0f} feed writes/s"
    print(f"Stream Framework {SF_VERSION}: {result['end_to_end_s']:.2f} s, {rate}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # Run as a script, this file's folder heads sys.path and its name would shadow
    # the real ``stream_framework`` package it drives.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != here]
    sys.exit(main())
