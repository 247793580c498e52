"""``python -m benchmarks [sweep|priority|dispatch|baselines|all]``: run, print, save.

Exit codes: 0 when every step ran correctly, 1 when a step or a backend named
with ``--backend`` failed (the results written still say what was measured),
2 for bad arguments or unreachable servers.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.backend import Backend, discover_backends, needs_amqp
from benchmarks.baselines import run_peer, run_raw_limits
from benchmarks.dispatch import run_dispatch
from benchmarks.machine import describe_machine
from benchmarks.priority import run_priority
from benchmarks.recommend import add_ratios, check_targets, recommend, verify_priority
from benchmarks.report import render_text, write_json, write_plot
from benchmarks.run import STREAM_FRAMEWORK_CHUNK_SIZE, Plan, Run, plan_for
from benchmarks.servers import open_servers
from benchmarks.sweep import run_sweep
from benchmarks.write_modes import run_write_modes
from feedfan.errors import FeedfanError

__all__ = ["build_parser", "main"]

STEPS = ("all", "sweep", "priority", "dispatch", "baselines")
MAX_FOLLOWERS = 1_000_000


def _chunk_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--chunk-sizes {text!r} must be integers separated by commas, e.g. 10,100,1000"
        ) from None
    if not sizes or sizes[0] < 1 or sizes[-1] > 100_000:
        raise argparse.ArgumentTypeError(
            f"--chunk-sizes {text!r} must be integers from 1 to 100,000"
        )
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure feedfan's fanout on your brokers and pick fanout_chunk_size.",
    )
    parser.add_argument("step", nargs="?", choices=STEPS, default="all", help="default: all")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a first look, in a few minutes")
    size.add_argument("--smoke", action="store_true", help="tiny: checks the pipeline works")
    parser.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help="celery-redis, celery-amqp, rq, dramatiq-redis, dramatiq-amqp, local, or a "
        "dispatcher name (all its reachable brokers); repeatable; default: every one found",
    )
    parser.add_argument(
        "--broker-url",
        action="append",
        default=[],
        metavar="URL",
        help="broker of the queues, redis:// or amqp:// (repeatable, one per scheme); "
        "default: --redis-url and amqp://guest:guest@127.0.0.1:5672/ in a vhost of its own",
    )
    parser.add_argument(
        "--redis-url",
        help="Redis of the feeds; keys go under a prefix of the run's own. Default: an "
        "empty database on 127.0.0.1:6379, claimed and flushed at the end",
    )
    parser.add_argument("--followers", type=_positive, help="followers of the sweep's fanout")
    parser.add_argument("--chunk-sizes", type=_chunk_sizes, help="e.g. 10,100,1000")
    parser.add_argument("--repeats", type=_positive, help="runs of each sweep point (median)")
    parser.add_argument("--concurrency", type=_positive, help="worker processes (default 2)")
    parser.add_argument("--backlog-writes", type=_positive, help="LOW backlog, in feed writes")
    parser.add_argument("--timeout", type=float, help="seconds one fanout may take")
    parser.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the Stream Framework peer (default: yes, except with --smoke)",
    )
    parser.add_argument(
        "--planning",
        choices=["inline", "background", "auto"],
        default="inline",
        help="where followers are cut into chunks (default: inline, so the sweep and the "
        "priority step measure chunks alone; `python -m benchmarks.planning` measures planning)",
    )
    parser.add_argument("--out", type=Path, help="folder for the results (created)")
    return parser


def _plan(args: argparse.Namespace) -> Plan:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.followers and args.followers > MAX_FOLLOWERS:
        raise FeedfanError(f"--followers {args.followers:,} is above {MAX_FOLLOWERS:,}.")
    return plan_for(
        mode,
        followers=args.followers,
        chunk_sizes=args.chunk_sizes,
        repeats=args.repeats,
        concurrency=args.concurrency,
        backlog_writes=args.backlog_writes,
        timeout=args.timeout,
        peer=args.peer,
        planning=args.planning,
    )


def _baselines(run: Run, *, full: bool) -> dict[str, Any]:
    plan = run.plan
    prefix = f"ffbench:{run.run_id}-raw:"
    section: dict[str, Any] = {
        "raw": run_raw_limits(
            run.servers.redis_url,
            followers=plan.followers,
            batch=plan.baseline_batch,
            repeats=plan.repeats,
            prefix=prefix,
        )
    }
    if not full:
        return section
    section["write_modes"] = run_write_modes(
        run.servers.redis_url,
        followers=plan.followers,
        chunk_sizes=plan.chunk_sizes,
        repeats=plan.repeats,
        prefix=f"ffbench:{run.run_id}-modes:",
    )
    if plan.peer:
        section["stream_framework"] = run_peer(
            followers=plan.followers,
            redis_url=run.servers.redis_url,
            broker_url=run.servers.redis_broker_url,
            workers=plan.concurrency,
            repeats=plan.repeats,
        )
    else:
        section["stream_framework"] = {"status": "skipped", "reason": "--no-peer or --smoke"}
    return section


def _errors(results: dict[str, Any]) -> list[str]:
    found = []
    for step in ("sweep", "priority", "dispatch"):
        for section in results.get(step, []):
            label = section["backend"]["label"]
            if section.get("error"):
                found.append(f"{step} {label}: {section['error']}")
            for point in section.get("points", []):
                if point.get("ok") is False or (step == "dispatch" and point.get("error")):
                    found.append(f"{step} {label} {point.get('chunk_size')}: {point.get('error')}")
            for layout in section.get("layouts", []):
                if layout.get("error"):
                    found.append(f"{step} {label} {layout['layout']}: {layout['error']}")
    peer = (results.get("baselines") or {}).get("stream_framework") or {}
    if peer.get("status") == "failed":
        found.append(f"Stream Framework peer: {peer.get('error')}")
    return found


def _execute(
    run: Run,
    step: str,
    results: dict[str, Any],
    save: Callable[[], None],
    *,
    chunk_sizes: tuple[int, ...] | None = None,
) -> None:
    backends, skipped = discover_backends(results["requested_backends"], run.servers)
    results["backends"] = [b.describe() for b in backends]
    results["skipped"] = [{"name": s.name, "reason": s.reason} for s in skipped]
    save()
    if step in ("all", "baselines", "sweep"):
        results["baselines"] = _baselines(run, full=step != "sweep")
        save()
    if step in ("all", "sweep"):
        results["sweep"] = []
        for backend in backends:
            results["sweep"].append(run_sweep(backend, run))
            save()
        add_ratios(results["sweep"], results.get("baselines") or {})
        results["recommendations"] = {s["backend"]["label"]: recommend(s) for s in results["sweep"]}
        save()
    if step in ("all", "priority"):
        results["priority"] = []
        recommendations = results.get("recommendations") or {}
        sweeps = {s["backend"]["label"]: s for s in results.get("sweep") or []}

        def measure(backend: Backend, chunk: int) -> dict[str, Any]:
            section = run_priority(backend, run, chunk_size=chunk)
            results["priority"].append(section)
            save()
            return section

        for backend in backends:
            if step == "priority" and chunk_sizes:
                # The step alone, at the sizes asked for: no sweep to recommend one.
                for chunk in chunk_sizes:
                    measure(backend, chunk)
                continue
            chosen = recommendations.get(backend.label)
            measured: set[int] = set()
            if chosen and backend.label in sweeps:
                # The recommended size first (the target is checked there), smaller
                # ones while HIGH fanouts wait too long behind LOW work (rule 6).
                verified, sections = verify_priority(
                    chosen, sweeps[backend.label], functools.partial(measure, backend)
                )
                recommendations[backend.label] = verified
                measured = {s["chunk_size"] for s in sections}
                save()
            # Stream Framework's 100, to show what smaller LOW tasks do to HIGH ones.
            if STREAM_FRAMEWORK_CHUNK_SIZE not in measured:
                measure(backend, STREAM_FRAMEWORK_CHUNK_SIZE)
    if step in ("all", "dispatch"):
        results["dispatch"] = []
        for backend in backends:
            results["dispatch"].append(run_dispatch(backend, run))
            save()
    if results.get("sweep"):
        priority: dict[str, dict[str, Any]] = {}
        for section in results.get("priority", []):
            label = section["backend"]["label"]
            chosen_size = (results["recommendations"].get(label) or {}).get("chunk_size")
            if section["chunk_size"] == chosen_size or label not in priority:
                priority[label] = section
        results["targets"] = {
            s["backend"]["label"]: check_targets(
                s,
                results["recommendations"][s["backend"]["label"]],
                results.get("baselines") or {},
                priority.get(s["backend"]["label"]),
            )
            for s in results["sweep"]
        }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks named on the command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = _plan(args)
    except (FeedfanError, ValueError) as e:
        parser.error(str(e))
    out = args.out or Path("results") / datetime.now().strftime("benchmarks-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:6]
    results: dict[str, Any] = {
        "machine": describe_machine(),
        "plan": plan.as_dict(),
        "step": args.step,
        "command": ["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])],
        "requested_backends": args.backend,
        "run_id": run_id,
    }
    json_path = out / "results.json"

    def save() -> None:
        write_json(results, json_path)

    started = time.monotonic()
    try:
        servers = open_servers(
            redis_url=args.redis_url,
            broker_urls=args.broker_url,
            run_id=run_id,
            want_amqp=needs_amqp(args.backend),
        )
    except FeedfanError as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2
    results["servers"] = servers.describe()
    run = Run(plan, servers, out, run_id=run_id)
    try:
        _execute(run, args.step, results, save, chunk_sizes=args.chunk_sizes)
    except KeyboardInterrupt:
        results["interrupted"] = True
    finally:
        servers.close()
        results["seconds"] = round(time.monotonic() - started, 1)
        if hasattr(os, "getloadavg"):
            results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        results["errors"] = _errors(results)
        save()
        if results.get("sweep") or (results.get("baselines") or {}).get("write_modes"):
            write_plot(results, out / "results.png")
        text = render_text(results)
        (out / "report.txt").write_text(text)
        print(text)
        print(f"results: {out}/ (results.json, results.png, report.txt, logs/)")
    failed_requests = [s for s in results.get("skipped", []) if args.backend]
    if results.get("interrupted"):
        return 130
    return 1 if results["errors"] or failed_requests else 0
