"""The outputs of a run: terminal tables, ``results.json``, ``results.png``, ``report.txt``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_line
from benchmarks.recommend import baseline_rates

__all__ = ["render_text", "write_json", "write_plot"]


def _fmt(value: Any, spec: str = ",.0f", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, bool):
        return "yes" if value else "NO"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _table(
    title: str, headers: list[str], rows: list[list[str]], *, text: tuple[int, ...] = (0,)
) -> str:
    """A table; columns numbered in ``text`` are left-aligned, the others right-aligned."""
    if not rows:
        return f"{title}\n  (nothing measured)\n"
    widths = [max(len(c) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return (
            "  "
            + "  ".join(
                c.ljust(w) if i in text else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )

    body = [line(headers), "  " + "  ".join("-" * w for w in widths), *map(line, rows)]
    return title + "\n" + "\n".join(body) + "\n"


def _spread(rates: list[float] | None) -> str:
    """``; median of 3 (4,920 to 5,784)`` for a baseline measured more than once."""
    if not rates or len(rates) < 2:
        return ""
    return f"; median of {len(rates)} ({_fmt(min(rates))} to {_fmt(max(rates))})"


def _baselines_text(results: dict[str, Any]) -> str:
    baselines = results.get("baselines") or {}
    out = []
    raw = baselines.get("raw")
    rows = []
    if raw:
        for name, key in (
            ("one client, pipeline", "redis_pipeline"),
            ("one client, Lua script", "redis_script"),
        ):
            note = f"{raw['followers']:,} feeds{_spread(raw[key].get('writes_per_s_all'))}"
            rows.append([name, _fmt(raw[key]["writes_per_s"]), note])
    peer = baselines.get("stream_framework")
    if peer:
        feeds = f"{peer.get('followers', 0):,} feeds{_spread(peer.get('writes_per_s_all'))}"
        detail = peer.get("error") or peer.get("reason") or feeds
        rows.append(["Stream Framework 1.4.0", _fmt(peer.get("writes_per_s")), str(detail)[:70]])
    if rows:
        out.append(
            _table("Baselines (feed writes/s)", ["baseline", "writes/s", "note"], rows, text=(0, 2))
        )
    modes = baselines.get("write_modes")
    if modes:
        rows = [
            [
                str(p["chunk_size"]),
                _fmt(p["script_writes_per_s"]),
                _fmt(p["pipeline_writes_per_s"]),
                _fmt(p["script_over_pipeline"], ".2f"),
            ]
            for p in modes["points"]
        ]
        out.append(
            _table(
                f"RedisStorage write modes, one client, {modes['followers']:,} feeds: "
                + modes["summary"],
                ["chunk", "script w/s", "pipeline w/s", "script/pipeline"],
                rows,
            )
        )
    return "\n".join(out)


def _sweep_text(results: dict[str, Any]) -> str:
    out = []
    rates = baseline_rates(results.get("baselines") or {})
    for sweep in results.get("sweep", []):
        label = sweep["backend"]["label"]
        headers = [
            "chunk",
            "tasks",
            "end-to-end s",
            "writes/s",
            "tasks/s",
            "producer s",
            "1st follower ms",
            "producer MB",
            "workers MB",
        ]
        headers += [f"x {name}" for name in rates]
        rows = []
        for p in sweep.get("points", []):
            if not p.get("ok"):
                rows.append(
                    [str(p["chunk_size"]), "FAILED: " + str(p.get("error"))[:60]]
                    + [""] * (len(headers) - 2)
                )
                continue
            memory = p.get("memory") or {}
            first = p.get("first_follower_s")
            row = [
                str(p["chunk_size"]),
                _fmt(p["chunks"]),
                _fmt(p["end_to_end_s"], ".2f"),
                _fmt(p["writes_per_s"]),
                _fmt(p["tasks_per_s"]),
                _fmt(p["producer_s"], ".3f"),
                _fmt(first * 1000 if first is not None else None, ",.0f"),
                _fmt(memory.get("producer_rss_peak_mb"), ".0f"),
                _fmt(memory.get("workers_rss_peak_mb"), ".0f"),
            ]
            row += [_fmt(p.get(f"vs_{name}"), ".2f") for name in rates]
            rows.append(row)
        title = f"Sweep {label}: {sweep['followers']:,} followers, {sweep.get('worker_command')}"
        if sweep.get("error"):
            title += f"\n  ERROR: {sweep['error']}"
        out.append(_table(title, headers, rows))
    return "\n".join(out)


def _recommendations_text(results: dict[str, Any]) -> str:
    title = "Recommended fanout_chunk_size"
    plan = results.get("plan") or {}
    if plan.get("mode") in ("quick", "smoke"):
        title += (
            f" ({plan['mode']} run, {plan.get('followers', 0):,} followers: a first look; "
            "choose the size to configure from a full run)"
        )
    out = [title]
    for label, rec in results.get("recommendations", {}).items():
        layout = " (with a dedicated HIGH worker)" if rec.get("layout") == "dedicated" else ""
        out.append(f"  {label}: {rec.get('chunk_size') or 'none'}{layout}")
        out.extend(f"    - {reason}" for reason in rec.get("reasons", []))
    return "\n".join(out) + "\n"


def _priority_text(results: dict[str, Any]) -> str:
    rows = []
    for section in results.get("priority", []):
        for layout in section.get("layouts", []):
            loaded = layout.get("loaded") or [{}]
            rows.append(
                [
                    section["backend"]["label"],
                    layout["layout"],
                    str(section["chunk_size"]),
                    _fmt(layout.get("idle_s"), ".3f"),
                    _fmt(layout.get("loaded_s"), ".3f"),
                    _fmt(layout.get("loaded_over_idle"), ".2f"),
                    _fmt(loaded[0].get("low_writes_queued_at_send")),
                    _fmt(loaded[0].get("low_writes_waiting_at_done")),
                    str(layout.get("error") or "")[:50],
                ]
            )
    return _table(
        "Priority: HIGH fanout time, idle queues and behind a LOW backlog",
        [
            "backend",
            "workers",
            "chunk",
            "idle s",
            "loaded s",
            "loaded/idle",
            "LOW writes queued",
            "LOW still waiting",
            "error",
        ],
        rows,
        text=(0, 1, 8),
    )


def _dispatch_text(results: dict[str, Any]) -> str:
    rows = []
    for section in results.get("dispatch", []):
        for p in section.get("points", []):
            rows.append(
                [
                    section["backend"]["label"],
                    _fmt(p["tasks"]),
                    _fmt(p["bulk_s"], ".3f"),
                    _fmt(p["single_s"], ".3f"),
                    _fmt(p["bulk_us_per_task"], ",.1f"),
                    _fmt(p["single_us_per_task"], ",.1f"),
                    _fmt(p["bulk_speedup"], ".2f"),
                ]
            )
    errors = [
        f"  ERROR {section['backend']['label']}: {section['error']}\n"
        for section in results.get("dispatch", [])
        if section.get("error")
    ]
    return _table(
        "Dispatch overhead: enqueue_many (bulk) against enqueue per task",
        ["backend", "tasks", "bulk s", "single s", "bulk us/task", "single us/task", "speedup"],
        rows,
    ) + "".join(errors)


def _targets_text(results: dict[str, Any]) -> str:
    rows = []
    for label, targets in results.get("targets", {}).items():
        for t in targets:
            met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
            rows.append([label, t["target"], _fmt(t["measured"], ",.3g"), met, t["note"]])
    title = "Targets of the issue"
    mode = (results.get("plan") or {}).get("mode")
    if mode in ("quick", "smoke"):
        title += f" ({mode} run: a first look; judge the targets on a full run)"
    return _table(
        title,
        ["backend", "target", "measured", "", "note"],
        rows,
        text=(0, 1, 3, 4),
    )


def render_text(results: dict[str, Any]) -> str:
    """Every table of the run, as the terminal shows it."""
    machine = results["machine"]
    head = [
        f"feedfan benchmarks ({results['plan']['mode']}) on {machine_line(machine)}",
        f"  load average at start {machine['load_average_at_start']}, at end "
        f"{machine.get('load_average_at_end')}; the machine may be shared: numbers are noisy",
    ]
    head += [f"  {note}" for note in results.get("servers", {}).get("notes", [])]
    for skipped in results.get("skipped", []):
        head.append(f"  skipped {skipped['name']}: {skipped['reason']}")
    parts = ["\n".join(head) + "\n", _baselines_text(results), _sweep_text(results)]
    if results.get("recommendations"):
        parts.append(_recommendations_text(results))
    if results.get("priority"):
        parts.append(_priority_text(results))
    if results.get("dispatch"):
        parts.append(_dispatch_text(results))
    if results.get("targets"):
        parts.append(_targets_text(results))
    return "\n".join(p for p in parts if p)


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` as indented JSON (atomically, so a crash leaves the last good one)."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(results, indent=2, default=str) + "\n")
    partial.replace(path)


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """Plot writes/s and end-to-end time against chunk size; return whether it was written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [s for s in results.get("sweep", []) if any(p.get("ok") for p in s.get("points", []))]
    modes = (results.get("baselines") or {}).get("write_modes")
    panels = 3 if modes else 2
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 5))
    rate_axis, time_axis = axes[0], axes[1]
    for sweep in sweeps:
        good = [p for p in sweep["points"] if p.get("ok")]
        sizes = [p["chunk_size"] for p in good]
        label = sweep["backend"]["label"]
        (line,) = rate_axis.plot(sizes, [p["writes_per_s"] for p in good], marker="o", label=label)
        time_axis.plot(sizes, [p["end_to_end_s"] for p in good], marker="o", label=label)
        chosen = (results.get("recommendations") or {}).get(label, {})
        if chosen.get("chunk_size") and chosen.get("writes_per_s"):
            rate_axis.plot(
                [chosen["chunk_size"]],
                [chosen["writes_per_s"]],
                marker="*",
                markersize=16,
                color=line.get_color(),
                markeredgecolor="black",
                linestyle="none",
            )
    names = {
        "pipeline": "Redis, one client, pipeline",
        "script": "Redis, one client, Lua script",
        "stream_framework": "Stream Framework 1.4.0 (Celery)",
    }
    styles = {"pipeline": ":", "script": "--", "stream_framework": "-."}
    for name, rate in baseline_rates(results.get("baselines") or {}).items():
        rate_axis.axhline(rate, linestyle=styles[name], color="grey", label=names[name])
    followers = results["plan"]["followers"]
    rate_axis.set(
        xscale="log",
        yscale="log",
        xlabel="fanout_chunk_size",
        ylabel="feed writes / s",
        title=f"Throughput, {followers:,} followers (star: recommended)",
    )
    time_axis.set(
        xscale="log",
        yscale="log",
        xlabel="fanout_chunk_size",
        ylabel="seconds",
        title="End-to-end time of one fanout",
    )
    if modes:
        mode_axis = axes[2]
        sizes = [p["chunk_size"] for p in modes["points"]]
        for mode in ("script", "pipeline"):
            mode_axis.plot(
                sizes,
                [p[f"{mode}_writes_per_s"] for p in modes["points"]],
                marker="o",
                label=f"write_mode={mode}",
            )
        mode_axis.set(
            xscale="log",
            xlabel="chunk size (feeds per apply)",
            ylabel="feed writes / s",
            title="RedisStorage write modes, one client",
        )
        mode_axis.legend(fontsize=8)
        mode_axis.grid(True, which="both", alpha=0.3)
    for axis in (rate_axis, time_axis):
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(f"feedfan fanout, {machine_line(results['machine'])}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
