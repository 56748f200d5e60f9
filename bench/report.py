"""The benchmark's outputs: a table on stdout, results.json and a PNG plot."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from bench.scenarios import Measurement

# The targets, checked in the table's last column (None: no target).
TARGETS = {
    "fanout-50k": "CPU <= 1.5 s/100k, p99 <= 50 ms, no loss",
    "channels": "CPU <= 4 s/100k",
    "idle": "<= 20 KB per connection",
    "burst": "all subscribed within 2 s",
}

_COLUMNS = [
    ("scenario", "scenario", "{}"),
    ("deliveries/s", "deliveries_per_s", "{:,.0f}"),
    ("CPU s/100k", "cpu_s_per_100k", "{:.2f}"),
    ("workers", "worker_cpu_s_per_100k", "{:.2f}"),
    ("redis", "redis_cpu_s_per_100k", "{:.2f}"),
    ("p50 ms", "p50_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"),
    ("max ms", "max_ms", "{:.1f}"),
    ("lost", "lost", "{}"),
    ("dup", "duplicates", "{}"),
    ("loadgen cores", "loadgen_cores", "{:.2f}"),
    ("other", None, "{}"),
]


def _other(row: dict[str, Any]) -> str:
    parts = []
    if "cpu_us_per_publish" in row and "cpu_s_per_100k" not in row:
        # Nothing delivered (`publish`): what each publish cost instead.
        parts.append(
            f"{row['cpu_us_per_publish']:.0f} us CPU per publish "
            f"(workers {row['worker_cpu_us_per_publish']:.0f}, "
            f"redis {row['redis_cpu_us_per_publish']:.0f})"
        )
    if "kb_per_connection" in row:
        parts.append(f"{row['kb_per_connection']:.1f} KB/connection")
    if "all_subscribed_ms" in row:
        parts.append(f"all subscribed in {row['all_subscribed_ms']:.0f} ms")
        if row["failures"]:
            parts.append(f"{row['failures']} failed")
    if "all_resubscribed_ms" in row:
        parts.append(f"all resubscribed in {row['all_resubscribed_ms']:.0f} ms")
        parts.append(f"recovered {row['recovered']}")
    if "closes" in row:
        parts.append(f"closes {row['closes']}")
    return ", ".join(parts)


def table(measurements: list[Measurement]) -> str:
    """A plain-text table of every scenario's figures."""
    rows = []
    for m in measurements:
        row = m.summary()
        cells = []
        for _, key, fmt in _COLUMNS:
            if key is None:
                cells.append(_other(row))
            else:
                value = row.get(key)
                cells.append("-" if value is None else fmt.format(value))
        rows.append(cells)
    headers = [title for title, _, _ in _COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def comparison(measurements: list[Measurement], other: Path) -> str:
    """`--compare`: each side's worker CPU per scenario, and the other side's over this one's.

    Both sides served the same load at the same time (the generator spreads clients
    round-robin), so the machine's changes of speed cancel out of the ratio.
    """
    lines = [
        f"COMPARED: workers 0, 2, ... ran this checkout; workers 1, 3, ... ran {other}",
        f"{'scenario':<12}  {'this s':>8}  {'other s':>8}  other/this",
    ]
    for m in measurements:
        this, that = m.worker_cpu_each[0::2], m.worker_cpu_each[1::2]
        if not this or sum(this) <= 0:
            continue
        ratio = sum(that) / sum(this)
        lines.append(f"{m.scenario.name:<12}  {sum(this):>8.2f}  {sum(that):>8.2f}  {ratio:.3f}")
    return "\n".join(lines)


def write_json(measurements: list[Measurement], path: Path, settings: dict[str, Any]) -> None:
    """Every figure, the generator's raw results included."""
    document = {
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "settings": settings,
        "targets": TARGETS,
        "scenarios": [
            {
                "summary": m.summary(),
                "scenario": m.scenario.__dict__,
                "workers": m.workers,
                "server_cpu_s": m.server_cpu_s,
                "worker_cpu_s": m.worker_cpu_s,
                "redis_cpu_s": m.redis_cpu_s,
                "wall_s": m.wall_s,
                "worker_rss_before": m.worker_rss_before,
                "worker_rss_loaded": m.worker_rss_loaded,
                "worker_cpu_s_each": m.worker_cpu_each,
                "redis_cpu_s_each": m.redis_cpu_each,
                "loadgen": m.result,
            }
            for m in measurements
        ],
    }
    path.write_text(json.dumps(document, indent=1))


def plot(measurements: list[Measurement], path: Path) -> None:
    """Latency distributions and throughput over time of the traffic scenarios."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    traffic = [m for m in measurements if m.result.get("timeline_100ms")]
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(13, 5))
    for m in traffic:
        histogram = m.result["latency"]["histogram"]
        counts = histogram["counts"]
        total = sum(counts) or 1
        edges = [
            histogram["first_ms"] * 10 ** ((i + 1) / histogram["bins_per_decade"])
            for i in range(len(counts))
        ]
        cumulative, running = [], 0
        for count in counts:
            running += count
            cumulative.append(running / total)
        latency.plot(edges, cumulative, label=m.scenario.name)
        per_second = [c * 10 for c in m.result["timeline_100ms"]]
        throughput.plot([i / 10 for i in range(len(per_second))], per_second, label=m.scenario.name)
    latency.set_xscale("log")
    latency.set_xlabel("latency, publish to delivery (ms)")
    latency.set_ylabel("fraction of deliveries")
    latency.set_title("Latency distribution (CDF)")
    latency.grid(True, which="both", alpha=0.3)
    throughput.set_xlabel("seconds into the measured phase")
    throughput.set_ylabel("deliveries per second (100 ms bins)")
    throughput.set_title("Throughput")
    throughput.grid(True, alpha=0.3)
    for axes in (latency, throughput):
        if traffic:
            axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
