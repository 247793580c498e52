"""The ``feedfan`` command: demo, worker, config.

Bad arguments or configuration exit with code 2 and one line saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from feedfan.config import ENV_PREFIX, SETTINGS_DOC, Settings, load_settings
from feedfan.errors import ConfigurationError, FeedfanError, redact_url
from feedfan.priority import FanoutPriority

if TYPE_CHECKING:
    from feedfan.dispatch import WorkerCommand

__all__ = ["main"]

Command = Callable[[argparse.Namespace, Settings], int]
_COMMANDS: dict[str, Command] = {}


def _settings_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (override files and FEEDFAN_* variables)")
    group.add_argument("--dispatcher", help="celery, rq, dramatiq, local, eager or a dotted path")
    group.add_argument("--broker-url", help="broker of the job queue, redis:// or amqp://")
    group.add_argument("--redis-url", help="Redis that holds the feeds")
    group.add_argument("--key-prefix", help="prefix of feedfan's Redis keys")
    group.add_argument(
        "--chunk-size", dest="fanout_chunk_size", type=int, help="followers per task"
    )
    group.add_argument("--app", help="your manager, as package.module:attribute")
    return parent


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    names = ("dispatcher", "broker_url", "redis_url", "key_prefix", "fanout_chunk_size", "app")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from feedfan.demo import DEMO_KEY_PREFIX, run_demo

    if "key_prefix" not in settings.sources or settings.sources["key_prefix"] == "default":
        settings = settings.with_values({"key_prefix": DEMO_KEY_PREFIX}, source="feedfan demo")
    return run_demo(
        settings, activities=args.activities, seed=args.seed, start_worker=args.start_worker
    )


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:  # noqa: RET503
    from feedfan.dispatch import resolve_dispatcher_class

    priorities = list(FanoutPriority) if args.priority == "all" else [FanoutPriority(args.priority)]
    cls = resolve_dispatcher_class(settings.dispatcher)
    dispatcher = cls(settings)
    command = dispatcher.worker_command(
        priorities, concurrency=args.concurrency or settings.worker_concurrency
    )
    env = {**os.environ, **settings.to_env(), **command.env}
    cwd = os.getcwd()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, env.get("PYTHONPATH", "")) if p)
    if args.print_only:
        _print_worker_line(settings, command, env, layers=args.layers)
        return 0
    shown = " ".join(
        f"{k}={redact_url(v) if '://' in v else v}" for k, v in sorted(command.env.items())
    )
    print(
        f"feedfan worker: {shown + ' ' if shown else ''}{command.shell()}",
        file=sys.stderr,
        flush=True,
    )
    dispatcher.close()
    # Every worker loads the app to run a chunk: one that does not load is said here, once,
    # rather than by a worker that fails each chunk or a pool that restarts without end.
    from feedfan.runner import load_app

    load_app(settings.app, settings).close()
    os.execvpe(command.argv[0], command.argv, env)


def _print_worker_line(
    settings: Settings, command: WorkerCommand, env: Mapping[str, str], *, layers: Sequence[str]
) -> None:
    """Print the worker command as one line to paste, with what its environment needs.

    A worker reads its settings from the environment and config files, as this
    command did. What only the arguments or an extra layer (``settings.FEEDFAN``)
    said travels with the line, as do the path and Django settings module
    ``feedfan worker`` would give it. A value holding a password is left out
    and named on stderr, for the user to set.
    """
    starts = ("argument ", *(f"{name}[" for name in layers))
    wanted = {
        ENV_PREFIX + name.upper()
        for name, source in settings.sources.items()
        if source.startswith(starts)
    }
    wanted |= {*command.env, "PYTHONPATH", "DJANGO_SETTINGS_MODULE"}
    shown, withheld = [], []
    for name in sorted(wanted):
        value = env.get(name)
        if value is None:
            continue
        if "://" in value and redact_url(value) != value:
            withheld.append(name)
        else:
            shown.append(f"{name}={shlex.quote(value)}")
    print(" ".join([*shown, command.shell()]))
    if withheld:
        print(
            f"feedfan worker: {', '.join(withheld)} not printed as it holds a password; "
            "set it in the worker's environment.",
            file=sys.stderr,
        )


def _cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    rows = settings.describe()
    if args.json:
        print(
            json.dumps(
                {name: {"value": value, "source": source} for name, value, source in rows}, indent=2
            )
        )
        return 0
    width = max(len(name) for name, _, _ in rows)
    value_width = min(max(len(value) for _, value, _ in rows), 40)
    for name, value, source in rows:
        print(f"{name:<{width}}  {value:<{value_width}}  {source}")
        if args.verbose:
            print(f"{'':<{width}}  {SETTINGS_DOC[name]}")
    return 0


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from feedfan.status import render_status, status_json, status_report

    report = status_report(settings, recent=args.fanouts)
    if args.json:
        print(json.dumps(status_json(report), indent=2))
    else:
        print(render_status(report, failed=args.failed))
    return 0


def _shown(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from feedfan.doctor import run_checks

    findings = run_checks(settings)
    for finding in findings:
        if finding.level == "ok" and not args.verbose:
            continue
        print(f"{finding.level.upper():<8} {finding.code:<24} {finding.message}")
        if finding.fix:
            print(f"{'':<8} {'':<24} fix: {finding.fix}")
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    print(f"{errors} error(s), {warnings} warning(s), {len(findings) - errors - warnings} ok")
    return 1 if errors or (warnings and args.strict) else 0


def _cmd_drain(args: argparse.Namespace, settings: Settings) -> int:
    from feedfan._progress import Progress
    from feedfan.status import drain

    name = args.dispatcher or settings.dispatcher
    bar = Progress(f"draining {name}", total=0)
    with bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done)

        def notice(text: str) -> None:
            print(f"feedfan drain: {text}", file=sys.stderr, flush=True)

        result = drain(settings, name, timeout=args.timeout, progress=progress, notice=notice)
    if not result.empty:
        print(
            f"the {name} queues are not empty after {result.seconds:.0f} s ({result.waiting:,} "
            f"waiting, {_shown(result.held)} held by workers); keep its workers running."
        )
        return 1
    print(f"the {name} queues are empty ({result.seconds:.1f} s); its workers can be stopped.")
    if result.new_failures:
        print(
            f"{len(result.new_failures)} task(s) failed meanwhile; see `feedfan status` and `feedfan replay`:"
        )
        for message in result.new_failures[:20]:
            print(f"  [{message.queue}] {message.reason[:110]}")
        return 1
    return 0


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from feedfan.dispatch import create_dispatcher
    from feedfan.runner import TaskRunner, load_app

    runner = TaskRunner(load_app(settings.app, settings))
    dispatcher = create_dispatcher(settings, runner=runner)
    try:
        count = dispatcher.replay_failed(limit=args.limit)
    except NotImplementedError as e:
        print(f"feedfan replay: {e}", file=sys.stderr)
        return 2
    finally:
        dispatcher.close()
    print(
        f"sent {count} kept task(s) back to the {settings.dispatcher} queues; malformed ones stay kept."
    )
    return 0


def build_parser(*, prog: str = "feedfan") -> argparse.ArgumentParser:
    """The argument parser of the ``feedfan`` command."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fan activities out to followers' feeds through Celery, RQ or Dramatiq.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _settings_options()

    demo = sub.add_parser(
        "demo", parents=[common], help="fan out a burst of pins in a generated social network"
    )
    demo.add_argument("--activities", type=int, default=300, help="pins to fan out (default 300)")
    demo.add_argument("--seed", type=int, default=11, help="random seed of the burst")
    demo.add_argument(
        "--start-worker", action="store_true", help="start a worker for a real dispatcher"
    )
    _COMMANDS["demo"] = _cmd_demo

    worker = sub.add_parser("worker", parents=[common], help="start the dispatcher's real worker")
    worker.add_argument(
        "--priority",
        choices=["high", "low", "all"],
        default="all",
        help="queues to serve; 'all' serves HIGH before LOW (default)",
    )
    worker.add_argument(
        "--concurrency", type=int, help="processes or threads (default: worker_concurrency)"
    )
    worker.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="print the worker command instead of running it",
    )
    _COMMANDS["worker"] = _cmd_worker

    config = sub.add_parser(
        "config", parents=[common], help="print the effective settings and their sources"
    )
    config.add_argument("--json", action="store_true", help="print JSON")
    config.add_argument("-v", "--verbose", action="store_true", help="explain every setting")
    _COMMANDS["config"] = _cmd_config

    status = sub.add_parser(
        "status", parents=[common], help="queue depths, failed tasks, fanouts in flight"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--failed", type=int, default=5, metavar="N", help="list up to N kept failures (default 5)"
    )
    status.add_argument(
        "--fanouts", type=int, default=10, metavar="N", help="show the N newest fanouts"
    )
    _COMMANDS["status"] = _cmd_status

    check = sub.add_parser(
        "check", parents=[common], help="find what silently breaks fanout; exit 1 on errors"
    )
    check.add_argument("-v", "--verbose", action="store_true", help="also show what is fine")
    check.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    _COMMANDS["check"] = _cmd_check

    drain_cmd = sub.add_parser(
        "drain", parents=[common], help="wait until a dispatcher's queues are empty"
    )
    drain_cmd.add_argument(
        "--timeout", type=float, default=3600.0, help="give up after this many seconds"
    )
    _COMMANDS["drain"] = _cmd_drain

    replay = sub.add_parser(
        "replay", parents=[common], help="send kept failed tasks back to their queues"
    )
    replay.add_argument("--limit", type=int, help="look at no more than this many kept messages")
    _COMMANDS["replay"] = _cmd_replay

    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    extra_layers: tuple[tuple[str, Mapping[str, object]], ...] = (),
    prog: str = "feedfan",
) -> int:
    """Run the ``feedfan`` command; return its exit code.

    ``extra_layers`` are settings sources placed below the environment, as
    :func:`~feedfan.config.load_settings` takes them (the Django management
    command passes ``settings.FEEDFAN``).
    """
    parser = build_parser(prog=prog)
    args = parser.parse_args(argv)
    # `--app` names a module of the project the command runs in, as for `celery -A`,
    # `rq worker` and `dramatiq`; a console script's path starts at its own folder.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        settings = load_settings(_overrides(args), extra_layers=extra_layers)
        args.layers = [name for name, _ in extra_layers]
        return _COMMANDS[args.command](args, settings)
    except ConfigurationError as e:
        print(f"feedfan {args.command}: {e}", file=sys.stderr)
        return 2
    except FeedfanError as e:
        print(f"feedfan {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
